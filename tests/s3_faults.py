"""A fault-injecting HTTP proxy in front of a test S3 endpoint: forwards each request unchanged and, at a seeded
rate, answers it with 503 SlowDown, 500 InternalError, a connection reset, or a body cut short instead.

    with FaultyS3Proxy("http://127.0.0.1:5000", rate=0.3, seed=1) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
    proxy.faults  # {"slow_down": 9, "internal_error": 11, "reset": 8, "truncated_body": 7}

A request is never failed more than `max_consecutive` times in a row (per method and path), so a client that
retries more often than that always gets through; `max_consecutive=None` fails a matching request every time.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class Fault(str, Enum):
    SLOW_DOWN = "slow_down"  # 503 with S3's SlowDown error document, before the request reaches the store
    INTERNAL_ERROR = "internal_error"  # 500 InternalError, after the store has (maybe) carried the request out
    RESET = "reset"  # the connection is reset without a response, after the store has (maybe) carried it out
    TRUNCATED_BODY = "truncated_body"  # the store's response with its full Content-Length but half its body


_ERROR_STATUS = {Fault.SLOW_DOWN: (503, "SlowDown", "Please reduce your request rate."),
                 Fault.INTERNAL_ERROR: (500, "InternalError", "We encountered an internal error. Please try again.")}
# Hop-by-hop headers belong to one connection, not to the request: not forwarded either way.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}

Matcher = Callable[[str, str], bool]  # (method, path with query) -> may this request be failed?


class FaultyS3Proxy:
    """A threaded HTTP server on 127.0.0.1 (a free port) forwarding to `upstream` with injected faults.

    `rate` is the chance (0..1) that a request matching `matches` is failed; the kind is drawn from `kinds`.
    Counters: `requests` (all received), `faults` (per kind), `forwarded` (requests the store carried out).
    """

    def __init__(self, upstream: str, *, rate: float, seed: int = 0, kinds: tuple[Fault, ...] = tuple(Fault),
                 max_consecutive: int | None = 2, matches: Matcher | None = None, upstream_timeout: float = 30.0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate {rate!r} must be between 0 and 1")
        if not kinds:
            raise ValueError(f"kinds must name at least one of: {', '.join(f.value for f in Fault)}")
        if max_consecutive is not None and max_consecutive < 0:
            raise ValueError(f"max_consecutive {max_consecutive!r} must be None or at least 0")
        target = urlsplit(upstream)
        if target.scheme != "http" or target.hostname != "127.0.0.1":
            raise ValueError(f"upstream {upstream!r} must be http://127.0.0.1:PORT (the proxy stays on this machine)")
        self.upstream = (target.hostname, target.port or 80)
        self.rate, self.kinds, self.max_consecutive = rate, tuple(kinds), max_consecutive
        self.matches = matches or (lambda method, path: True)
        self.upstream_timeout = upstream_timeout
        self.requests = 0
        self.forwarded = 0
        self.faults: Counter[str] = Counter({f.value: 0 for f in Fault})
        self.failed_requests: list[tuple[str, str, str]] = []  # (method, path, fault kind), in order
        self._rng = random.Random(seed)
        self._streak: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def __enter__(self) -> FaultyS3Proxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # stops serve_forever (bounded: it polls every 50 ms)
        server.server_close()
        with self._lock:  # idle keep-alive connections would hold their handler threads on a read
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def choose_fault(self, method: str, path: str) -> Fault | None:
        """Count the request and decide (from the seeded generator, in arrival order) whether and how to fail it."""
        key = (method, path)
        with self._lock:
            self.requests += 1
            allowed = self.max_consecutive is None or self._streak[key] < self.max_consecutive
            fault = None
            if allowed and self.matches(method, path) and self._rng.random() < self.rate:
                fault = self._rng.choice(self.kinds)
            self._streak[key] = self._streak[key] + 1 if fault else 0
            return fault

    def record(self, method: str, path: str, fault: Fault) -> None:
        with self._lock:
            self.faults[fault.value] += 1
            self.failed_requests.append((method, path, fault.value))

    def _track(self, conn: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(conn)


def _handler_for(proxy: FaultyS3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    timeout = 60  # an idle client connection is dropped after this, so no handler thread lives forever
    proxy: FaultyS3Proxy

    def setup(self) -> None:
        super().setup()
        self.proxy._track(self.connection, True)

    def finish(self) -> None:
        self.proxy._track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass
        if getattr(self, "_abort", False):
            try:  # SO_LINGER 0: close sends RST, not FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.connection.close()

    def log_message(self, format: str, *args) -> None:  # quiet: pytest shows what the test asserts
        pass

    def _relay(self) -> None:
        method = self.command
        body = self._read_body()
        fault = self.proxy.choose_fault(method, self.path)
        if fault is Fault.SLOW_DOWN:  # refused before the store sees it, as S3's throttling is
            self.proxy.record(method, self.path, fault)
            return self._send_error(fault)
        status, reason, headers, payload = self._forward(method, body)
        if fault is Fault.TRUNCATED_BODY and (method == "HEAD" or len(payload) < 2):
            fault = Fault.RESET  # nothing to cut short
        if fault is not None:
            self.proxy.record(method, self.path, fault)
        if fault is Fault.INTERNAL_ERROR:
            return self._send_error(fault)
        if fault is Fault.RESET:
            return self._reset()
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if fault is Fault.TRUNCATED_BODY:
            self.wfile.write(payload[: len(payload) // 2])
            return self._reset()
        if method != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _relay

    def _read_body(self) -> bytes:
        """The request body exactly as sent (a chunked one raw, chunk framing and trailers included)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            for _ in range(1_000_000):  # bounded: a chunk per iteration
                size_line = self.rfile.readline(65537)
                raw += size_line
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(1000):  # trailers, up to the blank line
                        line = self.rfile.readline(65537)
                        raw += line
                        if line in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                    raise ValueError("chunked request body: too many trailer lines")
                raw += self.rfile.read(size + 2)  # the data and its CRLF
            raise ValueError("chunked request body: too many chunks")
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, method: str, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request to the store (headers, Host included, unchanged) and return its whole response."""
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=self.proxy.upstream_timeout)
        try:
            conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            payload = resp.read()  # de-chunked if the store chunked it; re-framed with a Content-Length below
            with self.proxy._lock:
                self.proxy.forwarded += 1
            keep_length = method == "HEAD" or resp.status in (204, 304)
            headers = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in _HOP_BY_HOP | {"transfer-encoding"}
                       and (keep_length or k.lower() != "content-length")]
            if not keep_length:
                headers.append(("Content-Length", str(len(payload))))
            return resp.status, resp.reason, headers, payload
        finally:
            conn.close()

    def _send_error(self, fault: Fault) -> None:
        status, code, message = _ERROR_STATUS[fault]
        request_id = uuid.uuid4().hex[:16].upper()
        doc = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               f"<Resource>{self.path.split('?', 1)[0]}</Resource><RequestId>{request_id}</RequestId></Error>")
        payload = doc.encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _reset(self) -> None:
        """Drop the connection with a TCP reset and no (further) response: done in `finish`, once the handler's
        file objects are closed and closing the socket really closes it."""
        self.close_connection = True
        self._abort = True
