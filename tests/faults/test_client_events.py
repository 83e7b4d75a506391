"""The sync client's event connections survive instance restarts and dropped connections.

Found by the fault suite: after an instance was killed and restarted, the client's
background thread died (``KeyError: fd already registered`` in the selector) and with it
every renewal and every pushed grant of that client: its workers were stuck. Cause: the
pub/sub socket was unregistered by looking it up on the connection, which redis-py had
already closed and replaced, so the selector kept a dead entry whose fd number the next
socket reused. The same replacement after a transient drop left the client watching a dead
socket, so events of that instance were silently lost.
"""

from __future__ import annotations

import threading
import time

import pytest
from redis_harness import Instances

from redlockdlm import DLM
from redlockdlm.engine.instance import Engine

from .proxy import ProxyHub

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(60)]
NS = "ev"


@pytest.fixture
def inst():
    with Instances(3) as i:
        i.init_fresh(NS)
        yield i


def _watching_live_sockets(d: DLM) -> bool:
    return all(i.pubsub is not None and i.sock is i.pubsub.connection._sock
               for i in d._instances)


def _granted_by_event(holder: DLM, waiter: DLM, bound: float) -> bool:
    """The waiter (long lease: no re-check before `bound`) is woken by the grant event
    when the holder releases."""
    lk = holder.lock("r", "EX")
    req = waiter.enqueue("r", "EX")
    time.sleep(0.2)
    assert not req.done
    lk.release()
    try:
        req.wait(bound).release()
        return True
    except Exception:  # noqa: BLE001
        return False


def test_instance_killed_and_restarted_three_times(inst: Instances) -> None:
    """The event thread lives on through kills and restarts of an instance, watches the
    new connection, and delivers that instance's grants again."""
    d = DLM(inst.urls, NS, lease_ms=30_000, socket_timeout=0.3, connect_timeout=0.3)
    other = DLM(inst.urls, NS, lease_ms=30_000, socket_timeout=0.3, connect_timeout=0.3)
    try:
        for _ in range(3):
            inst[1].kill()
            time.sleep(1.3)  # a failed re-subscription attempt (every second)
            inst[1].restart(empty=True)
            Engine(inst[1].client(), NS).init_fresh()  # a test shortcut: no rejoin wait
            deadline = time.monotonic() + 5
            while not _watching_live_sockets(d) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert d._thread.is_alive()
            assert _watching_live_sockets(d)
        assert _granted_by_event(other, d, 3.0)
    finally:
        d.close()
        other.close()


def test_event_connection_dropped(inst: Instances) -> None:
    """A reset of the event connections (redis-py reconnects inside get_message, on a new
    socket) does not leave the client watching the dead socket: grants still arrive."""
    hub = ProxyHub()
    ps = hub.proxy_set([s.port for s in inst], "waiter")
    d = DLM(ps.urls, NS, lease_ms=30_000, socket_timeout=0.3, connect_timeout=0.3)
    holder = DLM(inst.urls, NS, lease_ms=30_000)
    try:
        for _ in range(3):
            ps.drop()
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while not _watching_live_sockets(d) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d._thread.is_alive() and _watching_live_sockets(d)
        ok: list[bool] = []
        t = threading.Thread(target=lambda: ok.append(_granted_by_event(holder, d, 3.0)))
        t.start()
        t.join(10)
        assert ok == [True]
    finally:
        d.close()
        holder.close()
        hub.close()
