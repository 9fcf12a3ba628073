"""Only regular files are read, and never more than their size when opened nor more than MAX_FILE_BYTES: a FIFO, a
device, a huge sparse file and a file that grows while read each become one error row, in threads and in the
reader processes alike."""

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks.images.read import MAX_FILE_BYTES, Blob, ErrorKind, Failure, load_blobs
from tasks.images.read_procs import ProcessReaders
from tests.conftest import photo_paths

READ_TIMEOUT_S = 20


def _release_fifo(path: Path) -> None:
    """Give a reader blocked on the FIFO its end of file (before the fix, it waited for a writer forever)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader is waiting on it
        return
    os.close(fd)


@pytest.fixture
def special_files(tmp_path) -> dict[str, Path]:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_paths(1)[0].read_bytes())
    os.mkfifo(tmp_path / "pipe.jpg")
    with open(tmp_path / "big.jpg", "wb") as f:  # sparse: takes no disk, but reading it would take 256 MiB
        f.truncate(MAX_FILE_BYTES + 1)
    return {"photo": photo, "pipe": tmp_path / "pipe.jpg", "big": tmp_path / "big.jpg",
            "growing": Path("/proc/self/status")}  # a regular file whose size says 0 and which holds more


EXPECTED = {
    "pipe": (ErrorKind.UNREADABLE, "not a regular file: fifo"),
    "big": (ErrorKind.TOO_LARGE, f"file of {MAX_FILE_BYTES + 1} bytes is over the limit of {MAX_FILE_BYTES} bytes"),
    "growing": (ErrorKind.UNREADABLE, "file grew while it was read (it had 0 bytes when opened)"),
}


def _load_with_timeout(load, files: list[Path]) -> list[Blob | Failure]:
    result: list = []
    worker = threading.Thread(target=lambda: result.append(load([str(p) for p in files])), daemon=True)
    worker.start()
    worker.join(READ_TIMEOUT_S)
    if worker.is_alive():
        for path in files:
            if path.is_fifo():
                _release_fifo(path)
        worker.join(READ_TIMEOUT_S)
        pytest.fail(f"reading did not finish in {READ_TIMEOUT_S} s (blocked on the FIFO)")
    return result[0]


def _assert_verdicts(name: str, got: list[Blob | Failure]) -> None:
    kind, message = EXPECTED[name]
    assert isinstance(got[0], Blob) and isinstance(got[2], Blob)  # the photos before and after it
    assert isinstance(got[1], Failure) and got[1].kind == kind, got[1]
    assert got[1].message.startswith(message), got[1].message


@pytest.mark.parametrize("name", EXPECTED)
def test_threads_read_only_regular_files_within_their_size(special_files, name):
    files = [special_files["photo"], special_files[name], special_files["photo"]]
    with ThreadPoolExecutor(2) as pool:
        _assert_verdicts(name, _load_with_timeout(lambda uris: load_blobs(uris, pool), files))


@pytest.mark.parametrize("name", EXPECTED)
def test_reader_processes_read_only_regular_files_within_their_size(special_files, name):
    files = [special_files["photo"], special_files[name], special_files["photo"]]
    readers = ProcessReaders(workers=1, slots=1, slot_bytes=8 << 20)
    try:
        _assert_verdicts(name, _load_with_timeout(lambda uris: readers.load(uris, 0), files))
    finally:
        _release_fifo(special_files["pipe"])
        readers.close()


def test_a_link_to_dev_zero_is_not_read(tmp_path):
    """In a child process with 2 GiB of address space: before the check, reading /dev/zero ran until memory ran
    out (it took a whole test run down with it once)."""
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from tasks.images.read import read_image\n"
            f"print(read_image({str(tmp_path / 'zero.jpg')!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[3])
    assert done.returncode == 0, done.stderr[-500:]
    assert "Failure(kind=<ErrorKind.UNREADABLE: 'unreadable'>, message='not a regular file: character device')" in done.stdout
