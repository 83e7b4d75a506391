"""A resource key that holds no lock resource (K1) fails that lock alone.

Someone (another program sharing the instances, an operator's mistake) overwrites one
resource key with another type or with bytes that are not a resource. Before, the renewal
script failed as a whole with DLM_INTERNAL, so a holder lost every lock of the same renew
call (up to 256), and the message said that only one of three instances answered when all
three had. Now the renewal reports that lock CORRUPT and renews the others; the client
logs the failure and the lost vote as they happen, and messages count the instances that
answered.
"""

from __future__ import annotations

import logging
import time

import pytest

from redlockdlm.errors import CorruptKey, QuorumUnavailable
from redlockdlm.protocol import RENEW_CHUNK

from .conftest import Quorum, wait_until

LEASE_MS = 600


def corrupt(q: Quorum, path: str, on: tuple[int, ...]) -> bytes:
    """Overwrite resource `path` on instances `on`: a plain string on the first, a hash on
    the others."""
    key = q.key(path)
    for n, i in enumerate(on):
        c = q.inst[i].client()
        try:
            c.delete(key)
            if n == 0:
                c.set(key, b"not msgpack, not a resource")
            else:
                c.hset(key, "field", "value")
        finally:
            c.close()
    return key


@pytest.mark.timeout(60)
def test_corrupt_key_on_two_instances_loses_that_lock_only(q3: Quorum, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="redlockdlm")
    d = q3.dlm(lease_ms=LEASE_MS)
    lost: list = []
    locks = [d.lock(f"r{i}", "EX", on_lost=lost.append) for i in range(RENEW_CHUNK)]
    victim = locks[7]
    key = corrupt(q3, "r7", (0, 1)).decode()

    wait_until(lambda: lost, timeout=5 * LEASE_MS / 1000)
    # three more leases: every other lock of the same renew call stays valid all along
    end = time.monotonic() + 3 * LEASE_MS / 1000
    while time.monotonic() < end:
        bad = [lk.id for lk in locks if lk is not victim and not lk.valid]
        assert not bad, f"{len(bad)} other locks lost"
        time.sleep(0.05)
    assert [lk.id for lk in lost] == [victim.id]
    assert not victim.valid
    assert all(lk.validity_ms > 0 for lk in locks if lk is not victim)
    assert q3.granted_on(locks[8].id, "r8") == 3

    text = [r.getMessage() for r in caplog.records]
    for inst in q3.urls[:2]:  # (instances are named by their URL)
        assert any(f"renewal of lock {victim.id} on {inst} failed: resource key {key} corrupt"
                   in t for t in text), text
    said = f"lock {victim.id} on r7 lost: held on 1 of 3 instances, 2 needed; " \
           f"3 of 3 instances answered; 2 reported resource key {key} corrupt"
    assert any(said in t for t in text), text

    # a new request on that resource: all three answer, two of them with the corrupt key
    other = q3.dlm(lease_ms=LEASE_MS)
    with pytest.raises(QuorumUnavailable) as ei:
        other.lock("r7", "EX", timeout=5)
    assert (f"3 of 3 instances answered; 2 reported resource key {key} corrupt; 2 needed"
            in str(ei.value))
    for lk in locks:
        if lk is not victim:
            lk.release()


def test_every_script_reports_a_corrupt_key_typed(q3: Quorum) -> None:
    """K1: not DLM_INTERNAL halfway through, but DLM_CORRUPT <key> before any change."""
    e = q3.engine(0)
    k = e.key("x")
    h = e.key("h")
    assert e.request(k, "o1", "l1", 5, ticket=1, lease_ms=5000).status == 0
    assert e.request(h, "o1", "l2", 5, ticket=1, lease_ms=5000).status == 0
    raw = q3.inst[0].client()
    raw.set(k, b"\x93\x01\x02\x03")  # msgpack, but a list of numbers: not a resource
    raw.delete(h)
    raw.hset(h, "a", "b")
    before = (raw.dump(k), raw.dump(h))
    calls = [
        lambda key: e.request(key, "o2", "n", 1, ticket=2, lease_ms=5000),
        lambda key: e.convert(key, "o1", "l1", 1, ticket=3, lease_ms=5000),
        lambda key: e.release(key, "o1", "l1"),
        lambda key: e.cancel(key, "o1", "l1"),
        lambda key: e.yield_(key, "o1", "l1"),
        lambda key: e.break_(key, owner="o1"),
    ]
    for key in (k, h):
        for call in calls:
            with pytest.raises(CorruptKey) as ei:
                call(key)
            assert ei.value.key == key.decode()
    _, entries = e.renew("o1", 5000, [(k, "l1", 0), (h, "l2", 0)])
    assert [int(x.status) for x in entries] == [10, 10]
    assert (raw.dump(k), raw.dump(h)) == before  # nothing written
    raw.close()
