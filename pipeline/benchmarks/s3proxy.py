"""A counting, shaping HTTP proxy on 127.0.0.1 in front of an S3 endpoint.

It forwards every request as is (Range, HEAD, listings, uploads) and counts requests by method and the
response body bytes it sent back. It can add latency before each response's first byte and cap the
bandwidth of all connections together, the way a remote object store behaves. Benchmarks and tests
point a client's endpoint_url at `.url` and read `.counts()`.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 256 * 1024
# Headers about one hop, not the request: never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


class _Link:
    """One shared link: latency before each first byte, and a byte rate all connections share."""

    def __init__(self, latency_s: float, bandwidth_bps: float | None):
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        if bandwidth_bps is not None and bandwidth_bps <= 0:
            raise ValueError(f"bandwidth_bps must be > 0 or None, got {bandwidth_bps}")
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link has sent everything handed to it so far

    def send(self, n: int) -> None:
        """Wait until n more bytes fit under the cap."""
        if self.bandwidth_bps is None:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + n / self.bandwidth_bps
            wait = self._free_at - now
        if wait > 0:
            time.sleep(wait)


def _is_listing(method: str, target: str) -> bool:
    """A GET of a bucket (path-style: /bucket?list-type=2&prefix=...), which S3 answers with a listing."""
    parts = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    bucket_only = "/" not in parts.path.strip("/")
    return method == "GET" and bucket_only and (not query or "list-type" in query or "prefix" in query)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    # headers and body are separate writes: with Nagle's algorithm a kept-alive connection's small
    # body waited for the client's delayed ACK, 40 ms per request (68 vs 29 ms for a 100-byte GET)
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def setup(self):
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self):
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._upstream is None:  # one upstream connection per client connection, kept alive with it
            u = self.server.upstream
            self._upstream = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
        return self._upstream

    def _request_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self):
        link, counts = self.server.link, self.server.stats
        body = self._request_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed: reconnect once
            try:
                conn = self._connection()
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                if self._upstream is not None:
                    self._upstream.close()
                self._upstream = None
                if attempt:
                    self.send_error(502, "upstream unreachable")
                    return
        counts.add(self.command, listing=_is_listing(self.command, self.path), bytes_in=len(body or b""))
        length = response.getheader("Content-Length")
        data = None
        if length is None and self.command != "HEAD":  # upstream chunked: buffer to send a length
            data = response.read()
            length = str(len(data))
        if link.latency_s:
            time.sleep(link.latency_s)
        self.send_response_only(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() not in HOP_BY_HOP and not (k.lower() == "content-length" and data is not None):
                self.send_header(k, v)
        if data is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if self.command == "HEAD" or response.status in (204, 304):
            response.read()
            self._drop_if_closing(response)
            return
        remaining = int(length)
        view = memoryview(data) if data is not None else None
        offset = 0
        while remaining > 0:
            if view is not None:
                chunk = view[offset : offset + CHUNK]
                offset += len(chunk)
            else:
                chunk = response.read(min(CHUNK, remaining))
                if not chunk:
                    self.close_connection = True  # upstream cut short: the client must see it too
                    return
            link.send(len(chunk))
            self.wfile.write(chunk)
            counts.add_bytes(len(chunk))
            remaining -= len(chunk)
        self._drop_if_closing(response)

    def _drop_if_closing(self, response: http.client.HTTPResponse) -> None:
        if response.will_close and self._upstream is not None:  # upstream closes: the client stays
            self._upstream.close()
            self._upstream = None

    def _handle(self):
        try:
            self._forward()
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-response
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


class _Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, method: str, *, listing: bool, bytes_in: int) -> None:
        with self._lock:
            self._counts[method] += 1
            self._counts["requests"] += 1
            self._counts["list"] += int(listing)
            self._counts["bytes_in"] += bytes_in

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._counts["bytes"] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"GET": 0, "HEAD": 0, "requests": 0, "list": 0, "bytes": 0, "bytes_in": 0, **self._counts}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client's idle keep-alive connection never holds up shutdown
    # socketserver's default backlog is 5: a loader opening a dozen connections at once had some
    # refused and retried by TCP a second later (first bytes at 1.3 s instead of 0.3 s)
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client closing its kept-alive connection
            super().handle_error(request, client_address)

    upstream: urllib.parse.SplitResult
    link: _Link
    stats: _Stats


class CountingProxy:
    """`with CountingProxy("http://127.0.0.1:5000", latency_s=0.02, bandwidth_bps=200e6) as proxy:`
    point clients at proxy.url; proxy.counts() is {"GET": n, "HEAD": n, "PUT": n, ..., "requests": n,
    "list": n (GETs that list a bucket, also in GET), "bytes": response body bytes, "bytes_in": request body bytes}.
    """

    def __init__(self, upstream_url: str, latency_s: float = 0.0, bandwidth_bps: float | None = None):
        upstream = urllib.parse.urlsplit(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"upstream_url must be http://host[:port], got {upstream_url!r}")
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.upstream = upstream
        self._server.link = _Link(latency_s, bandwidth_bps)
        self._server.stats = _Stats()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3proxy", daemon=True)
        self._thread.start()

    def counts(self) -> dict[str, int]:
        return self._server.stats.snapshot()

    def reset(self) -> None:
        self._server.stats.reset()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
