"""Fan-out over every instance: one call on each instance's Engine, in parallel.

What the operator views (`redlockdlm.admin`), the deadlock detector and the `dlm` command
share to reach every instance. An instance that fails is reported as such
(`InstanceResult.error`, one line) instead of failing the whole call.

    targets = connect(["redis://127.0.0.1:7001", ...], "shop", timeout_s=2.0)
    fan_out(targets, lambda engine: engine.status())
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .connection import Instance
from .engine.instance import Engine
from .errors import DLMError, InvalidArgument
from .protocol import describe, from_redis_py

T = TypeVar("T")



@dataclass(frozen=True)
class Target:
    """One instance as operators see it: a display label (password masked) and its Engine."""

    label: str
    engine: Engine


def connect(urls: Sequence[str], namespace: str = "default", *,
            timeout_s: float = 2.0) -> list[Target]:
    """An Engine per URL. Nothing is sent yet; a malformed URL or namespace raises
    InvalidArgument. Connections fail fast: `timeout_s` to connect and per reply, and no
    retries, so an unreachable instance costs one timeout, not a backoff schedule."""
    if not urls:
        raise InvalidArgument("no instances: give at least one redis:// URL")
    out = []
    for url in urls:
        inst = Instance(url, socket_timeout=timeout_s, connect_timeout=timeout_s,
                        retry=Retry(NoBackoff(), 0))
        out.append(Target(inst.url, Engine(inst.client, namespace)))
    return out


def label_of(engine: Engine) -> str:
    """A display label for an Engine built elsewhere (tests, embedding programs)."""
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
