"""Real ``redis-server`` processes for tests, on free loopback ports.

This is the project's shipped test harness (an importable module, not a conftest)::

    from redis_harness import Instances, RedisServer

    with RedisServer() as srv:               # one server, data dir in a temp folder
        srv.client().set(b"k", b"v")
        srv.pause(); srv.resume()            # SIGSTOP / SIGCONT
        srv.restart(empty=True)              # SIGKILL, wipe data, start on the same port

    with Instances(3) as inst:               # three independent servers
        inst.urls                            # ["redis://127.0.0.1:P1", ...]

Every server binds 127.0.0.1 only, is signalled by its own pid only, and is killed on
interpreter exit if a test forgot to stop it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "HOST",
    "Instances",
    "RedisClusterServer",
    "RedisServer",
    "RedisServerError",
    "find_redis_server",
    "free_port",
    "no_retry",
]

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0
STOP_GRACE = 5.0
_LOG_TAIL_LINES = 40


class RedisServerError(RuntimeError):
    """A redis-server could not be found, started or stopped."""


# --------------------------------------------------------------------------- helpers


def find_redis_server() -> str:
    """Path of the ``redis-server`` binary, or raise :class:`RedisServerError`.

    ``$REDIS_SERVER`` overrides the search; otherwise ``PATH`` and the usual install
    locations are tried.
    """
    override = os.environ.get("REDIS_SERVER")
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise RedisServerError(f"$REDIS_SERVER={override!r} is not an executable file")
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in (
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
        "/usr/sbin/redis-server",
    ):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RedisServerError(
        "redis-server not found on PATH: run `bash scripts/setup.sh` "
        "(it installs redis-server with apt-get), or set $REDIS_SERVER"
    )


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(attempts: int = 20) -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind port 0, close, re-check).

    There is an unavoidable race between this call and the server's own bind;
    :class:`RedisServer` retries with a new port when that race is lost.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if _port_is_free(port):
            return port
    raise RedisServerError(f"no free port on {HOST} after {attempts} attempts")


def no_retry() -> Retry:
    """A redis-py retry policy that never retries (redis-py 6+ retries by default).

    Harness clients fail at once so that a paused or killed server shows as an error
    within the socket timeout instead of after seconds of backoff.
    """
    return Retry(NoBackoff(), 0)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty log>"


# --------------------------------------------------------------------------- registry

_registry_lock = threading.Lock()
_live: dict[int, RedisServer] = {}  # id(server) -> server, for servers not yet stopped


def _register(server: RedisServer) -> None:
    with _registry_lock:
        _live[id(server)] = server


def _unregister(server: RedisServer) -> None:
    with _registry_lock:
        _live.pop(id(server), None)


@atexit.register
def _kill_all_at_exit() -> None:
    with _registry_lock:
        servers = list(_live.values())
        _live.clear()
    for server in servers:
        with contextlib.suppress(Exception):
            server._kill_process()
        with contextlib.suppress(Exception):
            shutil.rmtree(server.base_dir, ignore_errors=True)


# --------------------------------------------------------------------------- server


class RedisServer:
    """One ``redis-server`` subprocess on 127.0.0.1 with its own temporary data dir.

    ``extra_args`` are appended to the command line, e.g.
    ``["--appendonly", "yes", "--appendfsync", "always"]`` or ``["--requirepass", "pw"]``.
    The server is started by the constructor unless ``start=False``.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        start: bool = True,
        startup_timeout: float = STARTUP_TIMEOUT,
        executable: str | None = None,
    ) -> None:
        self.extra_args = [str(a) for a in extra_args]
        lowered = [a.lower() for a in self.extra_args]
        if "--bind" in lowered:
            raise ValueError("RedisServer always binds 127.0.0.1; do not pass --bind")
        self.password: str | None = None
        if "--requirepass" in lowered:
            i = lowered.index("--requirepass")
            if i + 1 < len(self.extra_args):
                self.password = self.extra_args[i + 1]
        self.executable = executable or find_redis_server()
        self.startup_timeout = startup_timeout
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.base_dir = Path(tempfile.mkdtemp(prefix="redlockdlm-redis-"))
        self.data_dir = self.base_dir / "data"
        self.data_dir.mkdir()
        self.log_path = self.base_dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._clients: list[redis.Redis] = []
        if start:
            self.start()

    # ---------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("running" if self.running else "stopped")
        return f"<RedisServer {self.url} pid={self.pid} {state}>"

    # ---------------------------------------------------------------- lifecycle

    def command_line(self) -> list[str]:
        # fmt: off
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]
        # fmt: on

    def start(self) -> RedisServer:
        """Start the server (no-op if running) and wait until it answers PING."""
        if self.running:
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                return self
            except RedisServerError:
                if attempt + 1 < attempts and "Address already in use" in _tail(self.log_path):
                    self.port = free_port()  # lost the free_port() race: try another port
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting on port {self.port} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                close_fds=True,
            )
        self.paused = False
        _register(self)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RedisServerError(
                    f"redis-server on port {self.port} exited with {code} during startup;"
                    f" log tail:\n{_tail(self.log_path)}"
                )
            if self._ping_once():
                return
            time.sleep(0.02)
        self._kill_process()
        raise RedisServerError(
            f"redis-server on port {self.port} did not answer PING within "
            f"{self.startup_timeout:.0f}s; log tail:\n{_tail(self.log_path)}"
        )

    def _ping_once(self) -> bool:
        conn = redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=no_retry(),
        )
        try:
            return bool(conn.ping())
        except redis.exceptions.BusyLoadingError:
            return False  # still loading its AOF/RDB: not ready yet
        except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError):
            return True  # it answered (e.g. NOAUTH): the server is up
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            return False
        finally:
            conn.close()

    def _signal(self, sig: int) -> None:
        # Popen.send_signal refuses to signal a process it has already reaped,
        # so a recycled pid is never hit.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def _kill_process(self) -> None:
        """SIGKILL our own pid and reap it."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_GRACE)
        self.paused = False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; wait; remove the temporary dir. Idempotent."""
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self._signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                self.paused = False
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._kill_process()
        _unregister(self)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server (simulated crash). Its data dir is kept; ``start()`` revives it."""
        self._kill_process()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing."""
        if not self.running:
            raise RedisServerError(f"{self!r} is not running")
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def restart(self, empty: bool = True) -> RedisServer:
        """SIGKILL, then start again on the same port.

        ``empty=True`` deletes the data dir's contents first (a restart that lost everything);
        ``empty=False`` keeps them, so an AOF (``--appendonly yes``) is reloaded.
        """
        self._kill_process()
        if empty:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = True
        return self.start()

    # ---------------------------------------------------------------- clients

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` on this server.

        Defaults: bytes replies, connect timeout 2 s, socket timeout 10 s, no retries
        (pass ``retry=`` to override); any keyword overrides these.
        """
        opts: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "decode_responses": False,
            "socket_connect_timeout": 2.0,
            "socket_timeout": 10.0,
            "retry": no_retry(),
        }
        if self.password is not None:
            opts["password"] = self.password
        opts.update(kwargs)
        c = redis.Redis(**opts)
        self._clients.append(c)
        return c

    def flushall(self) -> None:
        c = redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_connect_timeout=2.0,
            socket_timeout=10.0,
            retry=no_retry(),
        )
        try:
            c.flushall()
        finally:
            c.close()

    def heal(self) -> None:
        """Undo faults a test may have left: resume if paused, start if dead."""
        if self.paused:
            self.resume()
        if not self.running:
            self.start()

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- instances


class Instances:
    """``n`` independent RedisServer processes (no replication between them)."""

    def __init__(self, n: int, extra_args: Sequence[str] = (), **server_kwargs: Any) -> None:
        if n < 1:
            raise ValueError("need at least one instance")
        self.servers: list[RedisServer] = []
        try:
            for _ in range(n):
                self.servers.append(RedisServer(extra_args, **server_kwargs))
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def clients(self, **kwargs: Any) -> list[redis.Redis]:
        return [s.client(**kwargs) for s in self.servers]

    def init_fresh(self, namespace: str) -> None:
        """Mark every server brand new for redlockdlm's `namespace` (E1: a server that never
        granted a lock has no rejoin window to wait out)."""
        from redlockdlm.engine.instance import Engine  # (the rest of the harness needs none)

        for s in self.servers:
            Engine(s.client(), namespace).init_fresh()

    def __len__(self) -> int:
        return len(self.servers)

    def __getitem__(self, i: int) -> RedisServer:
        return self.servers[i]

    def __iter__(self) -> Iterator[RedisServer]:
        return iter(self.servers)

    def __repr__(self) -> str:
        return f"<Instances {self.urls}>"

    def reset(self) -> None:
        """Heal every server (resume/start) and FLUSHALL it."""
        for s in self.servers:
            s.heal()
            s.flushall()

    def stop(self) -> None:
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.stop()

    def __enter__(self) -> Instances:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_line(stream, needle: str, timeout: float = 10.0) -> str:
    """The first line of a process's `stream` containing `needle` (readline blocks: bounded
    by the test's timeout when the process hangs)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not seen in {seen!r}")


def dlm_env(**extra: str) -> dict[str, str]:
    """This process's environment without any DLM_* variable (a `dlm` process a test starts
    sees only what the test gives it), plus `extra`."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    e.update(extra)
    return e


# --------------------------------------------------------------------------- Redis Cluster


class RedisClusterServer:
    """A Redis Cluster of ``n`` primaries on 127.0.0.1, each with ``replicas`` replicas (0 or
    1): ONE quorum member.

    Each node is a :class:`RedisServer` with ``--cluster-enabled yes``, its bus on a port of
    its own (``--cluster-port``, Redis >= 7.0) and its ``nodes.conf`` outside its data dir,
    so that :meth:`restart_node_empty` brings a node back on the same ports with an empty
    data set but the same node id and the same slots (a primary without persistence that
    crashed). The slots are split in ``n`` contiguous ranges (CLUSTER ADDSLOTSRANGE), one
    per *shard*, the nodes joined by CLUSTER MEET, each replica attached to its shard's
    primary by CLUSTER REPLICATE, and the constructor returns when every node reports
    ``cluster_state:ok`` and knows every node and every replica's link is up (bounded by
    ``timeout``)::

        with RedisClusterServer(3, replicas=1) as rc:
            rc.client()                 # a redis.RedisCluster
            rc.node_of_slot(1234)       # the shard (index) serving that slot
            rc.nodes[i], rc.replicas[i] # shard i's primary and its replica (or None)
            rc.failover(1)              # shard 1's primary killed, its replica promoted
            rc.crash_primary(1)         # the same by the cluster's own vote (automatic)
            rc.restart_node_empty(1)

    ``nodes[i]`` is always shard i's current primary: :meth:`failover` swaps it with
    ``replicas[i]``, and :meth:`reset` restarts the old primary, which rejoins as the new
    primary's replica.
    """

    SLOTS = 16384

    def __init__(self, n: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000,
                 timeout: float = 20.0) -> None:
        if n < 1:
            raise ValueError("need at least one node")
        if replicas not in (0, 1):
            raise ValueError("replicas is 0 or 1")
        self.timeout = timeout
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        self.replicas: list[RedisServer | None] = [None] * n
        self.ranges: list[tuple[int, int]] = []
        per = self.SLOTS // n
        try:
            for i in range(n):
                self.nodes.append(self._new_node())
                lo = i * per
                hi = self.SLOTS - 1 if i == n - 1 else lo + per - 1
                self.ranges.append((lo, hi))
            if replicas:
                self.replicas = [self._new_node() for _ in range(n)]
            for node, (lo, hi) in zip(self.nodes, self.ranges):
                with contextlib.closing(self._raw(node)) as c:
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            with contextlib.closing(self._raw(self.nodes[0])) as c:
                for node in self._all()[1:]:
                    c.execute_command("CLUSTER", "MEET", HOST, node.port,
                                      self._bus_port(node))
            for primary, replica in zip(self.nodes, self.replicas):
                if replica is not None:
                    self._replicate(replica, primary)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        self._clients: list[redis.RedisCluster] = []
        #: seconds from the kill to the promotion, in the last :meth:`crash_primary`
        self.promoted_s: float | None = None

    def _new_node(self) -> RedisServer:
        node = RedisServer(start=False)
        node.extra_args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node.base_dir / "nodes.conf"),
            "--cluster-port", str(free_port()),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--repl-diskless-sync-delay", "0",  # (a replica's full sync starts at once)
        ]
        node.start()
        return node

    def _all(self) -> list[RedisServer]:
        """Every node: the primaries, then the replicas."""
        return self.nodes + [r for r in self.replicas if r is not None]

    def _replicate(self, replica: RedisServer, primary: RedisServer) -> None:
        """CLUSTER REPLICATE `primary` on `replica`, once the replica has learnt of it by
        gossip (it answers "Unknown node" before)."""
        with contextlib.closing(self._raw(primary)) as c:
            pid = c.execute_command("CLUSTER", "MYID")
        deadline = time.monotonic() + self.timeout
        with contextlib.closing(self._raw(replica)) as c:
            while True:
                try:
                    c.execute_command("CLUSTER", "REPLICATE", pid)
                    return
                except redis.exceptions.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    @staticmethod
    def _bus_port(node: RedisServer) -> int:
        return int(node.extra_args[node.extra_args.index("--cluster-port") + 1])

    @staticmethod
    def _raw(node: RedisServer) -> redis.Redis:
        return redis.Redis(host=HOST, port=node.port, socket_connect_timeout=2.0,
                           socket_timeout=10.0, retry=no_retry())

    @property
    def url(self) -> str:
        """The member's URL: any node's address (shard 0's primary's)."""
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"<RedisClusterServer {[n.url for n in self.nodes]}>"

    def node_of_slot(self, slot: int) -> int:
        """The index of the node whose range holds `slot` (as created; nothing reshards)."""
        for i, (lo, hi) in enumerate(self.ranges):
            if lo <= slot <= hi:
                return i
        raise ValueError(f"no node serves slot {slot}")

    @staticmethod
    def _cluster_info(c: redis.Redis) -> bytes:
        info = c.execute_command("CLUSTER", "INFO")
        if isinstance(info, dict):
            info = "".join(f"{k}:{v}\r\n" for k, v in info.items()).encode()
        return info if isinstance(info, bytes) else str(info).encode()

    def _node_ok(self, node: RedisServer, shard: int, replica: bool) -> str | None:
        """None if `node` says cluster_state:ok, knows every node, counts every shard as
        serving slots and sees each shard's range served by that shard's current primary
        (a replica also has its link to shard `shard`'s primary up); else what is not so."""
        want_known = len(self._all())
        try:
            with contextlib.closing(self._raw(node)) as c:
                info = self._cluster_info(c)
                for want in (b"cluster_state:ok\r", f"cluster_known_nodes:{want_known}\r".encode(),
                             f"cluster_size:{len(self.nodes)}\r".encode()):
                    if want not in info:
                        return f"{node.port}: no {want.decode().strip()} in CLUSTER INFO"
                slots = c.execute_command("CLUSTER", "SLOTS")
                for (lo, _), primary in zip(self.ranges, self.nodes):
                    owners = [int(r[2][1]) for r in slots if int(r[0]) <= lo <= int(r[1])]
                    if owners != [primary.port]:
                        return f"{node.port}: slot {lo} served by {owners}, not {primary.port}"
                if replica:
                    rep = c.info("replication")
                    if (rep.get("role") != "slave" or rep.get("master_link_status") != "up"
                            or int(rep.get("master_port", 0)) != self.nodes[shard].port):
                        return (f"{node.port}: role {rep.get('role')}, link "
                                f"{rep.get('master_link_status')} to {rep.get('master_port')}"
                                f", not up to {self.nodes[shard].port}")
        except (redis.exceptions.RedisError, OSError, IndexError, ValueError) as exc:
            return f"{node.port}: {exc!r}"
        return None

    def _not_ok(self) -> str | None:
        """What `wait_ok` still waits for (the first node not ok), or None."""
        for i, node in enumerate(self.nodes):
            if node.running and (why := self._node_ok(node, i, False)):
                return why
        for i, node in enumerate(self.replicas):
            if node is not None and node.running and (why := self._node_ok(node, i, True)):
                return why
        return None

    def wait_ok(self, timeout: float | None = None) -> None:
        """Until every running node says ``cluster_state:ok`` (every slot served by a node
        it does not consider failed), knows all the nodes, counts every shard as serving
        slots and maps each shard's slots to its current primary (``nodes[i]``), and every
        running replica's link to its primary is up (a full sync done);
        RedisServerError after `timeout` seconds, saying what was still not so."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            why = self._not_ok()
            if why is None:
                return
            if time.monotonic() > deadline:
                raise RedisServerError(f"{self!r} did not reach cluster_state:ok ({why})")
            time.sleep(0.05)

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A ``redis.RedisCluster`` on these nodes (bytes replies, timeouts as
        :meth:`RedisServer.client`); keywords override."""
        opts: dict[str, Any] = {
            "startup_nodes": [redis.cluster.ClusterNode(h, p) for h, p in self.startup_nodes],
            "decode_responses": False,
            "socket_connect_timeout": 2.0,
            "socket_timeout": 10.0,
        }
        opts.update(kwargs)
        c = redis.RedisCluster(**opts)
        self._clients.append(c)
        return c

    def flushall(self) -> None:
        """FLUSHALL every primary (the replicas follow): a fresh member for the next test."""
        for node in self.nodes:
            with contextlib.closing(self._raw(node)) as c:
                c.flushall()

    def reset(self) -> None:
        """Start any node a test left dead or paused (a primary that failed over rejoins as
        its shard's replica), wait for the cluster and the replicas' links, then FLUSHALL
        it."""
        started = False
        for node in self._all():
            if node.paused:
                node.resume()
            if not node.running:
                node.start()
                started = True
        if started or any(r is not None for r in self.replicas):
            self.wait_ok()
        self.flushall()

    def migrate_slot(self, slot: int, src: int, dst: int) -> None:
        """Move `slot` with its keys from node `src` to node `dst`, as `redis-cli --cluster
        reshard` does (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE on both)."""
        s, d = (self._raw(self.nodes[i]) for i in (src, dst))
        with contextlib.closing(s), contextlib.closing(d):
            d_id = d.execute_command("CLUSTER", "MYID")
            s_id = s.execute_command("CLUSTER", "MYID")
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", s_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", d_id)
            keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            if keys:
                s.execute_command("MIGRATE", HOST, self.nodes[dst].port, "", 0, 5000, "KEYS",
                                  *keys)
            for c in (d, s):
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", d_id)
        # as redis-cli does, tell the other primaries too, then wait until every running
        # node maps the slot to `dst`: a node that learns it only by gossip would answer
        # CLUSTER SLOTS with the old owner meanwhile, and a client re-reading the topology
        # there would go back to it (CI saw this)
        for i, node in enumerate(self.nodes):
            if i not in (src, dst) and node.running and not node.paused:
                with contextlib.closing(self._raw(node)) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", d_id)
        self._wait_slot_owner(slot, self.nodes[dst].port)

    def _wait_slot_owner(self, slot: int, port: int, timeout: float = 10.0) -> None:
        """Until every running node's CLUSTER SLOTS maps `slot` to the node on `port`;
        RedisServerError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            agreed = True
            for node in self._all():
                if node is None or not node.running or node.paused:
                    continue
                with contextlib.closing(self._raw(node)) as c:
                    owners = [int(r[2][1]) for r in c.execute_command("CLUSTER", "SLOTS")
                              if int(r[0]) <= slot <= int(r[1])]
                if owners != [port]:
                    agreed = False
                    break
            if agreed:
                return
            if time.monotonic() > deadline:
                raise RedisServerError(f"the nodes of {self!r} do not agree that slot "
                                       f"{slot} is served on port {port}")
            time.sleep(0.02)

    def kill_node(self, i: int) -> None:
        """SIGKILL shard `i`'s primary (its slots are then served by nobody, until a
        failover)."""
        self.nodes[i].kill()

    def restart_node_empty(self, i: int) -> None:
        """SIGKILL node `i`, wipe its data, start it on the same ports: it rejoins as the
        same node (its nodes.conf is kept) serving the same slots, with nothing in them.
        Returns when the cluster is ok again."""
        self.nodes[i].restart(empty=True)
        self.wait_ok()

    def synced(self, i: int, timeout: float = 5.0) -> None:
        """Until shard `i`'s replica has every write its primary had when called (the
        replica's acknowledged offset reaches the primary's); RedisServerError after
        `timeout` seconds."""
        replica = self.replicas[i]
        if replica is None:
            raise RedisServerError(f"shard {i} of {self!r} has no replica")
        with contextlib.closing(self._raw(self.nodes[i])) as c:
            want = int(c.info("replication")["master_repl_offset"])
            deadline = time.monotonic() + timeout
            while True:
                acked = [int(v["offset"]) for k, v in c.info("replication").items()
                         if k.startswith("slave") and isinstance(v, dict)
                         and int(v["port"]) == replica.port]
                if acked and acked[0] >= want:
                    return
                if time.monotonic() > deadline:
                    raise RedisServerError(f"shard {i}'s replica did not catch up")
                time.sleep(0.01)

    def cut_replica(self, i: int) -> None:
        """Shard `i`'s replica stops receiving writes: it is paused (SIGSTOP) and the
        primary closes its replication link (CLIENT KILL TYPE replica), so nothing written
        after this reaches it, not even from a socket buffer. :meth:`failover` resumes
        it; :meth:`reset` reconnects it."""
        replica = self.replicas[i]
        if replica is None:
            raise RedisServerError(f"shard {i} of {self!r} has no replica")
        replica.pause()
        with contextlib.closing(self._raw(self.nodes[i])) as c:
            c.execute_command("CLIENT", "KILL", "TYPE", "replica")

    def failover(self, i: int, *, timeout: float | None = None) -> float:
        """Shard `i`'s primary crashes (SIGKILL) and its replica takes over (CLUSTER
        FAILOVER TAKEOVER: no vote of the other primaries, as an operator forces it when
        the primary is gone). The replica keeps what it had received: writes it had not
        are lost, as in a real failover. Afterwards ``nodes[i]`` is the promoted node and
        ``replicas[i]`` the dead old primary (:meth:`reset` restarts it as a replica).
        Returns when every running node maps the shard's slots to the promoted node and
        says ``cluster_state:ok`` (a redis-py cluster client is then redirected there by
        MOVED, or finds it when it re-reads the topology); the seconds that took, from the
        kill. Bounded by `timeout` (default: the cluster's)."""
        old, new = self.nodes[i], self.replicas[i]
        if new is None or not new.running:
            raise RedisServerError(f"shard {i} of {self!r} has no running replica")
        t0 = time.monotonic()
        old.kill()
        if new.paused:
            new.resume()
        with contextlib.closing(self._raw(new)) as c:
            c.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            # TAKEOVER is carried out later, in the node's cron; under load it has been
            # seen not to happen: ask again while the node is still a replica
            deadline = time.monotonic() + 5.0
            while c.info("replication").get("role") != "master":
                if time.monotonic() > t0 + self.timeout:
                    raise RedisServerError(f"{new!r} did not take over shard {i}")
                if time.monotonic() > deadline:
                    c.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
                    deadline = time.monotonic() + 5.0
                time.sleep(0.02)
        self.nodes[i], self.replicas[i] = new, old
        self.wait_ok(timeout)
        return time.monotonic() - t0

    def crash_primary(self, i: int, *, timeout: float | None = None) -> float:
        """Shard `i`'s primary crashes (SIGKILL) and the cluster fails it over by itself,
        as in production: the other primaries flag it failed after ``cluster-node-timeout``
        (``node_timeout_ms``), its replica wins their vote and is promoted (no operator's
        CLUSTER FAILOVER). As :meth:`failover`, the replica keeps what it had received,
        ``nodes[i]`` becomes the promoted node and ``replicas[i]`` the dead old primary.
        Returns when every running node maps the shard's slots to the promoted node and
        says ``cluster_state:ok``: the seconds from the kill (``promoted_s``: the seconds
        until the replica said it was a primary). RedisServerError after `timeout` seconds
        (default: the cluster's), saying what was not so; if the replica was not promoted
        by then, ``nodes[i]`` is still the dead primary."""
        old, new = self.nodes[i], self.replicas[i]
        if new is None or not new.running or new.paused:
            raise RedisServerError(f"shard {i} of {self!r} has no running replica")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        t0 = time.monotonic()
        old.kill()
        with contextlib.closing(self._raw(new)) as c:
            while c.info("replication").get("role") != "master":
                if time.monotonic() > deadline:
                    raise RedisServerError(f"{new!r} was not promoted for shard {i} "
                                           f"({self._not_ok()})")
                time.sleep(0.02)
        self.promoted_s = time.monotonic() - t0
        self.nodes[i], self.replicas[i] = new, old
        self.wait_ok(max(0.0, deadline - time.monotonic()))
        return time.monotonic() - t0

    def stop(self) -> None:
        for c in getattr(self, "_clients", ()):
            with contextlib.suppress(Exception):
                c.close()
        for node in self._all():
            with contextlib.suppress(Exception):
                node.stop()

    def __enter__(self) -> RedisClusterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
