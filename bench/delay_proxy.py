"""A user-space stand-in for `tc netem` where the kernel or the image has none (the dev VM's kernel lacks netem; the
GPU image has neither `ip` nor `tc`): a TCP proxy on 127.0.0.1 that forwards to a server and holds each chunk a
client sends for `delay` seconds before passing it on (chunks are pipelined, not serialized: a connection's later
requests do not wait for its earlier ones' delay). Answers pass at once. So each request's round trip gains `delay`,
as a link with `delay / 2` each way would add; TCP's slow start over such a link is not emulated, and the proxy's
own CPU (reported by the benchmarks) is host CPU that a real network would not take. `processes` proxy processes
share the port (SO_REUSEPORT), so one Python process does not bound the bytes per second.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time

CHUNK = 1 << 18


def _serve(port: int, upstream: tuple[str, int], delay: float) -> None:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, late: float) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(CHUNK):
                if late:
                    queue.put_nowait((time.monotonic() + late, data))
                else:
                    writer.write(data)
                    await writer.drain()
        finally:
            queue.put_nowait(None)
            await sender

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up_reader, up_writer = await asyncio.open_connection(*upstream)
        up_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(reader, up_writer, delay), pipe(up_reader, writer, 0.0), return_exceptions=True)

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_port=True, backlog=4096)
        await server.serve_forever()

    asyncio.run(serve())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(upstream_port: int, delay_s: float, processes: int = 1) -> tuple[int, list[multiprocessing.Process]]:
    """`processes` proxy processes on one new port of 127.0.0.1, forwarding to `upstream_port` with each request
    `delay_s` late: (the port, the processes; terminate them when done)."""
    port = free_port()
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_serve, args=(port, ("127.0.0.1", upstream_port), delay_s), daemon=True)
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    time.sleep(0.5)  # the other processes' listeners
    return port, procs
