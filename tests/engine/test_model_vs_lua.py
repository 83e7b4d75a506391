"""The Lua scripts and the pure-Python reference model agree (docs/design.md §9).

A hypothesis state machine drives random operation sequences (three owners, two trees of
resources with parents, every mode and flag, values, floors, bad arguments, lease expiry by
advancing a frozen clock) through the scripts on a real redis-server and through the model,
and compares every reply, the full resource state and the waiter index after every step.

The two mirror each other, so agreeing proves little about the rules themselves: after every
step both states are also checked against the rules written independently in
`tests/spec/invariants.py` (compatibility, processed queues, ticket order, conversion
deadlocks, value blocks, fencing tokens), and at the end of every example the state is
drained (`teardown`: waiters re-check by renewing, owners that wait for nothing release,
deadlocks lose a victim) to check liveness: nothing waits forever unless it is in a real
wait-for cycle.

Budget: `DLM_MODEL_EXAMPLES` examples (default 1000: about 45 s on a shared 2-core machine; with
the G5 processing of lua/convert.lua removed, eight searches from scratch found the waiter left
behind after 6 to 594 examples) of `DLM_MODEL_STEPS` steps (default 50).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from model import Model, event_bytes
from spec.invariants import (
    History,
    check_all,
    check_conversion,
    check_reply_value,
    check_step,
    deadlock_cycles,
    dump_views,
    owners_waiting,
    queued,
    state_from_dump,
    stuck_locks,
)

from redlockdlm.engine import scripts
from redlockdlm.engine.instance import Engine
from redlockdlm.engine.keys import EPOCH_KEY
from redlockdlm.errors import DLMError

T0 = 1_800_000_000_000
REJOIN = 5_000  # a restarted epoch (setup) recovers, then marks values (V5), this long
OWNERS = ("o1", "o2", "o3")
# (path, parent path or None)
RESOURCES = (
    (("A",), None),
    (("B",), None),
    (("A", "x"), ("A",)),
    (("A", "y"), ("A",)),
    (("B", "x"), ("B",)),
    (("A", "x", "z"), ("A", "x")),
)
EXAMPLES = int(os.environ.get("DLM_MODEL_EXAMPLES", "1000"))
STEPS = int(os.environ.get("DLM_MODEL_STEPS", "50"))
DRAIN_LEASE = 20_000

modes = st.sampled_from([0, 1, 1, 2, 3, 3, 3, 4, 5])  # shared modes often: many holders
up_modes = st.sampled_from([0, 1, 2, 2, 3, 4, 4, 5, 5, 5])
leases = st.sampled_from([5_000] * 6 + [1_000, 20_000, 20_000, 1, 0])  # 0 is bad input
rare = st.integers(0, 9).map(lambda i: i == 0)
tickets = st.integers(0, 40)
values = st.one_of(st.none(), st.none(), st.binary(max_size=66))  # > 64 is refused (V1)
floors = st.one_of(st.just(0), st.integers(0, T0 * 1000 + 10**9))
# P1: mostly the default; the edges of the range, and just past them (bad input)
priorities = st.one_of(st.just(0), st.just(0), st.integers(-3, 3),
                       st.sampled_from([-(2**31), 2**31 - 1, -(2**31) - 1, 2**31]))


def lua_dump(engine: Engine, keys: list[bytes]) -> dict:
    _, views = engine.inspect(keys)
    return dump_views(keys, views)


def vi(x) -> int:
    """The invalid level of a Lua reply or view: 0 valid, 1 invalid (V4), 2 forgotten."""
    return 2 if x.forgotten else int(not x.valid)


def lock_fields(rep) -> tuple:
    """A Lua LockReply or a model Reply reduced to comparable fields."""
    if hasattr(rep, "epoch"):
        return (int(rep.status), None if rep.mode is None else int(rep.mode), rep.token,
                rep.position, rep.value, rep.version, vi(rep), rep.wait_ms, rep.extra,
                rep.blockers_count, tuple((b.owner, b.lock_id, int(b.mode)) for b in rep.blockers))
    return (int(rep.status), rep.gr, rep.token, rep.pos, rep.vb, rep.vv, rep.vi, rep.wait_ms,
            rep.extra, rep.nblockers, tuple(rep.blockers))


class EngineVsModel(RuleBasedStateMachine):
    client = None  # set by the test
    sub = None  # the pub/sub connection reading every event of namespace "m"

    @initialize(restarted=st.sampled_from([False, False, True]))
    def setup(self, restarted: bool) -> None:
        # restarted: the epoch is created by the first script (E1, V5), as on an instance
        # that restarted empty; else `init fresh`
        self.client.flushall()
        self.e = Engine(self.client, "m", rejoin_ms=REJOIN)
        if not restarted:
            self.e.init_fresh()
        self.now = T0
        self.e.set_clock(frozen_ms=self.now)
        self.m = Model()
        if self.sub is None:  # N1-N3: every event the scripts publish, in order
            self.sub = self.client.pubsub(ignore_subscribe_messages=True)
            self.sub.psubscribe(self.e.chan + b"*")
        self.drain_events()  # (a failed example may leave some behind)
        if not restarted:
            self.m.init_fresh(self.now)
        self.keys = {p: self.e.key(*p) for p, _ in RESOURCES}
        self.names = {p: self.e.name(*p) for p, _ in RESOURCES}
        self.parent_of = dict(RESOURCES)
        self.locks: dict[str, tuple] = {}  # id -> (path, owner, parent id)
        self.n = 0
        self.path_of = {k: p for p, k in self.keys.items()}
        self.hist = History()  # tokens seen per resource (F1)
        self.prev = {}  # the checker's view of the state after the last step
        self.last = None  # (kind, key, details, lua reply) of the last operation
        self.ok = True  # False while a step is being checked, and after it failed

    # ------------------------------------------------------------------ helpers

    def both(self, lua_call, model_call, renew: bool = False, broke: bool = False):
        self.ok = False  # until the step is checked: teardown must not run on a failed one
        try:
            a = lua_call()
        except DLMError as exc:
            a = type(exc)
        try:
            b = model_call()
        except DLMError as exc:
            b = type(exc)
        self.same_events()
        if isinstance(a, type) or isinstance(b, type):
            assert a == b, f"lua {a!r} model {b!r}"
            self.ok = True
            return None
        if broke:  # H4: the locks broken, subtrees included, in the order they went
            la = [(x.key, x.name, x.lock_id, x.owner, None if x.mode is None else int(x.mode),
                   None if x.requested is None else int(x.requested), x.queue)
                  for x in a.broken]
            assert (int(a.status), a.extra, la) == (int(b.status), b.extra, b.broken)
        elif renew:
            la = [(int(x.status), None if x.mode is None else int(x.mode), x.token, x.position,
                   x.wait_ms) for x in a[1]]
            lb = [(int(x.status), x.gr, x.token, x.pos, x.wait_ms) for x in b]
            assert la == lb
        else:
            assert lock_fields(a) == lock_fields(b)
        self.ok = True
        return a

    def drain_events(self) -> list[tuple[bytes, bytes]]:
        """The events published since the last call: (owner, payload) in order."""
        out = []
        prefix = len(self.e.chan)
        while (msg := self.sub.get_message(timeout=0.0)) is not None:
            if msg["type"] == "pmessage":
                out.append((msg["channel"][prefix:], msg["data"]))
        return out

    def same_events(self) -> None:
        """The scripts published exactly the model's events of the step, in order, on each
        owner's channel, in the bytes the clients parse (the simulator of tests/sim
        delivers the model's events to real client code in this form)."""
        want = [(o.encode(), event_bytes(ev)) for o, ev in self.m.events]
        self.m.events.clear()
        got = self.drain_events()
        deadline = 50
        while len(got) < len(want) and deadline:  # (delivered as the reply was)
            deadline -= 1
            msg = self.sub.get_message(timeout=0.02)
            if msg is not None and msg["type"] == "pmessage":
                got.append((msg["channel"][len(self.e.chan):], msg["data"]))
        assert got == want, f"events: lua {got!r} model {want!r}"

    def pick(self, data_id: int) -> tuple[str, tuple, str, str] | None:
        if not self.locks:
            return None
        ids = sorted(self.locks)
        lid = ids[data_id % len(ids)]
        path, owner, pid = self.locks[lid]
        return lid, path, owner, pid

    def kid_keys(self, lid: str) -> list[bytes]:
        """Keys of every descendant this test created under lock `lid` (H3)."""
        out, todo = [], [lid]
        while todo:
            cur = todo.pop()
            for other, (path, _, pid) in self.locks.items():
                if pid == cur:
                    out.append(self.keys[path])
                    todo.append(other)
        return sorted(set(out))

    # ------------------------------------------------------------------ rules

    @rule(res=st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4, 5]), owner=st.sampled_from(OWNERS),
          mode=modes, noqueue=rare, expedite=rare, ticket=tickets, lease=leases,
          parent_pick=st.integers(0, 50), retry=st.integers(0, 6), priority=priorities,
          blkast=st.booleans())
    def request(self, res, owner, mode, noqueue, expedite, ticket, lease, parent_pick, retry,
                priority, blkast):
        path, ppath = RESOURCES[res]
        flags = (1 if noqueue else 0) | (2 if expedite else 0) | (64 if blkast else 0)  # N1
        if retry == 0 and self.locks:  # G12: a retried id, maybe from another owner
            lid = sorted(self.locks)[parent_pick % len(self.locks)]
            path = self.locks[lid][0]
            ppath = self.parent_of[path]
        else:
            self.n += 1
            lid = f"l{self.n}"
        pkey, pid = b"", ""
        if ppath is not None:
            mine = sorted(i for i, (p, o, _) in self.locks.items() if p == ppath and o == owner)
            cands = mine if mine and parent_pick % 7 else sorted(
                i for i, (p, _, _) in self.locks.items() if p == ppath)
            if cands:
                pid = cands[parent_pick % len(cands)]
                pkey = self.keys[ppath]
            else:
                pid, pkey = "nosuch", self.keys[ppath]
        key, name = self.keys[path], self.names[path]
        rep = self.both(
            lambda: self.e.request(key, owner, lid, mode, ticket=ticket, lease_ms=lease,
                                   flags=flags, name=name, parent_key=pkey or None,
                                   parent_id=pid, priority=priority),
            lambda: self.m.request(key, name, owner, lid, mode, flags, ticket, lease, self.now,
                                   REJOIN, pkey, pid, priority),
        )
        self.last = ("request", key, None, rep)
        if rep is not None and rep.status in (0, 1) and lid not in self.locks:
            self.locks[lid] = (path, owner, pid)

    @rule(pick=st.integers(0, 100), other_owner=st.integers(0, 9), mode=up_modes,
          flags=st.sampled_from([0, 0, 4, 4, 8, 12, 1, 16, 64, 68]), ticket=tickets, lease=leases,
          value=st.one_of(st.none(), st.none(), st.none(), values), version=st.integers(0, 9),
          floor=floors, priority=priorities)
    def convert(self, pick, other_owner, mode, flags, ticket, lease, value, version, floor,
                priority):
        got = self.pick(pick)
        if got is None:
            return
        lid, path, owner, _ = got
        if other_owner == 0:
            owner = OWNERS[(OWNERS.index(owner) + 1) % 3]
        key = self.keys[path]
        self.last = ("convert", key, (lid, owner, mode, flags, ticket), None)
        self.last = self.last[:3] + (self.both(
            lambda: self.e.convert(key, owner, lid, mode, ticket=ticket, lease_ms=lease,
                                   flags=flags, value=value, version=version, floor=floor,
                                   priority=priority),
            lambda: self.m.convert(key, owner, lid, mode, flags, ticket, lease, self.now, REJOIN,
                                   value, version, 64, floor, priority),
        ),)

    @rule(pick=st.integers(0, 100), mode=up_modes, flags=st.sampled_from([0, 4, 8, 12, 64]),
          ticket=tickets, priority=priorities)
    def convert_a_granted_lock(self, pick, mode, flags, ticket, priority):
        """Conversions of granted locks by their owner, often upwards: fills the
        conversion queue so G5-G8 (QUECVT, conversion deadlock) are exercised."""
        granted = sorted(
            (lk.id, key, lk.owner) for key, r in self.m.res.items() for lk in r.g
        )
        if not granted:
            return
        lid, key, owner = granted[pick % len(granted)]
        self.last = ("convert", key, (lid, owner, mode, flags, ticket), None)
        self.last = self.last[:3] + (self.both(
            lambda: self.e.convert(key, owner, lid, mode, ticket=ticket, lease_ms=20_000,
                                   flags=flags, priority=priority),
            lambda: self.m.convert(key, owner, lid, mode, flags, ticket, 20_000, self.now,
                                   REJOIN, priority=priority),
        ),)

    @rule(pick=st.integers(0, 100), flags=st.sampled_from([0, 4, 8, 64]), ticket=tickets)
    def convert_middle(self, pick, flags, ticket):
        """M2: the middle conversions CW->PR and PR->CW (neither up nor down: both can let
        a queued request through, G8) of a granted CW or PR lock."""
        granted = sorted(
            (lk.id, key, lk.owner, lk.gr) for key, r in self.m.res.items() for lk in r.g
            if lk.gr in (2, 3)
        )
        if not granted:
            return
        lid, key, owner, gr = granted[pick % len(granted)]
        mode = 5 - gr  # CW <-> PR
        self.last = ("convert", key, (lid, owner, mode, flags, ticket), None)
        self.last = self.last[:3] + (self.both(
            lambda: self.e.convert(key, owner, lid, mode, ticket=ticket, lease_ms=20_000,
                                   flags=flags),
            lambda: self.m.convert(key, owner, lid, mode, flags, ticket, 20_000, self.now,
                                   REJOIN),
        ),)

    @rule(pick=st.integers(0, 100), other_owner=st.integers(0, 9),
          subtree=rare.map(lambda b: not b), value=values, version=st.integers(0, 9),
          floor=floors, forget_kids=st.integers(0, 9))
    def release(self, pick, other_owner, subtree, value, version, floor, forget_kids):
        got = self.pick(pick)
        if got is None:
            return
        lid, path, owner, pid = got
        if other_owner == 0:
            owner = OWNERS[(OWNERS.index(owner) + 1) % 3]
        key = self.keys[path]
        ppath = self.parent_of[path]
        pkey = self.keys[ppath] if ppath and pid else key
        kids = [] if forget_kids == 0 else self.kid_keys(lid)
        rep = self.both(
            lambda: self.e.release(key, owner, lid, subtree=subtree, parent_key=pkey,
                                   child_keys=kids, value=value, version=version, floor=floor),
            lambda: self.m.release(key, owner, lid, 32 if subtree else 0, self.now, REJOIN,
                                   pkey, tuple(kids), value, version, 64, floor),
        )
        if rep is not None and rep.status == 7:
            gone = {lid}
            if subtree:
                changed = True
                while changed:
                    changed = False
                    for other, (_, _, p) in list(self.locks.items()):
                        if p in gone and other not in gone:
                            gone.add(other)
                            changed = True
            for g in gone:
                self.locks.pop(g, None)

    @rule(pick=st.integers(0, 100), other_owner=st.integers(0, 9), notify=st.booleans(),
          deadlock=st.booleans())
    def cancel(self, pick, other_owner, notify, deadlock):
        got = self.pick(pick)
        if got is None:
            return
        lid, path, owner, pid = got
        if other_owner == 0:
            owner = OWNERS[(OWNERS.index(owner) + 1) % 3]
        key = self.keys[path]
        ppath = self.parent_of[path]
        pkey = self.keys[ppath] if ppath and pid else key
        reason = "deadlock" if deadlock else "cancel"
        self.both(
            lambda: self.e.cancel(key, owner, lid, parent_key=pkey, reason=reason,
                                  notify=notify),
            lambda: self.m.cancel(key, owner, lid, self.now, REJOIN, reason, notify, pkey),
        )

    @rule(pick=st.integers(0, 100), other_owner=st.integers(0, 9))
    def yield_(self, pick, other_owner):
        got = self.pick(pick)
        if got is None:
            return
        lid, path, owner, _ = got
        if other_owner == 0:
            owner = OWNERS[(OWNERS.index(owner) + 1) % 3]
        key = self.keys[path]
        self.both(lambda: self.e.yield_(key, owner, lid),
                  lambda: self.m.yield_(key, owner, lid, self.now, REJOIN))

    @rule(owner=st.sampled_from(OWNERS), lease=leases,
          picks=st.lists(st.tuples(st.integers(0, 100), floors), max_size=5))
    def renew(self, owner, lease, picks):
        items = []
        for p, floor in picks:
            got = self.pick(p)
            if got is not None:
                items.append((self.keys[got[1]], got[0], floor))
        self.both(
            lambda: self.e.renew(owner, lease, items),
            lambda: self.m.renew([k for k, _, _ in items], owner, lease,
                                 [(i, f) for _, i, f in items], self.now, REJOIN),
            renew=True,
        )

    @rule(res=st.integers(0, len(RESOURCES) - 1), pick=st.integers(0, 100),
          by_owner=st.booleans())
    def break_(self, res, pick, by_owner):
        if pick % 8:  # an operator's break is rare; keep the queues populated
            return
        key = self.keys[RESOURCES[res][0]]
        got = self.pick(pick)
        lid = got[0] if got and not by_owner else ""
        owner = OWNERS[pick % 3] if by_owner or not got else ""
        keys = self.e.break_keys(key, lock_id=lid, owner=owner)[1:]
        self.both(lambda: self.e.break_(key, lock_id=lid, owner=owner),
                  lambda: self.m.break_(key, lid, owner, self.now, REJOIN, tuple(keys)),
                  broke=True)

    @rule(dt=st.sampled_from([0, 1, 999, 1_000, 4_000, 5_000, 30_000]))
    def advance(self, dt):
        self.now += dt
        self.e.set_clock(frozen_ms=self.now)

    @rule(go=rare)
    def restart_with_data(self, go):
        """E2, as a restart with the data kept would leave it: an epoch created by another
        server process (its id ends with another run_id) and the library loaded afresh."""
        if not go:
            return
        run = self.client.info("server")["run_id"][:8]
        eid = self.client.hget(EPOCH_KEY, "id")
        if eid is None:  # no epoch yet: the first call creates one anyway (E1)
            return
        other = "1" * 8 if run == "0" * 8 else "0" * 8
        new = eid.rsplit(b".", 1)[0] + b"." + other.encode()
        joined = self.client.hget(EPOCH_KEY, "all")  # (the same id in the joined field)
        self.client.hset(EPOCH_KEY, mapping={"id": new} if joined is None else
                         {"id": new, "all": new + joined[len(eid):]})
        self.client.execute_command(*scripts.load_command())
        self.m.reload()

    # ------------------------------------------------------------------ invariants

    def observe(self) -> tuple[dict, dict]:
        """Check the state after a step: the rules (tests/spec/invariants.py) on the Lua
        state and on the model's, each on its own, then that they agree. Returns the
        checker's views before and after the step."""
        self.ok = False
        keys = sorted(self.keys.values())
        lua, model = lua_dump(self.e, keys), self.m.dump(self.now)
        pre = self.prev
        post, mpost = state_from_dump(lua), state_from_dump(model)
        mhist = History(dict(self.hist.high))
        check_all(post)
        check_step(pre, post, self.hist)
        check_all(mpost)
        check_step(pre, mpost, mhist)
        assert lua == model
        lua_w = {}
        for member, score in self.e.waiters():
            lid, _, key = member.partition(b"|")
            lua_w[(lid.decode(), key)] = int(score)
        assert lua_w == self.m.waiters()
        self.prev = post
        self.ok = True
        return pre, post

    @invariant()
    def same_state(self):
        if not hasattr(self, "e"):
            return
        pre, post = self.observe()
        last, self.last = self.last, None
        if last is None or last[3] is None:
            return
        kind, key, details, rep = last
        status = int(rep.status)
        mode = None if rep.mode is None else int(rep.mode)
        check_reply_value(post.get(key), status, mode, rep.value, rep.version, vi(rep))  # V2
        if kind == "convert":
            lid, owner, cmode, flags, ticket = details
            check_conversion(pre.get(key), post.get(key), lid, owner, cmode, flags, ticket,
                             status)

    # ------------------------------------------------------------------ liveness

    def teardown(self):
        """Liveness: drive the state to its end as clients would, checking every step.
        Each round, every owner renews all its locks (the waiters' re-check: purges and
        processes, G10); a queued lock that waits for nothing is a failure at once; owners
        that wait for nothing release what they hold; when every owner with a grant waits,
        there must be a deadlock (a cycle of the wait-for graph, built from the inspected
        state), and one of its requests is cancelled as the detector would. In the end no
        lock is left."""
        if not hasattr(self, "e"):
            return
        try:
            if self.ok:  # (else a step failed: hypothesis reports that failure)
                self.drain()
        finally:
            self.e.close()  # its connection back to the pool (thousands of examples)

    def drain(self) -> None:
        self.last = None
        for _ in range(400):
            _, state = self.observe()
            for owner in OWNERS:
                items = [(key, lk.id, 0) for key, r in sorted(state.items())
                         for lk in r.locks if lk.owner == owner]
                if items:
                    self.drain_renew(owner, items)
            _, state = self.observe()
            stuck = stuck_locks(state)
            assert not stuck, f"liveness: {stuck} wait behind compatible grants only"
            waiting = owners_waiting(state)
            free = [(key, lk) for key, r in sorted(state.items()) for lk in r.g
                    if lk.owner not in waiting]
            if free:
                for key, lk in free:
                    self.drain_release(key, lk)
                continue
            if not queued(state):
                assert not any(r.locks for r in state.values())
                return
            cycles = deadlock_cycles(state)
            assert cycles, "liveness: requests wait forever, yet no wait-for cycle exists"
            _, key, lid = min(n for n in cycles[0] if n[0] == "Q")
            self.drain_cancel(key, state[key].find(lid))
        raise AssertionError("liveness: the locks did not drain")

    def drain_renew(self, owner: str, items: list) -> None:
        self.both(
            lambda: self.e.renew(owner, DRAIN_LEASE, items),
            lambda: self.m.renew([k for k, _, _ in items], owner, DRAIN_LEASE,
                                 [(i, f) for _, i, f in items], self.now, REJOIN),
            renew=True)

    def drain_cancel(self, key: bytes, lk) -> None:
        """The detector's choice of a victim: cancel one request of the cycle."""
        path = self.path_of[key]
        pkey = self.keys[self.parent_of[path]] if lk.parent else key
        self.both(lambda: self.e.cancel(key, lk.owner, lk.id, parent_key=pkey,
                                        reason="deadlock", notify=True),
                  lambda: self.m.cancel(key, lk.owner, lk.id, self.now, REJOIN, "deadlock",
                                        True, pkey))

    def drain_release(self, key: bytes, lk) -> None:
        path = self.path_of[key]
        pkey = self.keys[self.parent_of[path]] if lk.parent else key
        kids = sorted(k for p, k in self.keys.items() if p[0] == path[0] and p != path)
        self.both(
            lambda: self.e.release(key, lk.owner, lk.id, subtree=True, parent_key=pkey,
                                   child_keys=kids),
            lambda: self.m.release(key, lk.owner, lk.id, 32, self.now, REJOIN, pkey,
                                   tuple(kids)),
        )


@pytest.mark.timeout(600)
def test_lua_scripts_agree_with_reference_model(r):
    EngineVsModel.client = r
    EngineVsModel.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    EngineVsModel.TestCase().runTest()
