"""N1 on the wire: which holders the instances publish blocking events to.

A blocking event costs every instance a PUBLISH and the holder's event thread a wake-up, so
the instances send one only to a holder that reads it: one with an `on_blocking` callback
(its requests and conversions carry BLKAST), or one granted at a younger ticket than the
request queued behind it (the split-vote yield reads that one, Y1). Each test listens on
the holders' own channels with a plain redis-py client on every instance and counts."""

from __future__ import annotations

import time

import pytest
import redis

from redlockdlm import Mode

from .conftest import Quorum, wait_until

EX, PR = Mode.EX, Mode.PR


class Channel:
    """One owner's event channel on every instance, as its client subscribes to it."""

    END = b"__end__"

    def __init__(self, q: Quorum, channel: bytes) -> None:
        self.channel = channel
        self.conns = [redis.Redis.from_url(u) for u in q.urls]
        self.subs = []
        for r in self.conns:
            ps = r.pubsub()
            ps.subscribe(channel)
            m = ps.get_message(timeout=5.0)
            assert m is not None and m["type"] == "subscribe"
            self.subs.append(ps)

    def kinds(self) -> list[list[bytes]]:
        """The events each instance published to the channel so far, by their first
        letter (read up to a sentinel published after them)."""
        out = []
        for r, ps in zip(self.conns, self.subs):
            r.publish(self.channel, self.END)
            got: list[bytes] = []
            deadline = time.monotonic() + 5
            while True:
                assert time.monotonic() < deadline, "sentinel not received"
                m = ps.get_message(timeout=1.0)
                if m is None or m["type"] != "message":
                    continue
                if m["data"] == self.END:
                    break
                got.append(m["data"][:1])
            out.append(got)
        return out

    def close(self) -> None:
        for ps, r in zip(self.subs, self.conns):
            ps.close()
            r.close()


@pytest.fixture
def channels():
    opened: list[Channel] = []

    def make(q: Quorum, d) -> Channel:  # noqa: ANN001 (either client)
        ch = Channel(q, d._core.channel)
        opened.append(ch)
        return ch

    yield make
    for ch in opened:
        ch.close()


def queued_everywhere(q: Quorum, owner: str, res: str) -> bool:
    return all(any(lv.owner == owner and lv.queue == "W" for lv in locks)
               for locks in q.locks(res))


def test_a_holder_without_on_blocking_gets_no_blocking_event(q: Quorum, channels) -> None:
    quiet, told, waiter = q.dlm(), q.dlm(), q.dlm()
    ch_quiet, ch_told = channels(q, quiet), channels(q, told)
    calls: list = []
    lq = quiet.lock("a", EX)
    lt = told.lock("b", EX, on_blocking=calls.append)
    ra = waiter.enqueue("a", PR)  # younger than both holders: no split vote to read
    rb = waiter.enqueue("b", PR)
    wait_until(lambda: queued_everywhere(q, waiter.owner, "a")
               and queued_everywhere(q, waiter.owner, "b"))
    wait_until(lambda: calls, 5)
    assert ch_quiet.kinds() == [[] for _ in range(q.n)]
    assert ch_told.kinds() == [[b"B"] for _ in range(q.n)]  # one per instance
    assert calls == [PR]  # (delivered once)
    lq.release()
    lt.release()
    ra.wait(5).release()
    rb.wait(5).release()
    assert q.gone("a") and q.gone("b")


def test_a_conversion_keeps_asking_for_blocking_events(q: Quorum, channels) -> None:
    # a conversion stores its flags on the instances (as NODLCKWT): the lock's own request
    # asked for blocking notifications, so its conversions ask too
    told, quiet, waiter = q.dlm(), q.dlm(), q.dlm()
    ch_told, ch_quiet = channels(q, told), channels(q, quiet)
    calls: list = []
    lt = told.lock("a", PR, on_blocking=calls.append)
    lq = quiet.lock("b", PR)
    lt.convert(EX, timeout=5)
    lq.convert(EX, timeout=5)
    ra = waiter.enqueue("a", PR)
    rb = waiter.enqueue("b", PR)
    wait_until(lambda: queued_everywhere(q, waiter.owner, "a")
               and queued_everywhere(q, waiter.owner, "b"))
    wait_until(lambda: calls, 5)
    assert calls == [PR]
    assert ch_told.kinds() == [[b"B"] for _ in range(q.n)]
    assert ch_quiet.kinds() == [[] for _ in range(q.n)]
    lt.release()
    lq.release()
    ra.wait(5).release()
    rb.wait(5).release()
    assert q.gone("a") and q.gone("b")
