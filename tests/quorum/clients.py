"""One test body for both clients: the sync `DLM` as is, and `AsyncDLM` behind a thin
blocking facade that runs it on its own event loop thread.

The facade only forwards: every call is the AsyncDLM/AsyncLock/AsyncRequest coroutine of
the same name, awaited on the loop; callbacks receive the facade's Lock objects so tests
can compare identities. Properties are read directly (plain attribute reads of the
protocol state, as an asyncio user would do between awaits).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

KINDS = ("sync", "async")


def aio_available() -> bool:
    try:
        import redlockdlm.aio  # noqa: F401
    except ImportError:
        return False
    return True


class _Loop:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-facade",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float | None = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class AioDLM:
    """Blocking facade over `redlockdlm.aio.AsyncDLM` with the sync DLM's API."""

    def __init__(self, urls: list[str], namespace: str, **kw: Any) -> None:
        from redlockdlm.aio import AsyncDLM

        self._lp = _Loop()
        self._locks: dict[int, AioLock] = {}

        async def make() -> AsyncDLM:
            d = AsyncDLM(urls, namespace, **kw)
            await d.__aenter__()
            return d

        try:
            self.adlm = self._lp.run(make())
        except BaseException:
            self._lp.stop()
            raise

    # the wrappers
    def _wrap(self, alock: Any) -> AioLock:
        w = self._locks.get(id(alock))
        if w is None or w._a is not alock:
            w = AioLock(self, alock)
            self._locks[id(alock)] = w
        return w

    def _cb(self, fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        if fn is None:
            return None
        return lambda lock: fn(self._wrap(lock))

    def _kw(self, kw: dict[str, Any]) -> dict[str, Any]:
        kw = dict(kw)
        for name in ("on_granted", "on_lost"):
            if name in kw:
                kw[name] = self._cb(kw[name])
        if isinstance(kw.get("parent"), AioLock):
            kw["parent"] = kw["parent"]._a
        return kw

    def run(self, coro: Any) -> Any:
        return self._lp.run(coro)

    # the API
    @property
    def owner(self) -> str:
        return self.adlm.owner

    @property
    def quorum(self) -> int:
        return self.adlm.quorum

    @property
    def _core(self) -> Any:
        return self.adlm._core

    def lock(self, resource: Any, mode: Any = "EX", **kw: Any) -> AioLock:
        return self._wrap(self.run(self.adlm.lock(resource, mode, **self._kw(kw))))

    def enqueue(self, resource: Any, mode: Any = "EX", **kw: Any) -> AioRequest:
        return AioRequest(self, self.run(self.adlm.enqueue(resource, mode, **self._kw(kw))))

    def mutex(self, resource: Any, mode: Any = "EX", **kw: Any) -> AioMutex:
        return AioMutex(self, self.adlm.mutex(resource, mode, **self._kw(kw)))

    def close(self) -> None:
        self.run(self.adlm.close())

    def shutdown(self) -> None:
        """Close, then stop the loop thread (test teardown; the facade is dead after)."""
        try:
            self.run(self.adlm.close())
        finally:
            self._lp.stop()

    def __enter__(self) -> AioDLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop_renewal(self) -> None:
        """Tests: the holder stops renewing (a hung process)."""
        self.adlm._renew_tick = lambda: None


class AioRequest:
    def __init__(self, dlm: AioDLM, areq: Any) -> None:
        self._d = dlm
        self._a = areq
        self.lock = dlm._wrap(areq.lock)

    @property
    def done(self) -> bool:
        return self._a.done

    def wait(self, timeout: float | None = None) -> AioLock:
        return self._d._wrap(self._d.run(self._a.wait(timeout)))

    def cancel(self) -> None:
        self._d.run(self._a.cancel())


class AioLock:
    def __init__(self, dlm: AioDLM, alock: Any) -> None:
        self._d = dlm
        self._a = alock

    def __getattr__(self, name: str) -> Any:  # id, mode, token, value, valid, ...
        return getattr(self._a, name)

    @property
    def value(self) -> bytes | None:
        return self._a.value

    @value.setter
    def value(self, data: bytes) -> None:
        self._a.value = data

    def lock(self, resource: Any, mode: Any = "EX", **kw: Any) -> AioLock:
        return self._d.lock(resource, mode, parent=self, **kw)

    def enqueue(self, resource: Any, mode: Any = "EX", **kw: Any) -> AioRequest:
        return self._d.enqueue(resource, mode, parent=self, **kw)

    def convert(self, mode: Any, **kw: Any) -> None:
        self._d.run(self._a.convert(mode, **kw))

    def release(self, **kw: Any) -> None:
        self._d.run(self._a.release(**kw))

    def extend(self, lease_ms: int | None = None) -> None:
        self._d.run(self._a.extend(lease_ms))

    def __enter__(self) -> AioLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._d.run(self._a.__aexit__(*exc))

    def __repr__(self) -> str:
        return f"<AioLock {self._a!r}>"


class AioMutex:
    """Blocking facade over `redlockdlm.aio.AsyncMutex` with `Mutex`'s API."""

    def __init__(self, dlm: AioDLM, amutex: Any) -> None:
        self._d = dlm
        self._a = amutex

    @property
    def lock(self) -> AioLock | None:
        return None if self._a.lock is None else self._d._wrap(self._a.lock)

    def owned(self) -> bool:
        return self._a.owned()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._d.run(self._a.acquire(blocking, timeout))

    def release(self) -> None:
        self._d.run(self._a.release())

    def locked(self) -> bool:
        return self._d.run(self._a.locked())

    def __enter__(self) -> AioMutex:
        self._d.run(self._a.__aenter__())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._d.run(self._a.__aexit__(*exc))


def make_client(kind: str, urls: list[str], namespace: str, **kw: Any) -> Any:
    if kind == "sync":
        from redlockdlm import DLM

        return DLM(urls, namespace, **kw)
    return AioDLM(urls, namespace, **kw)


def stop_renewal(d: Any) -> None:
    """Make client `d` stop renewing its leases, as a hung process would."""
    if isinstance(d, AioDLM):
        d.stop_renewal()
    else:
        d._renew_tick = lambda: None
