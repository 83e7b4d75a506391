"""A caller that gives up leaves nothing behind.

asyncio: a call cancelled at any await point (`asyncio.wait_for`, `Task.cancel`,
`asyncio.timeout`, a failing `asyncio.TaskGroup`) withdraws on every instance what it
started (a queued request is cancelled, a lock granted meanwhile released), a cancelled
conversion that may wait leaves the lock held in its old mode, a release or close
completes; the CancelledError (or the TimeoutError it becomes) still reaches the caller.
Sync: a KeyboardInterrupt raised by a signal handler while `DLM.lock` waits does the same.
What each test checks is what a user and the DLM rules see: every instance's queues
(inspect), and whether another client is granted at once (no orphan blocks the resource).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from redlockdlm import DLM
from redlockdlm.aio import AsyncDLM
from redlockdlm.engine.modes import Mode
from redlockdlm.errors import DLMError

from .conftest import NS, Quorum, wait_until

EX, PR, NL = Mode.EX, Mode.PR, Mode.NL
STYLES = ["wait_for", "task_cancel", "timeout", "taskgroup"]
DELAY = 0.3  # the caller gives up after this long (the lock is queued by then)


def run(coro: Awaitable[Any]) -> Any:
    """Run one test body on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, 30))


def adlm(qu: Quorum) -> AsyncDLM:
    return AsyncDLM(qu.urls, NS, socket_timeout=0.5, connect_timeout=0.5)


async def give_up(style: str, make: Callable[[], Awaitable[Any]],
                  delay: float = DELAY) -> None:
    """Run `make()` and cancel it after `delay` seconds the way `style` says; assert the
    cancellation reached the caller as asyncio promises, and in bounded time."""
    if style in ("timeout", "taskgroup") and sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout and TaskGroup need Python 3.11")
    t0 = time.monotonic()
    if style == "wait_for":
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(make(), delay)
    elif style == "task_cancel":
        task = asyncio.ensure_future(make())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif style == "timeout":
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(delay):
                await make()
    else:
        async def boom() -> None:
            await asyncio.sleep(delay)
            raise RuntimeError("a sibling failed")

        with pytest.raises(ExceptionGroup) as ei:  # noqa: F821 - 3.11+
            async with asyncio.TaskGroup() as tg:
                tg.create_task(make())
                tg.create_task(boom())
        assert ei.group_contains(RuntimeError) if hasattr(ei, "group_contains") else True
    assert time.monotonic() - t0 < delay + 3.0


async def granted_at_once(qu: Quorum, *path: str, mode: Mode = EX) -> None:
    """Another client is granted `path` at once (noqueue): nothing of ours blocks it."""
    c = adlm(qu)
    try:
        lk = await c.lock(path[0], mode, noqueue=True)
        for name in path[1:]:
            lk = await lk.lock(name, mode, noqueue=True)
    finally:
        await c.close()


@pytest.fixture
def qu(ready: Callable[..., Quorum]) -> Quorum:
    return ready(3)


# --------------------------------------------------------------------------- lock / wait


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("point", ["lock", "enqueue_wait", "child_lock"])
def test_cancelled_waiting_request_is_withdrawn(qu: Quorum, style: str, point: str) -> None:
    """A request cancelled while queued disappears from every queue; when the holder
    releases, the next client is granted at once."""
    path = ("r",) if point != "child_lock" else ("p", "c")

    async def body() -> None:
        a, b = adlm(qu), adlm(qu)
        try:
            ha = await a.lock(path[0], NL if len(path) > 1 else EX)
            if len(path) > 1:
                ha = await ha.lock(path[1], EX)
                pb = await b.lock(path[0], NL)

            async def waiter() -> Any:
                if point == "lock":
                    return await b.lock("r", EX)
                if point == "child_lock":
                    return await pb.lock("c", EX)
                req = await b.enqueue("r", EX)
                return await req.wait()

            await give_up(style, waiter)
            assert qu.lock_ids(*path) == [{ha.id}] * qu.n  # nothing of b's left queued
            await ha.release()
            assert qu.gone(*path)
            await granted_at_once(qu, *path)
        finally:
            await a.close()
            await b.close()

    run(body())


def test_cancelled_right_after_the_grant_releases(qu: Quorum) -> None:
    """The grant arrives and the waiter is cancelled before it resumes (cancelled from
    `on_granted`, which runs on the loop when the grant is decided): the lock it will
    never see is released on every instance."""

    async def body() -> None:
        a, b = adlm(qu), adlm(qu)
        try:
            ha = await a.lock("r", EX)
            waiter: asyncio.Task[Any] | None = None

            def granted(_lock: Any) -> None:
                assert waiter is not None
                waiter.cancel()

            req = await b.enqueue("r", EX, on_granted=granted)
            waiter = asyncio.ensure_future(req.wait())
            await asyncio.sleep(0.1)
            await ha.release()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert qu.gone("r")
            await granted_at_once(qu, "r")
        finally:
            await a.close()
            await b.close()

    run(body())


def test_cancelled_at_every_step_leaves_nothing(qu: Quorum) -> None:
    """Cancel `lock` after 0, 1, 2 ... loop iterations: whichever await point it is at
    (connecting, writing, reading replies, granted but not yet returned), once the
    CancelledError is out nothing of it is left on any instance."""

    async def body() -> None:
        b = adlm(qu)
        try:
            for k in range(25):
                task = asyncio.ensure_future(b.lock(f"r{k}", EX))
                for _ in range(k):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    lk = await task
                except asyncio.CancelledError:
                    assert qu.gone(f"r{k}"), f"left behind when cancelled after {k} steps"
                else:  # finished before the cancellation came
                    await lk.release()
                await granted_at_once(qu, f"r{k}")
        finally:
            await b.close()

    run(body())


# --------------------------------------------------------------------------- convert


@pytest.mark.parametrize("style", STYLES)
def test_cancelled_up_conversion_keeps_the_old_mode(qu: Quorum, style: str) -> None:
    """A conversion cancelled while queued is withdrawn: the lock holds its old mode on
    every instance and stays valid, and when the blocker goes the conversion is not
    granted behind the caller's back (another reader gets in at once)."""

    async def body() -> None:
        a, b = adlm(qu), adlm(qu)
        try:
            ha = await a.lock("r", PR)
            hb = await b.lock("r", PR)
            await give_up(style, lambda: hb.convert(EX))
            assert hb.mode == PR and hb.valid
            for locks in qu.locks("r"):
                mine = [lv for lv in locks if lv.lock_id == hb.id]
                assert len(mine) == 1 and mine[0].queue == "G" and mine[0].mode == PR
            await ha.release()
            await asyncio.sleep(0.2)  # a leftover conversion would be granted by now
            await granted_at_once(qu, "r", mode=PR)
            assert hb.mode == PR and hb.valid
            await hb.convert(EX, timeout=2)  # the lock still works
            assert qu.granted_on(hb.id, "r") == qu.n
        finally:
            await a.close()
            await b.close()

    run(body())


def test_cancelled_down_conversion_completes(qu: Quorum) -> None:
    """A down-conversion never waits (G4): cancelled in flight it completes, and every
    instance and the handle agree on the new mode."""

    async def body() -> None:
        b = adlm(qu)
        try:
            for k in range(6):
                hb = await b.lock(f"d{k}", EX)
                task = asyncio.ensure_future(hb.convert(PR))
                for _ in range(k):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):  # (or done before it)
                    await task
                modes = {lv.mode for locks in qu.locks(f"d{k}") for lv in locks}
                assert modes == {hb.mode} and hb.valid  # EX if cancelled before it began
                if hb.mode == PR:
                    await granted_at_once(qu, f"d{k}", mode=PR)
                await hb.release()
                await granted_at_once(qu, f"d{k}")
        finally:
            await b.close()

    run(body())


# --------------------------------------------------------------------------- release / close


@pytest.mark.parametrize("steps", range(4))
def test_cancelled_release_completes(qu: Quorum, steps: int) -> None:
    """A release cancelled once started still completes on every instance."""

    async def body() -> None:
        b = adlm(qu)
        try:
            hb = await b.lock("r", EX)
            task = asyncio.ensure_future(hb.release())
            await asyncio.sleep(0)  # the release has started
            for _ in range(steps):
                await asyncio.sleep(0)
            if task.cancel():  # (a fast release may be done by now: nothing to cancel)
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                await task
            assert qu.gone("r")
            await granted_at_once(qu, "r")
        finally:
            await b.close()

    run(body())


@pytest.mark.parametrize("style", ["wait_for", "task_cancel"])
def test_cancelled_close_completes_and_says_so(qu: Quorum, style: str) -> None:
    """close() cancelled half-way (here while it withdraws a queued request) releases
    everything anyway, and the caller still sees the cancellation."""

    async def body() -> None:
        a, b = adlm(qu), adlm(qu)
        try:
            await a.lock("q", EX)
            await b.lock("x", EX)
            await b.lock("y", PR)
            await b.enqueue("q", EX)
            wait_until(lambda: len(qu.lock_ids("q")[0]) == 2, 5)
            await give_up(style, b.close, delay=0.001)
            assert qu.gone("x") and qu.gone("y")
            assert all(len(ids) == 1 for ids in qu.lock_ids("q"))
            with pytest.raises(DLMError):
                await b.lock("z", EX)
            await granted_at_once(qu, "x")
        finally:
            await a.close()
            await b.close()

    run(body())


# --------------------------------------------------------------------------- callbacks


def test_async_callback_exception_is_logged_and_harmless(
        qu: Quorum, caplog: pytest.LogCaptureFixture) -> None:
    """A coroutine callback that raises is logged with the client's logger; the lock it
    was told about is granted as usual and the client goes on."""

    async def body() -> None:
        b = adlm(qu)
        try:
            async def bad(_lock: Any) -> None:
                raise ValueError("user bug")

            req = await b.enqueue("r", EX, on_granted=bad)
            lk = await req.wait()
            await asyncio.sleep(0.05)
            assert qu.granted_on(lk.id, "r") == qu.n
            await lk.release()
            assert qu.gone("r")
        finally:
            await b.close()

    with caplog.at_level(logging.ERROR, logger="redlockdlm"):
        run(body())
    assert any(r.name == "redlockdlm" and "user bug" in str(r.exc_info)
               for r in caplog.records)


# --------------------------------------------------------------------------- sync client


def interrupt_main_after(delay: float) -> threading.Timer:
    """SIGINT the main thread after `delay` s: Python's handler raises KeyboardInterrupt
    wherever the main thread is (here: waiting in DLM.lock)."""
    main = threading.main_thread().ident
    assert main is not None
    t = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
    t.start()
    return t


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
@pytest.mark.parametrize("point", ["lock", "request_wait", "convert"])
def test_sync_keyboard_interrupt_withdraws(qu: Quorum, point: str) -> None:
    """Ctrl-C while `DLM.lock` / `Request.wait` / `Lock.convert` waits: the exception
    reaches the caller, the request (or conversion) is gone from every instance, and the
    resource is granted at once once the holder releases."""
    a = DLM(qu.urls, NS, socket_timeout=0.5, connect_timeout=0.5)
    b = DLM(qu.urls, NS, socket_timeout=0.5, connect_timeout=0.5)
    try:
        ha = a.lock("r", PR if point == "convert" else EX)
        hb = b.lock("r", PR) if point == "convert" else None
        timer = interrupt_main_after(DELAY)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            if point == "lock":
                b.lock("r", EX)
            elif point == "request_wait":
                b.enqueue("r", EX).wait()
            else:
                assert hb is not None
                hb.convert(EX)
            time.sleep(5)  # (not reached when it works)
        timer.join()
        assert time.monotonic() - t0 < DELAY + 3
        if hb is None:
            assert qu.lock_ids("r") == [{ha.id}] * qu.n
        else:
            assert hb.mode == PR and hb.valid
            for locks in qu.locks("r"):
                assert {(lv.lock_id, lv.queue, lv.mode) for lv in locks} == {
                    (ha.id, "G", PR), (hb.id, "G", PR)}
        ha.release()
        c = DLM(qu.urls, NS, socket_timeout=0.5, connect_timeout=0.5)
        try:
            c.lock("r", PR if hb is not None else EX, noqueue=True).release()
        finally:
            c.close()
        b.lock("r2", EX).release()  # the client is still usable
    finally:
        a.close()
        b.close()


def test_sync_callback_exceptions_logged_thread_survives(
        qu: Quorum, caplog: pytest.LogCaptureFixture) -> None:
    """Callbacks that raise (even SystemExit) are logged; the callback thread lives on and
    runs the next callback; no lock is left half-granted."""
    b = DLM(qu.urls, NS, socket_timeout=0.5, connect_timeout=0.5)
    second = threading.Event()

    def bad(_lock: Any) -> None:
        raise SystemExit("user bug")

    try:
        with caplog.at_level(logging.ERROR, logger="redlockdlm"):
            l1 = b.enqueue("r1", EX, on_granted=bad).wait(5)
            l2 = b.enqueue("r2", EX, on_granted=lambda lk: second.set()).wait(5)
            assert second.wait(3), "the callback thread died"
        assert any("callback" in r.getMessage() for r in caplog.records)
        assert qu.granted_on(l1.id, "r1") == qu.n and qu.granted_on(l2.id, "r2") == qu.n
        l1.release()
        l2.release()
        assert qu.gone("r1") and qu.gone("r2")
    finally:
        b.close()
