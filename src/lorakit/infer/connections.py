"""The server's connections: an idle timeout, a limit, and a way to close the idle ones.

`HTTPServer` is ``http.server.ThreadingHTTPServer`` (a thread per connection) that keeps the
number of open connections at most ``max_connections``. A connection is *idle* while it waits
for a request (its first, or the next one on a keep-alive connection) and *busy* from a whole
request to its answer. Idle connections are closed after ``idle_timeout`` seconds of silence
(the socket's timeout), and when a new connection arrives at the limit the oldest idle one is
closed for it, so held-open connections cannot keep real clients out. Only when every
connection is busy is the newcomer answered ``503`` (OpenAI's error object) and closed.
`close_idle` and `wait_quiet` are the drain's: close what waits for a request, then wait for
the busy connections' answers.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

from lorakit.errors import ConfigError

__all__ = ["HTTPServer", "check_exposure"]

_REFUSERS = 32
"""At most this many refused connections are answered at once; more are closed at once."""


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = socket.SOMAXCONN  # the listen backlog: socketserver's 5 resets bursts of clients

    def __init__(self, address, handler, *, max_connections: int = 64, idle_timeout: float = 30.0):
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.refused = 0  # connections answered 503 (or closed) because every connection was busy
        self.evicted = 0  # idle connections closed to make room
        self._open: dict[socket.socket, list] = {}  # connection -> [busy, when it last changed]
        self._cond = threading.Condition()
        self._refusers = threading.BoundedSemaphore(_REFUSERS)

    @property
    def connections(self) -> int:
        return len(self._open)

    def process_request(self, request, client_address) -> None:
        with self._cond:
            if len(self._open) >= self.max_connections and not self._evict_oldest_idle():
                self.refused += 1
                return self._refuse(request)
            self._open[request] = [False, time.monotonic()]
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._cond:
            self._open.pop(request, None)
            self._cond.notify_all()
        super().shutdown_request(request)

    def mark(self, request, busy: bool) -> None:
        """The handler's report: a whole request has arrived (busy) or its answer is sent (idle)."""
        with self._cond:
            if request in self._open:
                self._open[request] = [busy, time.monotonic()]
            self._cond.notify_all()

    def close_idle(self) -> int:
        """Close every connection waiting for a request; how many."""
        with self._cond:
            idle = [r for r, (busy, _) in self._open.items() if not busy]
            for request in idle:
                self._close(request)
            return len(idle)

    def wait_quiet(self, timeout: float) -> bool:
        """Wait until no connection is busy (every answer sent); False if ``timeout`` passes first."""
        with self._cond:
            return self._cond.wait_for(lambda: not any(busy for busy, _ in self._open.values()), timeout)

    # -- under the lock
    def _evict_oldest_idle(self) -> bool:
        idle = [(since, id(r), r) for r, (busy, since) in self._open.items() if not busy]
        if not idle:
            return False
        self._close(min(idle)[2])
        self.evicted += 1
        return True

    def _close(self, request) -> None:
        """Stop counting the connection and wake its thread (its read ends), which closes it."""
        self._open.pop(request, None)
        try:
            request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _refuse(self, request) -> None:
        if not self._refusers.acquire(blocking=False):
            return self.shutdown_request_quietly(request)
        threading.Thread(target=self._answer_busy, args=(request,), name="lorakit-serve-refuse", daemon=True).start()

    def _answer_busy(self, request) -> None:
        """503 to a connection over the limit: read what it sent (briefly), answer, close."""
        body = json.dumps({"error": {"message": f"the server has {self.max_connections} busy connections (its "
                                                "--max-connections); retry shortly", "type": "server_error",
                                     "param": None, "code": "too_many_connections"}}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            try:
                request.recv(1 << 16)  # the request, so that closing does not reset the connection
            except OSError:
                pass
            request.sendall(head + body)
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and request.recv(1 << 16):  # until the client closes
                pass
        except OSError:
            pass
        finally:
            self.shutdown_request_quietly(request)
            self._refusers.release()

    @staticmethod
    def shutdown_request_quietly(request) -> None:
        try:
            request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        request.close()


def check_exposure(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to listen beyond this machine without an API key, unless told to."""
    if api_key or insecure_no_auth or _loopback(host):
        return
    raise ConfigError(f"--host {host} listens beyond this machine, and without --api-key anyone who reaches the "
                      "port can use the models; set --api-key KEY (or $LORAKIT_API_KEY), listen on 127.0.0.1, "
                      "or pass --insecure-no-auth to serve openly on purpose")


def _loopback(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host or "0.0.0.0", None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
