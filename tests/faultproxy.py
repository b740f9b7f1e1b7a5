"""A fault-injecting HTTP proxy on 127.0.0.1, for putting the loopback S3 server under the faults a
cluster's object store shows: 500/503/403 answers, reset connections, responses cut mid-body, delays.

Every request is forwarded to the upstream server on a fresh connection unless a `Fault` matches it.
A fault matches by method, a regular expression on the path (query included) and, for ranged GETs,
the first byte asked for; it starts at its first match and lasts `seconds` or `times` matches,
whichever is given. Sockets time out after `SOCKET_TIMEOUT_S`, and the server thread stops with the
context manager, so a test can never hang on the proxy.
"""

from __future__ import annotations

import re
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field

SOCKET_TIMEOUT_S = 20.0
_RANGE = re.compile(r"bytes=(\d+)-")


@dataclass
class Fault:
    """What to do to matching requests: `kind` is an HTTP status ("500", "503", "403"), "reset" (close
    with a TCP reset before answering), "cut" (send the headers and half the body, then reset) or
    "delay" (forward after `delay_s`)."""

    kind: str
    method: str | None = None
    path: str = ""  # regular expression searched in the request path
    min_offset: int = 0  # for GETs: only ranged reads from this byte on (0: any GET)
    seconds: float | None = None  # active for this long after the first match
    times: int | None = None  # or for this many matches
    delay_s: float = 0.0
    hits: int = 0
    started: float | None = field(default=None, repr=False)

    def matches(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if self.method and method != self.method:
            return False
        if self.path and not re.search(self.path, path):
            return False
        if self.min_offset:
            found = _RANGE.match(headers.get("range", ""))
            if not found or int(found.group(1)) < self.min_offset:
                return False
        now = time.monotonic()
        if self.started is not None and self.seconds is not None and now - self.started > self.seconds:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.started = self.started if self.started is not None else now
        self.hits += 1
        return True


class FaultProxy:
    """`with FaultProxy(upstream_url) as proxy:` serves on `proxy.url`; `proxy.add(Fault(...))` arms a fault."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.split("://", 1)[-1].rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _match(self, method: str, path: str, headers: dict[str, str]) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            return next((f for f in self.faults if f.matches(method, path, headers)), None)

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(SOCKET_TIMEOUT_S)
        buffer = b""
        try:
            while True:
                request, buffer = _read_request(client, buffer)
                if request is None:
                    return
                head, body = request
                method, path, headers = _parse_head(head)
                fault = self._match(method, path, headers)
                if fault is not None and fault.kind == "reset":
                    _reset(client)
                    return
                if fault is not None and fault.kind.isdigit():
                    _send_error(client, int(fault.kind))
                    continue
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.delay_s)
                response, body_bytes = self._forward(head, body, method)
                if fault is not None and fault.kind == "cut":
                    client.sendall(response[: len(response) - body_bytes // 2])
                    _reset(client)
                    return
                client.sendall(response)
        except (OSError, ValueError):
            return
        finally:
            client.close()

    def _forward(self, head: bytes, body: bytes, method: str) -> tuple[bytes, int]:
        """The upstream's response to one request, re-framed with a Content-Length, and its body's size."""
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        data = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body
        with socket.create_connection(self.upstream, timeout=SOCKET_TIMEOUT_S) as upstream:
            upstream.sendall(data)
            raw = b""
            while chunk := upstream.recv(1 << 16):
                raw += chunk
        response_head, _, response_body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = response_head.split(b"\r\n")
        headers = [tuple(part.strip() for part in line.split(b":", 1)) for line in header_lines]
        if any(k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in headers):
            response_body = _dechunk(response_body)
        dropped = (b"transfer-encoding", b"connection") + ((b"content-length",) if method != "HEAD" else ())
        keep = [(k, v) for k, v in headers if k.lower() not in dropped]
        length = None if method == "HEAD" else len(response_body)
        return _response(status_line, keep, response_body, length), len(response_body)


def _read_request(sock: socket.socket, buffer: bytes) -> tuple[tuple[bytes, bytes] | None, bytes]:
    """One request (head, raw body) from `sock`, and what was read past it; None at a clean close."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return None, b""
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    _, _, headers = _parse_head(head)
    if headers.get("expect", "").lower() == "100-continue":  # the client waits for this before its body
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"expect:"))
    if "chunked" in headers.get("transfer-encoding", ""):
        while not _chunked_complete(rest):
            rest += _recv(sock)
        end = _chunked_end(rest)
        return (head, rest[:end]), rest[end:]
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        rest += _recv(sock)
    return (head, rest[:length]), rest[length:]


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(1 << 16)
    if not chunk:
        raise ValueError("connection closed mid-request")
    return chunk


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return method, path, headers


def _chunked_end(data: bytes) -> int:
    """Offset just past the last chunk (and trailers) of a chunked body, or -1 when incomplete."""
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return -1
        size = int(data[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n\r\n", pos - 2)
            return -1 if trailer_end < 0 else trailer_end + 4
        pos += size + 2
        if pos > len(data):
            return -1


def _chunked_complete(data: bytes) -> bool:
    return _chunked_end(data) >= 0


def _dechunk(data: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end].split(b";")[0], 16)
        if size == 0:
            return out
        out += data[line_end + 2 : line_end + 2 + size]
        pos = line_end + 2 + size + 2


def _response(status_line: bytes, headers: list[tuple[bytes, bytes]], body: bytes, length: int | None) -> bytes:
    lines = [status_line, *(k + b": " + v for k, v in headers)]
    lines += [b"Content-Length: %d" % length] if length is not None else []
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _send_error(sock: socket.socket, status: int) -> None:
    reason = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    code = {403: "AccessDenied", 503: "SlowDown"}.get(status, "InternalError")
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{reason}</Message></Error>'
    headers = [(b"Content-Type", b"application/xml")]
    sock.sendall(_response(f"HTTP/1.1 {status} {reason}".encode(), headers, body.encode(), len(body)))


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server or a middlebox does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
