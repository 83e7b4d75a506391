"""The Lua scripts and the pure-Python reference model agree (DESIGN section 8).

A hypothesis state machine drives random operation sequences (three owners, two trees of
resources with parents, every mode and flag, values, floors, bad arguments, lease expiry by
advancing a frozen clock) through the scripts on a real redis-server and through the model,
and compares every reply, the full resource state and the waiter index after every step.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from redlockdlm.engine.instance import Engine
from redlockdlm.engine.model import Model
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
EXAMPLES = int(os.environ.get("DLM_MODEL_EXAMPLES", "200"))

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
    out = {}
    for key, v in zip(keys, views):
        if v is None:
            continue
        locks = tuple(
            (lk.queue, lk.lock_id, lk.owner, lk.mode, lk.requested, lk.flags, lk.ticket,
             lk.cticket, lk.lease_left_ms, lk.parent, lk.token, lk.previous,
             tuple(sorted(lk.kids)), lk.priority)
            for lk in v.locks
        )
        out[key] = (v.name, v.seq, v.value, v.version, vi(v), locks)
    return out


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
        if not restarted:
            self.m.init_fresh(self.now)
        self.keys = {p: self.e.key(*p) for p, _ in RESOURCES}
        self.names = {p: self.e.name(*p) for p, _ in RESOURCES}
        self.parent_of = dict(RESOURCES)
        self.locks: dict[str, tuple] = {}  # id -> (path, owner, parent id)
        self.n = 0

    # ------------------------------------------------------------------ helpers

    def both(self, lua_call, model_call, renew: bool = False, broke: bool = False):
        try:
            a = lua_call()
        except DLMError as exc:
            a = type(exc)
        try:
            b = model_call()
        except DLMError as exc:
            b = type(exc)
        if isinstance(a, type) or isinstance(b, type):
            assert a == b, f"lua {a!r} model {b!r}"
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
        return a

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
          parent_pick=st.integers(0, 50), retry=st.integers(0, 6), priority=priorities)
    def request(self, res, owner, mode, noqueue, expedite, ticket, lease, parent_pick, retry,
                priority):
        path, ppath = RESOURCES[res]
        flags = (1 if noqueue else 0) | (2 if expedite else 0)
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
        if rep is not None and rep.status in (0, 1) and lid not in self.locks:
            self.locks[lid] = (path, owner, pid)

    @rule(pick=st.integers(0, 100), other_owner=st.integers(0, 9), mode=up_modes,
          flags=st.sampled_from([0, 0, 4, 4, 8, 12, 1, 16]), ticket=tickets, lease=leases,
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
        self.both(
            lambda: self.e.convert(key, owner, lid, mode, ticket=ticket, lease_ms=lease,
                                   flags=flags, value=value, version=version, floor=floor,
                                   priority=priority),
            lambda: self.m.convert(key, owner, lid, mode, flags, ticket, lease, self.now, REJOIN,
                                   value, version, 64, floor, priority),
        )

    @rule(pick=st.integers(0, 100), mode=up_modes, flags=st.sampled_from([0, 4, 8, 12]),
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
        self.both(
            lambda: self.e.convert(key, owner, lid, mode, ticket=ticket, lease_ms=20_000,
                                   flags=flags, priority=priority),
            lambda: self.m.convert(key, owner, lid, mode, flags, ticket, 20_000, self.now,
                                   REJOIN, priority=priority),
        )

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

    # ------------------------------------------------------------------ invariants

    @invariant()
    def same_state(self):
        if not hasattr(self, "e"):
            return
        keys = sorted(self.keys.values())
        assert lua_dump(self.e, keys) == self.m.dump(self.now)
        lua_w = {}
        for member, score in self.e.waiters():
            lid, _, key = member.partition(b"|")
            lua_w[(lid.decode(), key)] = int(score)
        assert lua_w == self.m.waiters()


@pytest.mark.timeout(600)
def test_lua_scripts_agree_with_reference_model(r):
    EngineVsModel.client = r
    EngineVsModel.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=50, deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    EngineVsModel.TestCase().runTest()
