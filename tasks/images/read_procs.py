"""Read and header-check local files in worker processes, into shared memory (anonymous memory files). In
threads, the reads and the marker walks held the GIL that the decode and model threads of a shard also need
(bench/NOTES.md, variant 8); in processes they hold none of it, and what comes back per file is an offset, a
length and a verdict."""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from tasks.images.read import DEFAULT_MAX_PIXELS, Blob, Failure, checked_blob, read_image, read_objects, refused_uri
from tasks.images.s3_reads import connection_settings, use_settings
from tasks.storage import is_url

log = logging.getLogger(__name__)

MIN_SLOT_BYTES = 64 << 20
SLOT_BYTES_PER_IMAGE = 512 << 10  # room for photos ~5x the ImageNet mean (~110 kB); larger files come back as bytes
# Reads in flight in each process: files not in the page cache wait on the disk, and one read at a time leaves it
# idle (bench/cold_reads.py). The threads contend only for their own process's GIL.
THREADS_PER_PROCESS = 4
OWNER_CHECK_SECONDS = 0.5  # how often a reader process checks that the process it reads for is alive


def read_processes_available() -> str | None:
    """Why worker processes cannot read here (None when they can): they need anonymous shared memory that other
    processes can open (Linux's memfd_create and /proc), and a process that may have children (Dask's worker
    processes are daemons unless told otherwise)."""
    if multiprocessing.current_process().daemon:
        return ("this is a daemonic process, which may not start processes (a Dask worker: start the workers with "
                "DASK_DISTRIBUTED__WORKER__DAEMON=False)")
    if not hasattr(os, "memfd_create"):
        return "this system has no memfd_create (Linux only)"
    try:
        fd = os.memfd_create("a2k-read-probe", os.MFD_CLOEXEC)
    except OSError as e:
        return f"memfd_create failed ({e.strerror})"
    try:
        with open(_slot_path(fd), "rb"):
            return None
    except OSError as e:
        return f"{_slot_path(fd)} cannot be opened ({e.strerror}): is /proc mounted?"
    finally:
        os.close(fd)


def _slot_path(fd: int) -> str:
    """Where another process of this user opens this process's memfd `fd`."""
    return f"/proc/{os.getpid()}/fd/{fd}"


class _Region:
    """`ReadArena.take` over one chunk's share of a slot, in a worker process: no lock, one reader."""

    def __init__(self, view: memoryview) -> None:
        self._view, self.used = view, 0

    def take(self, size: int) -> memoryview | None:
        if self.used + size > len(self._view):
            return None
        start, self.used = self.used, self.used + size
        return self._view[start : start + size]


_SLOTS: list[memoryview] = []  # in a worker process: every slot, mapped once by _attach
_THREADS: list[tuple[ThreadPoolExecutor, int]] = []  # in a worker process: its reader threads and their number


def _map(path: str) -> memoryview:
    with open(path, "r+b") as f:
        return memoryview(mmap.mmap(f.fileno(), 0))


def _attach(paths: list[str], threads: int, owner: int) -> None:
    """Map the owner's slots, start the reader threads, and exit when the owner does, however it ends: a
    SIGKILL (or Dask killing a worker that did not stop in time) runs no exit handler that would stop them."""
    # a Ctrl-C reaches the whole process group: the owner decides (a2k.signals), and its readers end with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _SLOTS.extend(_map(path) for path in paths)
    _THREADS.append((ThreadPoolExecutor(threads, thread_name_prefix="a2k-read"), threads))
    threading.Thread(target=_exit_with, args=(owner,), name="a2k-read-owner", daemon=True).start()


def _exit_with(owner: int) -> None:
    while True:
        time.sleep(OWNER_CHECK_SECONDS)
        try:
            os.kill(owner, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its pid is another user's process now)
            os._exit(0)


def _worker_pid() -> int:
    time.sleep(0.05)  # long enough that each of the first `workers` tasks starts a process of its own
    return os.getpid()


def _read_chunk(slot: int, start: int, size: int, uris: list[str], max_pixels: int,
                settings: tuple[tuple[str, str], ...] | None = None) -> list:
    """In a worker: read and check `uris` into bytes [start, start + size) of a slot, split among its threads.
    Objects in a store (`settings`: the owner's AWS variables) are fetched concurrently by this process's client."""
    if settings is not None:
        return _fetch_chunk(slot, start, size, uris, max_pixels, settings)
    pool, threads = _THREADS[0]
    per = -(-len(uris) // threads) or 1
    parts = -(-len(uris) // per)
    share = size // max(parts, 1)
    done = pool.map(lambda k: _read_part(slot, start + k * share, share, uris[k * per : (k + 1) * per], max_pixels),
                    range(parts))
    return [item for part in done for item in part]


def _read_part(slot: int, start: int, size: int, uris: list[str], max_pixels: int) -> list:
    """Read and check `uris` into bytes [start, start + size) of a slot. A file read there comes back as
    (offset, length, pillow_reason); one that did not fit, or that the check copied, as its `Blob`."""
    region = _Region(_SLOTS[slot][start : start + size])
    out: list = []
    for uri in uris:
        offset = region.used
        data = read_image(uri, region)
        item = data if isinstance(data, Failure) else checked_blob(data, max_pixels)
        if isinstance(item, Blob) and isinstance(item.data, memoryview):
            item = (start + offset, len(item.data), item.pillow_reason)
        out.append(item)
    return out


def _fetch_chunk(slot: int, start: int, size: int, uris: list[str], max_pixels: int,
                 settings: tuple[tuple[str, str], ...]) -> list:
    """`_read_part` for objects in a store: fetched together (obstore, IN_FLIGHT at a time), then each copied into
    the slot and checked. The forkserver's environment is the owner's as it was at the first start, so the owner's
    current AWS variables come with each chunk."""
    use_settings(settings)
    region = _Region(_SLOTS[slot][start : start + size])
    out: list = []
    for data in read_objects(uris):
        if isinstance(data, Failure):
            out.append(data)
            continue
        offset = region.used
        if (view := region.take(len(data))) is not None:
            view[:] = data
            data = view
        item = checked_blob(data, max_pixels)
        if isinstance(item, Blob) and item.data is view and view is not None:
            item = (start + offset, len(view), item.pillow_reason)
        elif isinstance(item, Blob) and not isinstance(item.data, bytes):
            item = Blob(bytes(item.data), item.pillow_reason)  # a view of obstore's buffer does not pickle
        out.append(item)
    return out


class ProcessReaders:
    """`workers` processes that read batches of local files into `slots` shared-memory slots; a batch read into
    slot k is valid until the next batch read into slot k (as a `ReadArena` ring)."""

    def __init__(self, workers: int, slots: int, slot_bytes: int, threads: int = THREADS_PER_PROCESS,
                 chunks: int | None = None) -> None:
        # `chunks`: the parts a batch is split into (default one a process); fewer than `workers` leaves processes
        # free for other batches loaded at once (from other threads): object reads, which wait on the network
        self.workers, self.slot_bytes, self.threads = workers, slot_bytes, threads
        self.chunks = min(chunks or workers, workers)
        # each slot is an anonymous memory file (memfd): it has no name to leave behind, and its memory goes with
        # the last process that maps it, however the processes end; readers open it through /proc
        fds = [os.memfd_create(f"a2k-read-slot-{k}", os.MFD_CLOEXEC) for k in range(slots)]
        try:
            for fd in fds:
                os.ftruncate(fd, slot_bytes)  # sparse: a page takes memory once a file is read into it
            self._views = [memoryview(mmap.mmap(fd, slot_bytes)) for fd in fds]
            context = multiprocessing.get_context("forkserver")  # not fork: this process runs threads (and CUDA)
            self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_attach,
                                             initargs=([_slot_path(fd) for fd in fds], threads, os.getpid()))
            # multiprocessing's Finalize, not weakref's: a process ending through multiprocessing (a Dask worker,
            # spawned by its nanny) joins its non-daemonic children before the interpreter's own exit handlers run,
            # and would wait on idle readers that nobody told to stop (Dask then kills it after 4 s, and on a GPU
            # the kill outlasts the cluster's close timeout: the flow run failed). Finalizers of priority >= 0 run
            # before that join, highest first; above 10, where the pool's queue stops its feeder thread, or the
            # stop signals would never reach the readers
            self._stop = multiprocessing.util.Finalize(self, self._pool.shutdown,
                                                       kwargs={"wait": True, "cancel_futures": True}, exitpriority=20)
            self._start_all()
        finally:
            for fd in fds:  # every process maps the slots now
                os.close(fd)

    def close(self) -> None:
        """Stop the reader processes now (as at exit: the finalizer runs once)."""
        self._stop()

    def _start_all(self) -> None:
        """Start every worker process now, so that each has mapped the slots before this process closes their
        files (a pool started lazily would start some later)."""
        seen: set[int] = set()
        for _ in range(20):
            seen |= {f.result() for f in [self._pool.submit(_worker_pid) for _ in range(self.workers)]}
            if len(seen) == self.workers:
                return
        raise RuntimeError(f"{len(seen)} of {self.workers} reader processes started")

    def load(self, uris: list[str], slot: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Blob | Failure]:
        """`load_blobs` in the worker processes (local files, or objects in a store each process fetches with its
        own client); order follows `uris`."""
        per = -(-len(uris) // self.chunks) or 1
        chunks = [uris[i : i + per] for i in range(0, len(uris), per)]
        share = self.slot_bytes // max(len(chunks), 1)
        first = next((u for u in uris if refused_uri(u) is None), None)
        settings = connection_settings() if first is not None and is_url(first) else None
        futures = [self._pool.submit(_read_chunk, slot, k * share, share, chunk, max_pixels, settings)
                   for k, chunk in enumerate(chunks)]
        view = self._views[slot]
        out: list[Blob | Failure] = []
        for future in futures:
            for item in future.result():
                out.append(Blob(view[item[0] : item[0] + item[1]], item[2]) if isinstance(item, tuple) else item)
        return out
