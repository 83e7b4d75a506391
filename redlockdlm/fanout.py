"""Fan-out over every instance: one call on each instance's Engine, in parallel.

What the operator views (`redlockdlm.admin`), the deadlock detector and the `dlm` command
share to reach every instance. An instance that fails is reported as such
(`InstanceResult.error`, one line) instead of failing the whole call.

    targets = connect(["redis://127.0.0.1:7001", ...], "shop", timeout_s=2.0)
    fan_out(targets, lambda engine: engine.status())
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .connection import Instance, cluster_client, cluster_node_ids
from .engine.instance import Engine
from .engine.keys import check_name, check_namespace, resource_key
from .errors import DLMError, InvalidArgument
from .protocol import describe, from_redis_py

T = TypeVar("T")


class Target:
    """One instance as operators see it: a display label (password masked) and its Engine.

    A Target made by `connect` learns the instance's kind at its first use (`engine`): the
    server at the URL is asked `INFO cluster`; a node of a Redis Cluster (a quorum member
    that is a cluster, H2c) gets an Engine over a `redis.RedisCluster` (every shard, each
    call routed to its slot's primary), a standalone server an Engine over a `redis.Redis`.
    Until the server has answered once, `engine` raises what reaching it raised (in
    `fan_out`: that instance's error) and asks again at the next use, so a long-running
    detector reaches a member that was down at its start as what it is."""

    __slots__ = ("label", "ns", "_engine", "_open", "_lock")

    def __init__(self, label: str, engine: Engine | None = None, *,
                 open_: Callable[[], Engine] | None = None, namespace: str = "default"
                 ) -> None:
        if (engine is None) == (open_ is None):
            raise InvalidArgument("a Target needs an Engine or a way to open one")
        self.label = label
        self.ns = engine.ns if engine is not None else check_namespace(namespace)
        self._engine = engine
        self._open = open_
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The instance's Engine, opened (and its kind found) at the first use."""
        engine = self._engine
        if engine is None:
            with self._lock:
                engine = self._engine
                if engine is None:
                    assert self._open is not None
                    engine = self._engine = self._open()
        return engine

    def key(self, *path: str | bytes) -> bytes:
        """The key of resource `path` (root first) in this namespace: sends nothing."""
        return resource_key(self.ns, [check_name(p) for p in path])

    def __repr__(self) -> str:
        return f"Target({self.label!r})"


def _opener(inst: Instance, url: str, namespace: str, timeout_s: float
            ) -> Callable[[], Engine]:
    def open_() -> Engine:
        try:  # (CLUSTER SLOTS, as the clients ask: `dlm acl`'s rule allows it)
            slots = inst.client.execute_command("CLUSTER", "SLOTS")
        except redis.ResponseError as exc:
            slots = exc
        if cluster_node_ids(slots) is not None:
            # (one retry without backoff: the slot map is refreshed once after a MOVED or
            # a failover; a shard that stays down fails within the timeouts)
            rc = cluster_client(redis.RedisCluster, (url, {
                "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                "retry": Retry(NoBackoff(), 1)}))
            inst.pool.disconnect()
            return Engine(rc, namespace)
        return Engine(inst.client, namespace)
    return open_


def connect(urls: Sequence[str], namespace: str = "default", *,
            timeout_s: float = 2.0) -> list[Target]:
    """A Target per URL. Nothing is sent yet (each instance's kind, standalone or Redis
    Cluster, is found at its first use: `Target.engine`); a malformed URL or namespace
    raises InvalidArgument. Connections fail fast: `timeout_s` to connect and per reply,
    and no retries (a cluster member: one, to follow a slot that moved), so an unreachable
    instance costs one timeout, not a backoff schedule."""
    if not urls:
        raise InvalidArgument("no instances: give at least one redis:// URL")
    check_namespace(namespace)
    out = []
    for url in urls:
        inst = Instance(url, socket_timeout=timeout_s, connect_timeout=timeout_s,
                        retry=Retry(NoBackoff(), 0))
        out.append(Target(inst.url, open_=_opener(inst, url, namespace, timeout_s),
                          namespace=namespace))
    return out


def label_of(engine: Engine) -> str:
    """A display label for an Engine built elsewhere (tests, embedding programs)."""
    if engine.cluster:
        nodes = list(engine.client.nodes_manager.startup_nodes)
        return f"redis://{nodes[0] if nodes else '?'} (cluster)"
    kw = engine.client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}"


@dataclass(frozen=True)
class InstanceResult(Generic[T]):
    """What one instance answered: `value`, or `error` (one line) if it failed."""

    label: str
    value: T | None = None
    error: str | None = None
    #: how long the call took on this instance (answer or failure), in seconds
    elapsed_s: float = field(default=0.0, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def fan_out(targets: Sequence[Target], fn: Callable[[Engine], T], *,
            executor: Executor | None = None) -> list[InstanceResult[T]]:
    """Run `fn(engine)` on every instance in parallel; errors of redis (redis-py's own
    failures included), the OS or the scripts become `InstanceResult.error`, anything else (a
    bug) propagates."""
    def one(t: Target) -> InstanceResult[T]:
        t0 = time.perf_counter()
        try:
            value = fn(t.engine)
        except (redis.RedisError, OSError, DLMError) as exc:
            return InstanceResult(t.label, None, describe(exc), time.perf_counter() - t0)
        except Exception as exc:
            if from_redis_py(exc):
                return InstanceResult(t.label, None, describe(exc), time.perf_counter() - t0)
            raise
        return InstanceResult(t.label, value, None, time.perf_counter() - t0)

    if len(targets) == 1:
        return [one(targets[0])]
    if executor is not None:
        return list(executor.map(one, targets))
    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="dlm-fan") as pool:
        return list(pool.map(one, targets))
