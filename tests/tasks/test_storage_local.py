"""Local files written for other processes to read (the registry's event log and version claims): a reader sees
a file whole or not at all."""

import threading

import fsspec

from tasks.storage import create_exclusive, listdir_names


def test_an_exclusive_create_is_never_seen_part_written(tmp_path):
    """A reader listing and reading the folder while files are created in it never reads one short (CI,
    2026-12-01: racing registrations read an event file another process had created but not yet written)."""
    fs = fsspec.filesystem("file")
    folder = str(tmp_path / "events")
    data = {n: bytes([n % 251]) * (4 << 20) for n in range(40)}  # ~ms to write each: a wide window before the fix
    short: list[str] = []
    done = threading.Event()

    def read_while_written():
        while not done.is_set():
            for name in listdir_names(fs, folder):
                if name.endswith(".json"):
                    with open(f"{folder}/{name}", "rb") as f:
                        if len(f.read()) != 4 << 20:
                            short.append(name)

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        for n, payload in data.items():
            assert create_exclusive(fs, f"{folder}/{n:08d}.json", payload)
    finally:
        done.set()
        reader.join()
    assert not short, f"read part-written: {short[:5]}"
    assert not create_exclusive(fs, f"{folder}/{0:08d}.json", b"a rival's")  # the first creator keeps it
    assert open(f"{folder}/{0:08d}.json", "rb").read() == data[0]
    assert sorted(listdir_names(fs, folder)) == [f"{n:08d}.json" for n in range(40)]  # no temporary left behind


def test_without_hard_links_an_exclusive_create_still_refuses_the_second(tmp_path, monkeypatch, caplog):
    """Some mounts (FUSE, SMB) refuse hard links: the create falls back to O_EXCL in place and says so."""
    import errno
    import os

    def refused(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refused)
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "claims" / "1")
    assert create_exclusive(fs, path, b"mine")
    assert not create_exclusive(fs, path, b"a rival's")
    assert open(path, "rb").read() == b"mine"
    assert os.listdir(tmp_path / "claims") == ["1"]
    assert "no hard links here" in caplog.text
