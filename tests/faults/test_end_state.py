"""The end-of-scenario check (`Scenario.check_end_state`) catches what it is meant to catch:
a resource left in a state that breaks a rule of one instance, and a lock left behind by a
worker that stopped cleanly. Without this, a fault run whose end state "looks fine" would
prove nothing."""

from __future__ import annotations

import pytest

from redlockdlm import DLM, Mode

from .harness import NS, Scenario

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(60)]

# A resource written as the scripts store it (lua/lib/core.lua `load`): a CR holder and, at
# the head of the wait queue, a PR request that CR does not block: G8 says it must have been
# granted.
UNPROCESSED = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local function lk(id, gr, rq, ticket)
  return {id = id, o = 'someone', gr = gr, rq = rq, f = 0, t = ticket, ct = 0, e = now + 60000,
          p = '', pk = '', k = {}, tok = ticket, pm = -1}
end
local r = {n = 'res0', s = 5, vv = 0, vi = 0, g = {lk('a', 1, -1, 1)}, c = {},
           w = {lk('b', -1, 3, 2)}}
redis.call('SET', KEYS[1], cmsgpack.pack(r))
return 1
"""


def test_a_queue_left_unprocessed_is_reported() -> None:
    with Scenario("end state: unprocessed queue", 3) as sc:
        eng = sc.engine(sc.servers[0])
        eng.client.eval(UNPROCESSED, 1, eng.key("res0"))
        sc.check_end_state(grace=0.1)
        assert any("G8" in v and "instance 0" in v for v in sc.violations), sc.violations
        assert not any("instance 1" in v for v in sc.violations)


def test_a_lock_left_by_a_cleanly_stopped_worker_is_reported() -> None:
    with Scenario("end state: lock left behind", 3) as sc:
        h = sc.spawn()
        sc.wait_started()
        h.stop()
        assert h.join(20)
        sc.check_end_state(grace=0.1)
        assert sc.violations == []  # the worker released everything when it stopped
        owner = sc.obs.workers[h.wid]["owner"]
        with DLM(sc.inst.urls, NS, owner=owner) as d:  # as if its release had gone nowhere
            d.lock("res1", Mode.PR)
            sc.check_end_state(grace=0.2)
        assert any("left behind" in v and "res1" in v for v in sc.violations), sc.violations
