"""A local development cluster: N `redis-server` processes on 127.0.0.1, ready for locks.

    with DevCluster(3) as dev:            # free ports, or DevCluster(3, port_base=7001)
        dlm = DLM(dev.urls, "demo")

Each server runs without persistence in its own temporary directory and is marked safe at
once (`init fresh`, rule E1: it is brand new, so it cannot have forgotten any lease). The
servers are stopped by their own pids only (SIGTERM, then SIGKILL), never by name.
Used by `dlm dev` and `dlm demo`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .engine.instance import Engine
from .errors import InvalidArgument
from .protocol import check_int

HOST = "127.0.0.1"
_FALLBACK_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server",
                   "/usr/sbin/redis-server")


# E1: the rejoin wait stored on a development cluster's instances: clients with a longer
# lease are refused (LeaseTooLong), and an instance that lost its data waits this long.
DEV_REJOIN_MS = 60_000


class DevClusterError(RuntimeError):
    """redis-server is missing, or a server could not be started."""


def find_redis_server() -> str:
    """The redis-server binary: $REDIS_SERVER, else PATH, else the usual install places."""
    override = os.environ.get("REDIS_SERVER")
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise DevClusterError(f"$REDIS_SERVER={override!r} is not an executable file; "
                              "run `bash scripts/setup.sh` to install redis-server")
    found = shutil.which("redis-server")
    if found:
        return found
    for path in _FALLBACK_PATHS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise DevClusterError("redis-server not found: run `bash scripts/setup.sh` "
                          "(it installs redis-server), or set $REDIS_SERVER")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class DevCluster:
    """`n` independent redis-server processes (no replication), started by `start()` or
    `with`. `port_base`: ports port_base .. port_base+n-1 (each must be free); default:
    free ports chosen by the OS. `rejoin_ms`: the rejoin wait stored on every instance (E1),
    so a client whose lease is longer is refused and one that loses its data waits it out."""

    def __init__(self, n: int = 3, *, port_base: int | None = None,
                 executable: str | None = None, startup_timeout_s: float = 10.0,
                 rejoin_ms: int = DEV_REJOIN_MS) -> None:
        if n < 1:
            raise InvalidArgument("a development cluster needs at least one instance")
        if port_base is not None and not 1 <= port_base <= 65535 - (n - 1):
            raise InvalidArgument(f"port base {port_base} leaves no room for {n} ports")
        self.n = n
        self.rejoin_ms = check_int("rejoin_ms", rejoin_ms, 0, 86_400_000)
        self.port_base = port_base
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self.ports: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._dir: Path | None = None

    @property
    def urls(self) -> list[str]:
        return [f"redis://{HOST}:{p}" for p in self.ports]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def env(self) -> str:
        """The line to paste into a shell: ``DLM_REDIS=url1,url2,...``."""
        return "DLM_REDIS=" + ",".join(self.urls)

    def start(self) -> DevCluster:
        if self._procs:
            return self
        exe = self.executable or find_redis_server()
        if self.port_base is not None:
            ports = [self.port_base + i for i in range(self.n)]
            busy = [p for p in ports if not _port_free(p)]
            if busy:
                raise DevClusterError(f"port(s) {', '.join(map(str, busy))} on {HOST} in use; "
                                      "choose another --port-base")
        else:
            ports = []
            while len(ports) < self.n:
                p = _free_port()
                if p not in ports:
                    ports.append(p)
        self._dir = Path(tempfile.mkdtemp(prefix="dlm-dev-"))
        try:
            for port in ports:
                self._spawn(exe, port)
            for port, proc in zip(ports, self._procs):
                self._wait_ready(port, proc)
            for port in ports:
                client = self._client(port)
                try:
                    # E1: brand new, nothing to forget; the stored rejoin wait bounds the leases
                    Engine(client).init_fresh(self.rejoin_ms)
                finally:
                    client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, exe: str, port: int) -> None:
        assert self._dir is not None
        data = self._dir / str(port)
        data.mkdir()
        with open(data / "redis.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--dir", str(data), "--daemonize", "no", "--protected-mode", "no",
                 "--loglevel", "warning"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=data,
                close_fds=True, start_new_session=True)  # Ctrl-C in the shell reaches us only
        self._procs.append(proc)
        self.ports.append(port)

    @staticmethod
    def _client(port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, socket_connect_timeout=0.5,
                           socket_timeout=2.0, retry=Retry(NoBackoff(), 0))

    def _wait_ready(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = self._client(port)
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise DevClusterError(
                        f"redis-server on port {port} exited with {proc.returncode}: "
                        + self._log_tail(port))
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError,
                                         redis.BusyLoadingError):
                    if client.ping():
                        return
                time.sleep(0.02)
        finally:
            client.close()
        raise DevClusterError(f"redis-server on port {port} did not answer within "
                              f"{self.startup_timeout_s:g} s: " + self._log_tail(port))

    def _log_tail(self, port: int) -> str:
        if self._dir is None:
            return ""
        try:
            lines = (self._dir / str(port) / "redis.log").read_text(errors="replace")
        except OSError:
            return "no log"
        return " | ".join(lines.strip().splitlines()[-3:]) or "empty log"

    def stop(self) -> None:
        """SIGTERM each server (by its pid), SIGKILL after 5 s, remove the data. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs = []
        self.ports = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
