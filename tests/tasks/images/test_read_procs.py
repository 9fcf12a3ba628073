import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks.images.read import Blob, Failure, load_blobs
from tasks.images.read_procs import ProcessReaders, read_processes_available
from tests.conftest import ODD_IMAGES, photo_paths


@pytest.fixture
def mixed_files(tmp_path, truncated_jpeg) -> list[str]:
    """Photos, odd images Pillow decodes instead of DALI, files the header check refuses, and a vanished one."""
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    odd = sorted(p for p in ODD_IMAGES.iterdir() if p.is_file())[:12]
    return ([str(p) for p in photo_paths(20)] + [str(p) for p in odd]
            + [str(tmp_path / n) for n in ("cut.jpg", "empty.png", "text.jpg", "gone.jpg")])


def _verdicts(items: list[Blob | Failure]) -> list:
    return [(f.kind, f.message) if isinstance(f := item, Failure) else (bytes(item.data), item.pillow_reason)
            for item in items]


def test_worker_processes_read_and_check_as_threads_do(mixed_files):
    with ThreadPoolExecutor(1) as pool:
        want = _verdicts(load_blobs(mixed_files, pool))
    in_shared_memory = []
    for slot_bytes in (64 << 20, 256 << 10):  # roomy; and too small for most files, which come back as bytes
        readers = ProcessReaders(workers=2, slots=2, slot_bytes=slot_bytes)
        for slot in (0, 1, 0):  # a slot is reused by the batch after next
            got = readers.load(mixed_files, slot)
            assert _verdicts(got) == want
        in_shared_memory.append(sum(isinstance(b, Blob) and isinstance(b.data, memoryview) for b in got))
    assert in_shared_memory[0] >= 20 > in_shared_memory[1] > 0, in_shared_memory  # every photo; then a few


def test_reader_processes_say_why_they_cannot_run(monkeypatch):
    assert read_processes_available() is None
    monkeypatch.delattr(os, "memfd_create")
    assert read_processes_available() == "this system has no memfd_create (Linux only)"


def test_reader_processes_and_their_memory_go_when_the_owner_is_killed(tmp_path):
    """A Dask worker process is ended without its exit handlers running; SIGKILL is the hardest case of that. The
    slots are anonymous memory files: once the readers are gone, nothing maps them and nothing names them."""
    import signal
    import subprocess
    import sys
    import time

    owner = subprocess.Popen(
        [sys.executable, "-c", "from tasks.images.read_procs import ProcessReaders\n"
         "r = ProcessReaders(workers=2, slots=2, slot_bytes=1 << 20)\n"
         "print(' '.join(str(p.pid) for p in r._pool._processes.values()), flush=True)\n"
         "import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    readers = [int(p) for p in owner.stdout.readline().split()]
    assert len(readers) == 2
    owner.send_signal(signal.SIGKILL)
    owner.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent to reap it is gone too
            return f.read().split(") ")[-1][0] != "Z"

    deadline = time.monotonic() + 10
    while any(alive(p) for p in readers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in readers if alive(p)]
