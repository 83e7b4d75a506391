"""Lock scenarios built directly with `Engine.request` on each instance, for the detector and
CLI tests (no quorum client involved, so each instance's state is exactly what the test
says).

    c = Cluster(instances3)                       # one Engine per server, init fresh
    c.request("a", "a1", ("R1",), "EX", ticket=1)             # on every instance
    c.request("b", "b2", ("R1",), "EX", ticket=4, on=[0])     # on instance 0 only
    with c.listen("b") as events:                  # the owner's channel on every instance
        ...
        events.wait_for(b"C|b2|deadlock", count=3)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from redis_harness import Instances

from redlockdlm.engine.codec import LockView
from redlockdlm.engine.instance import Engine
from redlockdlm.engine.modes import Status

NS = "t"
LEASE_MS = 30_000


class Cluster:
    def __init__(self, inst: Instances, namespace: str = NS) -> None:
        self.inst = inst
        self.namespace = namespace
        self.engines = [Engine(c, namespace) for c in inst.clients()]
        for e in self.engines:
            e.init_fresh()

    @property
    def urls(self) -> list[str]:
        return self.inst.urls

    def _on(self, on: Iterable[int] | None) -> list[int]:
        return list(range(len(self.engines))) if on is None else list(on)

    def key(self, path: Sequence[str]) -> bytes:
        return self.engines[0].key(*path)

    def request(self, owner: str, lock_id: str, path: Sequence[str], mode: str, *, ticket: int,
                on: Iterable[int] | None = None, flags: int = 0, lease_ms: int = LEASE_MS,
                parent: tuple[Sequence[str], str] | None = None,
                priority: int = 0) -> list[Status]:
        out = []
        for i in self._on(on):
            e = self.engines[i]
            kw = {}
            if parent is not None:
                kw = {"parent_key": e.key(*parent[0]), "parent_id": parent[1]}
            out.append(e.request(e.key(*path), owner, lock_id, mode, ticket=ticket,
                                 lease_ms=lease_ms, flags=flags, name=e.name(*path),
                                 priority=priority, **kw).status)
        return out

    def convert(self, owner: str, lock_id: str, path: Sequence[str], mode: str, *,
                ticket: int, on: Iterable[int] | None = None, flags: int = 0) -> list[Status]:
        return [self.engines[i].convert(self.key(path), owner, lock_id, mode, ticket=ticket,
                                        lease_ms=LEASE_MS, flags=flags).status
                for i in self._on(on)]

    def lock(self, i: int, path: Sequence[str], lock_id: str) -> LockView | None:
        """Instance i's view of one lock (None if absent)."""
        _, (view,) = self.engines[i].inspect([self.key(path)])
        if view is None:
            return None
        return next((lk for lk in view.locks if lk.lock_id == lock_id), None)

    def queues(self, path: Sequence[str], lock_id: str) -> list[str | None]:
        """The queue ('G', 'C', 'W') of one lock on every instance (None where absent)."""
        return [None if (lk := self.lock(i, path, lock_id)) is None else lk.queue
                for i in range(len(self.engines))]

    def listen(self, owner: str) -> Listener:
        return Listener(self, owner)


class Listener:
    """The pub/sub channel of one owner on every instance."""

    def __init__(self, cluster: Cluster, owner: str) -> None:
        chan = b"dlm:" + cluster.namespace.encode() + b":ch:" + owner.encode()
        self.subs = []
        for e in cluster.engines:
            p = e.client.pubsub()
            p.subscribe(chan)
            p.get_message(timeout=1.0)  # the subscribe confirmation
            self.subs.append(p)
        self.received: list[bytes] = []

    def poll(self, timeout: float = 0.05) -> list[bytes]:
        for p in self.subs:
            while True:
                m = p.get_message(timeout=timeout)
                if m is None:
                    break
                if m["type"] == "message":
                    self.received.append(m["data"])
        return self.received

    def wait_for(self, data: bytes, count: int = 1, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while self.received.count(data) < count and time.monotonic() < deadline:
            self.poll()
        return self.received

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.subs:
            p.close()
