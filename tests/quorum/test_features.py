"""Every feature of the sync quorum client against 1, 3 and 5 real redis-servers.

Each test runs for N = 1, 3, 5 (fixture ``q``); the state the client leaves on the
instances is read back with ``Engine.inspect`` on every instance, not only through the
client's own view.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from redlockdlm import Mode, protocol
from redlockdlm.errors import (
    Deadlock,
    DLMError,
    HasChildren,
    InvalidArgument,
    LockLost,
    LockReleased,
    LockStateError,
    LockTimeout,
    NotQueued,
    ParentNotGranted,
    StillWaiting,
)

from .clients import stop_renewal
from .conftest import Quorum, wait_until

NL, CR, CW, PR, PW, EX = Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX

pytestmark = pytest.mark.timeout(30)


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    """Run fn in a daemon thread; the dict gets 'result' or 'error'."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def joined(t: threading.Thread, box: dict, timeout: float = 5.0):
    t.join(timeout)
    assert not t.is_alive(), "the call did not return in time"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def waiting_on_all(q: Quorum, lock_id: str, *path: str, queue: str = "W") -> bool:
    return all(any(lv.lock_id == lock_id and lv.queue == queue for lv in locks)
               for locks in q.locks(*path))


# --------------------------------------------------------------------------- lock / release


def test_lock_release(q: Quorum) -> None:
    d = q.dlm()
    lk = d.lock("res", EX)
    assert lk.mode == EX and lk.valid and lk.validity_ms > 0 and lk.token > 0
    # Granted on every instance (all answered), with the same id and owner.
    for locks in q.locks("res"):
        assert [(lv.queue, lv.lock_id, lv.owner, lv.mode) for lv in locks] == [
            ("G", lk.id, d.owner, EX)]
    lk.release()
    assert not lk.valid
    assert q.gone("res")
    lk.release()  # a second release is a no-op


def test_modes_and_locks_print_as_users_write_them(q3: Quorum) -> None:
    """A mode prints by name ("EX", in str and f-strings, as in the docs and the CLI), not
    as the number an IntEnum prints; an NL lock's repr names NL (NL is 0, which is falsy)."""
    assert (str(EX), f"{Mode.NL}", f"{PW:>3}") == ("EX", "NL", " PW")
    assert int(EX) == 5 and b"%d" % EX == b"5"  # (what the scripts take is unchanged)
    lk = q3.dlm().lock("res", Mode.NL)
    assert " NL " in repr(lk), repr(lk)
    lk.release()


def test_with_block_releases(q: Quorum) -> None:
    d = q.dlm()
    with d.lock("res", PW) as lk:
        assert q.granted_on(lk.id, "res") == q.n
    assert q.gone("res")


def test_compatible_modes_share_incompatible_wait(q: Quorum) -> None:
    a, b, c = q.dlm(), q.dlm(), q.dlm()
    la = a.lock("res", PR)
    lb = b.lock("res", CR, noqueue=True)  # PR and CR are compatible
    with pytest.raises(NotQueued):
        c.lock("res", PW, noqueue=True)
    la.release()
    lc = c.lock("res", PW, noqueue=True)  # PW and CR are compatible
    assert lc.token > la.token
    lb.release()
    lc.release()
    assert q.gone("res")


# --------------------------------------------------------------------------- hierarchy


def test_hierarchy_child_lock(q: Quorum) -> None:
    d = q.dlm()
    with d.lock("db/orders", CR) as table:
        row = table.lock("row:42", EX)
        assert row.resource == "db/orders / row:42"
        assert row.mode == EX
        locks = q.locks("db/orders", "row:42")
        assert all([(lv.lock_id, lv.parent) for lv in ls] == [(row.id, table.id)]
                   for ls in locks)
        # Children are scoped by the parent's resource: the same child name under another
        # root is another resource, so this EX is granted at once.
        other = q.dlm()
        with other.lock("db/users", CR) as users:
            row2 = users.lock("row:42", EX, noqueue=True)
            assert row2.mode == EX
            # ...but the same path under the same root conflicts.
            with other.lock("db/orders", CR) as table2, pytest.raises(NotQueued):
                table2.lock("row:42", EX, noqueue=True)
        # A lock with children cannot be released alone.
        with pytest.raises(HasChildren):
            table.release()
        assert q.granted_on(table.id, "db/orders") == q.n
        row.release()
    assert q.gone("db/orders") and q.gone("db/orders", "row:42")


def test_hierarchy_subtree_release(q: Quorum) -> None:
    d = q.dlm()
    table = d.lock("db/orders", CR)
    row = table.lock("row:1", EX)
    col = row.lock("col:a", PW)
    table.release(subtree=True)
    assert not row.valid and not col.valid
    assert q.gone("db/orders") and q.gone("db/orders", "row:1")
    assert q.gone("db/orders", "row:1", "col:a")


def test_parent_not_granted_after_release(q: Quorum) -> None:
    d = q.dlm()
    table = d.lock("db/orders", CR)
    table.release()
    with pytest.raises(ParentNotGranted):
        table.lock("row:42", EX)
    assert q.gone("db/orders", "row:42")


def test_parent_not_granted_on_a_quorum(q: Quorum) -> None:
    """The parent is broken (operator) on a quorum of instances: a child request there
    answers NOPARENT, so the child is refused, and nothing of it is left anywhere."""
    d = q.dlm()
    table = d.lock("db/orders", CR)
    for i in range(q.quorum):
        q.engine(i).break_(q.key("db/orders"), lock_id=table.id)
    with pytest.raises(ParentNotGranted):
        table.lock("row:42", EX, timeout=5)
    wait_until(lambda: q.gone("db/orders", "row:42"), 2)


# --------------------------------------------------------------------------- conversions


def test_convert_up_and_down(q: Quorum) -> None:
    d = q.dlm()
    lk = d.lock("res", NL)
    t0 = lk.token
    lk.convert(EX)
    assert lk.mode == EX and lk.token > t0
    assert all([lv.mode for lv in ls] == [EX] for ls in q.locks("res"))
    t1 = lk.token
    lk.convert(PR)  # down: granted at once, keeps its token (G4)
    assert lk.mode == PR and lk.token == t1
    assert all([lv.mode for lv in ls] == [PR] for ls in q.locks("res"))
    lk.convert(NL)
    other = q.dlm().lock("res", EX, noqueue=True)  # NL blocks nothing
    assert other.token > t1
    other.release()
    lk.release()
    assert q.gone("res")


def test_convert_noqueue_keeps_old_mode(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", PR)
    lb = b.lock("res", PR)
    with pytest.raises(NotQueued):
        la.convert(EX, noqueue=True)
    assert la.mode == PR and la.valid
    for ls in q.locks("res"):  # granted PR everywhere, nothing left converting
        assert sorted((lv.queue, lv.mode, lv.requested) for lv in ls) == [
            ("G", PR, None), ("G", PR, None)]
    lb.release()
    la.convert(EX, noqueue=True)
    assert la.mode == EX


def test_convert_waits_then_granted(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", PR)
    lb = b.lock("res", CR)
    t, box = in_thread(la.convert, EX, timeout=10)
    wait_until(lambda: waiting_on_all(q, la.id, "res", queue="C"))
    assert la.mode == PR  # still granted in its old mode meanwhile (G6)
    lb.release()
    joined(t, box)
    assert la.mode == EX


def test_convert_timeout_rolls_back(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", PR)
    b.lock("res", CR)
    with pytest.raises(LockTimeout):
        la.convert(EX, timeout=0.3)
    assert la.mode == PR and la.valid
    for ls in q.locks("res"):
        assert all(lv.queue == "G" for lv in ls)
        assert {lv.lock_id: lv.mode for lv in ls}[la.id] == PR


def test_convert_quecvt(q: Quorum) -> None:
    """QUECVT: an up-conversion compatible with every granted lock still waits behind a
    conversion already queued (G5)."""
    a, x, b = q.dlm(), q.dlm(), q.dlm()
    la = a.lock("res", PR)
    lx = x.lock("res", CR)
    lb = b.lock("res", NL)
    t, box = in_thread(la.convert, EX, timeout=10)  # queued: X holds CR
    wait_until(lambda: waiting_on_all(q, la.id, "res", queue="C"))
    with pytest.raises(NotQueued):
        lb.convert(CR, quecvt=True, noqueue=True)
    assert lb.mode == NL
    t2, box2 = in_thread(lb.convert, CR, quecvt=True, timeout=10)
    wait_until(lambda: waiting_on_all(q, lb.id, "res", queue="C"))
    lx.release()  # A gets EX; B still waits (CR conflicts with EX)
    joined(t, box)
    assert la.mode == EX
    assert t2.is_alive()
    la.release()
    joined(t2, box2)
    assert lb.mode == CR
    # Without QUECVT the same conversion is granted at once past a queued one.
    lb.convert(NL)
    la = a.lock("res", PR)
    lx = x.lock("res", CR)
    t, box = in_thread(la.convert, EX, timeout=10)
    wait_until(lambda: waiting_on_all(q, la.id, "res", queue="C"))
    lb.convert(CR, noqueue=True)
    assert lb.mode == CR
    lb.release()
    lx.release()
    joined(t, box)


def test_conversion_deadlock_and_convdeadlk(q: Quorum) -> None:
    """Two PR holders both asking for EX (G7): the second gets Deadlock and keeps PR; with
    CONVDEADLK it is demoted to NL instead, which lets the first through."""
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", PR)
    lb = b.lock("res", PR)
    t, box = in_thread(la.convert, EX, timeout=10)
    wait_until(lambda: waiting_on_all(q, la.id, "res", queue="C"))
    with pytest.raises(Deadlock):
        lb.convert(EX)
    assert lb.mode == PR and lb.valid
    assert t.is_alive()
    t2, box2 = in_thread(lb.convert, EX, convdeadlk=True, timeout=10)
    joined(t, box)  # B's demotion to NL let A convert
    assert la.mode == EX
    assert t2.is_alive()
    la.release()
    joined(t2, box2)
    assert lb.mode == EX


# --------------------------------------------------------------------------- value blocks


def test_value_block_written_on_release(q: Quorum) -> None:
    keeper = q.dlm().lock("res", NL)  # keeps the resource and its value block alive (G9)
    d = q.dlm()
    with d.lock("res", EX) as w:
        assert w.value is None and w.version == 0 and w.value_valid
        w.value = b"v1"
        v1 = w.token * 4  # protocol.next_version: versions follow fencing tokens
    r = d.lock("res", PR)
    assert (r.value, r.version, r.value_valid) == (b"v1", v1, True)
    assert all(v is not None and (v.value, v.version) == (b"v1", v1) for v in q.views("res"))
    r.release()
    with d.lock("res", PW) as w:
        w.value = b"v2"
    r = q.dlm().lock("res", CR)
    assert r.value == b"v2" and r.version > v1
    r.release()
    keeper.release()
    assert q.gone("res")
    # ...and once the last lock went, the value block went with it.
    assert d.lock("res", PR).value is None


def test_value_block_written_on_down_conversion(q: Quorum) -> None:
    keeper = q.dlm().lock("res", NL)
    lk = q.dlm().lock("res", EX)
    lk.value = b"down"
    lk.convert(NL)
    r = q.dlm().lock("res", PR, noqueue=True)
    assert (r.value, r.version, r.value_valid) == (b"down", lk.token * 4, True)
    # A reader cannot write (V3).
    with pytest.raises(ValueError):
        r.value = b"nope"
    keeper.release()


def test_value_block_not_written_by_reader_release(q: Quorum) -> None:
    keeper = q.dlm().lock("res", NL)
    with q.dlm().lock("res", EX) as w:
        w.value = b"keep"
        written = w.token * 4  # protocol.next_version: versions follow fencing tokens
    r = q.dlm().lock("res", PR)
    r.release()
    assert q.dlm().lock("res", PR).version == written
    keeper.release()


def test_value_block_invalid_after_holder_expired(q: Quorum) -> None:
    keeper = q.dlm().lock("res", NL)
    with q.dlm().lock("res", EX) as w:
        w.value = b"good"
        written = w.token * 4
    dead = q.dlm(lease_ms=300)
    stop_renewal(dead)  # the holder stops renewing (a hung process)
    dl = dead.lock("res", PW)
    assert dl.value == b"good"
    r = q.dlm().lock("res", EX, timeout=5)  # granted once the PW lease ran out
    assert not dl.valid
    assert r.value == b"good" and r.version == written and r.value_valid is False
    r.value = b"fixed"
    r.release()
    r2 = q.dlm().lock("res", PR)
    assert (r2.value, r2.version, r2.value_valid) == (b"fixed", r.token * 4, True)
    keeper.release()


# --------------------------------------------------------------------------- fencing


def test_fencing_tokens_increase_across_conflicting_holders(q: Quorum) -> None:
    clients = [q.dlm() for _ in range(3)]
    seen = []
    for k in range(12):
        d = clients[k % 3]
        mode = (EX, PW, PR)[k % 3]
        lk = d.lock("res", mode)
        seen.append(lk.token)
        if k % 4 == 3:
            lk.convert(NL)  # NL keeps the resource; the next conflicting grant still rises
            lk.release()
        else:
            lk.release()
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen


def test_fencing_up_conversion_gets_new_token(q: Quorum) -> None:
    d = q.dlm()
    a = d.lock("res", PR)
    b = q.dlm().lock("res", PR)
    tb = b.token
    b.release()
    a.convert(EX)
    assert a.token > tb


# --------------------------------------------------------------------------- async requests


def test_enqueue_on_granted_and_wait(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", EX)
    got: list = []
    called = threading.Event()

    def on_granted(lock) -> None:
        got.append((lock, threading.current_thread().name))
        called.set()

    req = b.enqueue("res", PR, on_granted=on_granted)
    assert not req.done
    wait_until(lambda: waiting_on_all(q, req.lock.id, "res"))
    with pytest.raises(StillWaiting) as ei:  # (a LockTimeout that says it is not withdrawn)
        req.wait(timeout=0.1)  # bounds this wait only; the request goes on
    assert isinstance(ei.value, LockTimeout) and ei.value.lock_id == req.lock.id
    assert "still waiting" in str(ei.value) and "cancel()" in str(ei.value), str(ei.value)
    assert not req.done and waiting_on_all(q, req.lock.id, "res")
    assert not called.is_set()
    la.release()
    lb = req.wait(timeout=5)
    assert lb is req.lock and lb.mode == PR and lb.token > la.token
    assert called.wait(5)
    time.sleep(0.1)
    assert len(got) == 1 and got[0][0] is lb
    if q.kind == "sync":
        assert got[0][1] == "redlockdlm-callbacks"  # never the caller's thread
    lb.release()
    assert q.gone("res")


def test_enqueue_granted_at_once(q: Quorum) -> None:
    called = threading.Event()
    req = q.dlm().enqueue("res", EX, on_granted=lambda lk: called.set())
    assert req.wait(5).mode == EX
    assert called.wait(5)


def test_request_cancel_leaves_nothing(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", EX)
    called = threading.Event()
    req = b.enqueue("res", EX, on_granted=lambda lk: called.set())
    wait_until(lambda: waiting_on_all(q, req.lock.id, "res"))
    req.cancel()
    assert req.done
    with pytest.raises(DLMError):
        req.wait(1)
    assert q.lock_ids("res") == [{la.id}] * q.n
    la.release()
    assert q.gone("res")
    time.sleep(0.1)
    assert not called.is_set()


def test_request_cancel_after_grant_releases(q: Quorum) -> None:
    req = q.dlm().enqueue("res", EX)
    req.wait(5)
    req.cancel()
    assert q.gone("res")


def test_not_queued_leaves_nothing(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", EX)
    with pytest.raises(NotQueued) as ei:
        b.lock("res", PR, noqueue=True)
    assert isinstance(ei.value, DLMError) and ei.value.resource == "res"
    assert q.lock_ids("res") == [{la.id}] * q.n  # at once, not eventually


def test_lock_timeout_leaves_nothing(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", EX)
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as ei:
        b.lock("res", EX, timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 3
    assert isinstance(ei.value, TimeoutError) and isinstance(ei.value, DLMError)
    # the request's own error (withdrawn), not a wait's "still waiting" (asyncio took the
    # request's LockTimeout, a TimeoutError, for its own wait_for timing out)
    assert not isinstance(ei.value, StillWaiting), repr(ei.value)
    assert "within the timeout" in str(ei.value), repr(ei.value)
    assert q.lock_ids("res") == [{la.id}] * q.n  # at once, not eventually
    la.release()
    assert q.gone("res")


def test_lock_timeout_zero_is_a_try(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la = a.lock("res", EX)
    with pytest.raises(LockTimeout):
        b.lock("res", EX, timeout=0)
    assert q.lock_ids("res") == [{la.id}] * q.n


# --------------------------------------------------------------------------- notifications


def test_blocking_notification_once_per_blocked_request(q: Quorum) -> None:
    calls: list = []
    a = q.dlm()
    la = a.lock("res", EX, on_blocking=calls.append)
    b, c = q.dlm(), q.dlm()
    rb = b.enqueue("res", PR)
    wait_until(lambda: len(calls) >= 1, 5)
    time.sleep(0.3)  # every instance has reported it by now
    assert calls == [PR]
    rc = c.enqueue("res", EX)
    wait_until(lambda: len(calls) >= 2, 5)
    time.sleep(0.3)
    assert calls == [PR, EX]
    la.release()
    rb.wait(5).release()
    rc.wait(5).release()
    assert q.gone("res")


def test_blocking_notification_to_every_holder(q: Quorum) -> None:
    c1: list = []
    c2: list = []
    l1 = q.dlm().lock("res", PR, on_blocking=c1.append)
    l2 = q.dlm().lock("res", CR, on_blocking=c2.append)
    req = q.dlm().enqueue("res", EX)
    wait_until(lambda: c1 and c2, 5)
    time.sleep(0.2)
    assert c1 == [EX] and c2 == [EX]
    l1.release()
    l2.release()
    req.wait(5)


def test_blocking_notification_for_a_queued_conversion(q: Quorum) -> None:
    calls: list = []
    la = q.dlm().lock("res", PR, on_blocking=calls.append)
    lb = q.dlm().lock("res", PR)
    t, box = in_thread(lb.convert, EX, timeout=10)
    wait_until(lambda: calls, 5)
    time.sleep(0.2)
    assert calls == [EX]
    la.release()
    joined(t, box)
    assert lb.mode == EX


def test_callbacks_run_in_order_after_their_step_off_the_callers_thread(
        q: Quorum, caplog: pytest.LogCaptureFixture) -> None:
    """Both clients (docs/concepts.md "Callbacks"): a callback runs once the step that
    caused it is complete (on_granted sees the lock held), never on the caller's thread,
    one at a time in the order they were caused; one that raises is logged and the next
    still runs."""
    caller = threading.current_thread()
    seen: list = []

    def granted(lk: Any) -> None:
        seen.append(("granted", lk.mode, lk.valid, threading.current_thread() is caller))
        raise ValueError("user bug in on_granted")

    d = q.dlm()
    with caplog.at_level("ERROR", logger="redlockdlm"):
        lk = d.enqueue("res", EX, on_granted=granted,
                       on_blocking=lambda m: seen.append(("blocking", m))).wait(5)
        other = q.dlm().enqueue("res", PR)  # blocked by lk: on_blocking(PR)
        wait_until(lambda: len(seen) >= 2, 5)
    assert seen == [("granted", EX, True, False), ("blocking", PR)]
    assert any("user bug in on_granted" in str(r.exc_info) for r in caplog.records)
    lk.release()
    other.wait(5).release()
    assert q.gone("res")


# --------------------------------------------------------------------------- leases


def test_renewal_keeps_lock_beyond_its_lease(q: Quorum) -> None:
    d = q.dlm(lease_ms=300)
    lk = d.lock("res", EX)
    time.sleep(1.3)  # four leases
    assert lk.valid and lk.validity_ms > 0
    with pytest.raises(NotQueued):
        q.dlm().lock("res", EX, noqueue=True)
    assert all(lv.lease_left_ms > 0 for ls in q.locks("res") for lv in ls)
    lk.release()


def test_renewal_keeps_a_waiter_in_the_queue(q: Quorum) -> None:
    # 600 ms leases (ticks of 200 ms): with 300 ms, one tick delayed by a loaded machine
    # (CI, async, N = 5) let the waiter's entry expire on an instance
    a = q.dlm(lease_ms=600)
    la = a.lock("res", EX)
    req = q.dlm(lease_ms=600).enqueue("res", EX)
    time.sleep(1.8)  # three leases
    assert not req.done and la.valid
    assert waiting_on_all(q, req.lock.id, "res")
    la.release()
    assert req.wait(5).valid


def _count_writes(d: Any) -> list[int]:
    """Count the writes (round trips) of client `d`'s pipelines (`_write`)."""
    real = d.adlm if hasattr(d, "adlm") else d
    writes = [0]
    write = real._write
    if hasattr(d, "adlm"):
        async def counting(conn: Any, chunks: Any) -> None:
            writes[0] += 1
            await write(conn, chunks)
    else:
        def counting(conn: Any, chunks: Any) -> None:  # type: ignore[misc]
            writes[0] += 1
            write(conn, chunks)
    real._write = counting
    return writes


def test_renewal_of_many_locks_is_chunked_and_one_round_trip(
        q3: Quorum, monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewal sends RENEW_CHUNK locks per call (no instance runs one long script), all of
    an instance's calls in one write: one round trip per instance per tick."""
    monkeypatch.setattr(protocol, "RENEW_CHUNK", 3)
    d = q3.dlm(lease_ms=1500, socket_timeout=1.0)  # a loaded machine delays ticks: margin
    locks = [d.lock(f"many:{k}", EX) for k in range(10)]  # 4 calls per instance per tick
    before = [s.client().info("commandstats").get("cmdstat_fcall", {}).get("calls", 0)
              for s in q3.servers]
    writes = _count_writes(d)
    time.sleep(2.2)  # ~4 ticks of 500 ms
    after = [s.client().info("commandstats").get("cmdstat_fcall", {}).get("calls", 0)
             for s in q3.servers]
    assert all(lk.valid for lk in locks)
    assert all(lv.lease_left_ms > 0 for k in range(10) for ls in q3.locks(f"many:{k}")
               for lv in ls)
    ticks = writes[0] / 3  # per instance
    assert ticks >= 2, writes
    calls = [a - b for a, b in zip(after, before)]
    assert all(c >= 4 * (ticks - 1) for c in calls), (calls, writes)  # 4 calls per write
    for lk in locks:
        lk.release()


def test_renewal_reloads_a_flushed_library_and_resends(
        q3: Quorum, monkeypatch: pytest.MonkeyPatch) -> None:
    """FUNCTION FLUSH on an instance while locks are held: every pipelined renew call
    answers "Function not found"; the client loads the library and sends them again, and
    the locks stay held there."""
    monkeypatch.setattr(protocol, "RENEW_CHUNK", 2)
    d = q3.dlm(lease_ms=800, socket_timeout=1.0)
    locks = [d.lock(f"flush:{k}", EX) for k in range(5)]
    q3.servers[0].client().function_flush()
    time.sleep(2.0)  # 2.5 leases: without renewal there the locks would be gone
    assert all(lk.valid for lk in locks)
    assert q3.servers[0].client().function_list()  # loaded again (before inspect loads it)
    for k in range(5):
        assert q3.granted_on(locks[k].id, f"flush:{k}") == 3
    for lk in locks:
        lk.release()


@pytest.mark.parametrize("lease_ms", [600, 3000])
def test_per_lock_lease_renewed(q: Quorum, lease_ms: int) -> None:
    """A lock's own lease_ms (shorter or longer than the client's) is what the instances
    keep and what the client believes: renewal keeps it, and the client never thinks a
    lock valid for longer than the instances will keep it."""
    d = q.dlm(lease_ms=1000, rejoin_ms=3000)
    lk = d.lock("res", EX, lease_ms=lease_ms)
    end = time.monotonic() + 1.2
    invalid = 0
    while time.monotonic() < end:  # valid all along, not only at some instants
        invalid += not lk.valid
        time.sleep(0.005)
    assert invalid == 0
    # The client's validity counts on its quorum: it may not exceed the lease that the
    # Q-th best instance keeps (a minority may lag, its renewal still in flight). Read it
    # first: a renewal landing during the inspection only lengthens what the instances
    # keep, and the inspection's own time is allowed for.
    t0 = time.monotonic()
    validity = lk.validity_ms
    lefts = sorted((lv.lease_left_ms for ls in q.locks("res") for lv in ls), reverse=True)
    took_ms = (time.monotonic() - t0) * 1000
    assert len(lefts) == q.n
    kept = lefts[q.quorum - 1]
    assert validity <= kept + took_ms + 5, (validity, lefts, took_ms)
    lk.release()


def test_lock_lease_longer_than_rejoin_is_refused(q: Quorum) -> None:
    """E1: a restarted instance waits rejoin_ms; a lock may not outlive that wait."""
    d = q.dlm(lease_ms=1000)
    with pytest.raises(InvalidArgument):
        d.lock("res", EX, lease_ms=3000)


def test_lost_when_majority_paused(q: Quorum) -> None:
    lost = threading.Event()
    seen: list = []

    def on_lost(lock) -> None:
        seen.append(lock)
        lost.set()

    d = q.dlm(lease_ms=400, socket_timeout=0.1)
    lk = d.lock("res", EX, on_lost=on_lost)
    paused = q.servers[: q.quorum]
    for s in paused:
        s.pause()
    try:
        assert lost.wait(5)
        assert seen == [lk]
        assert not lk.valid and lk.validity_ms <= 0
    finally:
        for s in paused:
            s.resume()
    # The instances expired it by then: another client gets it.
    other = q.dlm().lock("res", EX, timeout=5)
    assert other.token > lk.token
    with pytest.raises(LockLost):  # converting a lost lock is refused
        lk.convert(NL)


def test_convert_after_release_says_released_not_lost(q3: Quorum) -> None:
    """A lock released on purpose is not "lost": converting it raises LockReleased (a
    LockStateError), naming the lock; the instances are not asked, nothing changes."""
    d = q3.dlm()
    lk = d.lock("res", EX)
    lk.release()
    with pytest.raises(LockReleased) as ei:
        lk.convert(NL)
    assert not isinstance(ei.value, LockLost) and isinstance(ei.value, LockStateError)
    assert ei.value.lock_id == lk.id and "released" in str(ei.value)
    assert q3.gone("res")


def test_with_block_raises_lock_lost(q: Quorum) -> None:
    d = q.dlm(lease_ms=400, socket_timeout=0.1)
    paused = q.servers[: q.quorum]
    with pytest.raises(LockLost):
        with d.lock("res", EX) as lk:
            for s in paused:
                s.pause()
            try:
                wait_until(lambda: not lk.valid, 5)
            finally:
                for s in paused:
                    s.resume()
    wait_until(lambda: q.gone("res"), 3)


def test_with_block_keeps_user_exception(q: Quorum) -> None:
    d = q.dlm()
    with pytest.raises(KeyError):
        with d.lock("res", EX):
            raise KeyError("mine")
    assert q.gone("res")


# --------------------------------------------------------------------------- close


def test_close_releases_everything(q: Quorum) -> None:
    other = q.dlm()
    blocker = other.lock("c", EX)
    d = q.dlm()
    d.lock("a", EX)
    d.lock("b", PR)
    table = d.lock("db/orders", CR)
    table.lock("row:1", EX).lock("col:x", PW)
    req = d.enqueue("c", PR)
    wait_until(lambda: waiting_on_all(q, req.lock.id, "c"))
    d.close()
    for path in [("a",), ("b",), ("db/orders",), ("db/orders", "row:1"),
                 ("db/orders", "row:1", "col:x")]:
        assert q.gone(*path), path
    assert q.lock_ids("c") == [{blocker.id}] * q.n
    with pytest.raises(DLMError):
        d.lock("z", EX)
    d.close()  # idempotent


def test_close_completes_pending_requests(q: Quorum) -> None:
    q.dlm().lock("c", EX)
    d = q.dlm()
    req = d.enqueue("c", PR)
    d.close()
    assert req.done, "a request pending at close() must complete (with an error)"
    with pytest.raises(DLMError):
        req.wait(1)
