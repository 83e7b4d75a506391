"""The grant rules of ONE instance as invariants, written from the rules (docs/rules.md, after
the OpenVMS lock manager and the Linux DLM), not from the Lua scripts or the reference model
(`tests/model.py`), which mirror each other and so share their mistakes.

A check looks at a resource's state as a reader sees it (`Engine.inspect`, or the model's
`dump`, both in the shape ``{key: (name, seq, value, version, invalid, locks)}``, a lock being
``(queue, id, owner, granted, requested, flags, ticket, cticket, lease_left_ms, parent,
token, previous, kids, priority)``), before and after one script call. Every failed check
raises `Violation` naming the rule.

State invariants (after every call; `check_state`):

- **M1/G1 compatible**: the granted modes of all granted AND converting locks are pairwise
  compatible (the matrix of docs/concepts.md, rule M1, written out below, not imported).
- **G6 shape**: a granted lock requests nothing; a converting one has a granted and a requested
  mode; a waiting one has no granted mode.
- **G8 processed**: no conversion that could be granted is left queued (compatible with the
  granted mode of every other granted or converting lock; QUECVT: only when first), and while
  the conversion queue is empty the head of the wait queue cannot be granted.
- **G11 order**: the conversion queue is in (conversion ticket, id) order, the wait queue in
  (ticket, id) order.
- **V1 size**: a value block is at most `VBMAX` bytes.
- **G9 empty**: a resource without locks has no value block (valid; its version stays,
  G16).
- **F1 seq**: the resource's fencing sequence is at least every lock's token.

Transition invariants (one call, state before and after; `check_step`):

- **F1 tokens**: every grant made by the call (a lock granted that was not, or granted again:
  its token changed) takes a token above every token ever seen on the resource
  (`History`), and the sequence never goes down.
- **G11 FIFO**: a lock granted out of the wait queue (or a new request granted) never passes a
  waiter with an older ticket that is still waiting (exception: a new EXPEDITE NL request,
  G3), and is never granted while a conversion is still queued (the wait queue is processed
  only while the conversion queue is empty).
- **G5 QUECVT**: a QUECVT conversion granted by the call never passes a conversion that was
  queued before the call with an older conversion ticket (G11: a new conversion's ticket
  may place it first, and G8 then grants it).
- **V6 version**: the version of a value block never goes down, also when the value block
  disappears with the resource (G9, G13): its tombstone keeps the version (G16).

Checks of one operation and its reply:

- **G15/G4/G5/G2/G7 conversion** (`check_conversion`): a conversion whose ticket is below
  the lock's conversion ticket changes nothing and answers the lock as granted; otherwise a
  conversion to the held mode or down (M2) is granted at once keeping its token; an up or
  middle conversion compatible with every other granted or converting lock (and, with
  QUECVT, finding no conversion queued) is granted at once; otherwise NOQUEUE gives
  NOTQUEUED; a DEADLOCK reply only when the G7 condition holds (and it always does then,
  unless CONVDEADLK demotes the lock to NL).
- **V2 value** (`check_reply_value`): a reply granting any mode but NL carries the resource's
  value block, version and validity; an NL grant carries none.

Liveness (`wait_for_graph`, `stuck_locks`, `deadlock_cycles`): every queued lock waits for
something: a lock whose granted mode is incompatible with the mode it requests, a
conversion ahead of it (a waiter waits for every queued conversion and every waiter ahead;
a QUECVT conversion for the conversions ahead). A holder gives its locks back only when its
owner waits for nothing, so a granted mode waits for every queued request of its owner. A
deadlock is a cycle in that graph; a single owner queued behind its own incompatible lock
is one (as VMS reports it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

NL, CR, CW, PR, PW, EX = range(6)
F_NOQUEUE, F_EXPEDITE, F_QUECVT, F_CONVDEADLK = 1, 2, 4, 8
VBMAX = 64

# M1: the compatibility matrix (docs/concepts.md). Rows: granted mode; columns: requested, NL..EX.
_MATRIX = {
    NL: "yyyyyy",
    CR: "yyyyyn",
    CW: "yyynnn",
    PR: "yynynn",
    PW: "yynnnn",
    EX: "ynnnnn",
}


def compatible(granted: int | None, requested: int) -> bool:
    """M1. A lock without a granted mode (a waiter) blocks nothing."""
    return granted is None or _MATRIX[granted][requested] == "y"


def is_down(held: int, new: int) -> bool:
    """M2: numerically lower, except PR->CW (a middle conversion, treated as up)."""
    return new < held and not (held == PR and new == CW)


class Violation(AssertionError):
    """A rule of docs/rules.md does not hold; the message starts with the rule id."""


@dataclass(frozen=True)
class Lk:
    queue: str  #: 'G', 'C' or 'W'
    id: str
    owner: str
    gr: int | None
    rq: int | None
    flags: int
    ticket: int
    cticket: int
    lease_left: int
    parent: str
    token: int

    @property
    def alive(self) -> bool:
        return self.lease_left > 0


@dataclass(frozen=True)
class Res:
    key: bytes
    name: bytes
    seq: int
    value: bytes | None
    version: int
    invalid: int
    locks: tuple[Lk, ...]

    def q(self, name: str) -> list[Lk]:
        return [lk for lk in self.locks if lk.queue == name]

    @property
    def g(self) -> list[Lk]:
        return self.q("G")

    @property
    def c(self) -> list[Lk]:
        return self.q("C")

    @property
    def w(self) -> list[Lk]:
        return self.q("W")

    def holders(self) -> list[Lk]:
        """Locks with a granted mode: granted and converting."""
        return [lk for lk in self.locks if lk.queue in "GC"]

    def find(self, lock_id: str) -> Lk | None:
        for lk in self.locks:
            if lk.id == lock_id:
                return lk
        return None

    def all_alive(self) -> bool:
        return all(lk.alive for lk in self.locks)


State = dict[bytes, Res]


def state_from_dump(dump: Mapping[bytes, tuple]) -> State:
    """Build the checker's view from the `{key: (name, seq, value, version, invalid,
    locks)}` shape (tests/engine/test_model_vs_lua.py `lua_dump`, `Model.dump`)."""
    out: State = {}
    for key, (name, seq, value, version, invalid, locks) in dump.items():
        lks = tuple(
            Lk(queue=q, id=i, owner=o, gr=None if gr is None else int(gr),
               rq=None if rq is None else int(rq), flags=f, ticket=t, cticket=ct,
               lease_left=left, parent=p, token=tok)
            for (q, i, o, gr, rq, f, t, ct, left, p, tok, *_rest) in locks
        )
        out[key] = Res(key, name, seq, value, version, invalid, lks)
    return out


def _fail(rule: str, r: Res, msg: str) -> None:
    raise Violation(f"{rule} on {r.key!r}: {msg}\n  state: {_show(r)}")


def _show(r: Res) -> str:
    def one(lk: Lk) -> str:
        rq = "" if lk.rq is None else f">{lk.rq}"
        return (f"{lk.queue}:{lk.id}/{lk.owner} {lk.gr}{rq} f={lk.flags} t={lk.ticket} "
                f"ct={lk.cticket} tok={lk.token} left={lk.lease_left}")
    return (f"seq={r.seq} v={r.value!r} vv={r.version} vi={r.invalid} ["
            + "; ".join(one(lk) for lk in r.locks) + "]")


# ----------------------------------------------------------------------------- state


def grantable_conversion(r: Res, lk: Lk) -> bool:
    """G8: a queued conversion that processing must grant."""
    c = r.c
    if lk.flags & F_QUECVT and c[0].id != lk.id:
        return False
    return all(compatible(o.gr, lk.rq) for o in r.holders() if o.id != lk.id)


def check_state(r: Res, vbmax: int = VBMAX) -> None:
    """The state invariants listed in the module docstring, on one resource."""
    holders = r.holders()
    for i, a in enumerate(holders):  # M1/G1
        for b in holders[i + 1:]:
            if not (compatible(a.gr, b.gr) and compatible(b.gr, a.gr)):
                _fail("M1/G1", r, f"{a.id} ({a.gr}) and {b.id} ({b.gr}) are both granted")
    for lk in r.locks:  # G6 shape
        ok = {"G": lk.gr is not None and lk.rq is None,
              "C": lk.gr is not None and lk.rq is not None,
              "W": lk.gr is None and lk.rq is not None}[lk.queue]
        if not ok:
            _fail("G6", r, f"lock {lk.id} in queue {lk.queue} has modes {lk.gr}>{lk.rq}")
    for lk in r.c:  # G8
        if grantable_conversion(r, lk):
            _fail("G8", r, f"conversion {lk.id} to {lk.rq} could be granted but waits")
    if not r.c and r.w:
        head = r.w[0]
        if all(compatible(o.gr, head.rq) for o in holders):
            _fail("G8", r, f"the head of the wait queue {head.id} ({head.rq}) could be "
                           "granted but waits")
    c_order = [(lk.cticket, lk.id) for lk in r.c]  # G11
    w_order = [(lk.ticket, lk.id) for lk in r.w]
    if c_order != sorted(c_order) or w_order != sorted(w_order):
        _fail("G11", r, "a queue is not in ticket order")
    if r.value is not None and len(r.value) > vbmax:  # V1
        _fail("V1", r, f"value block of {len(r.value)} bytes")
    if not r.locks and (r.value is not None or r.invalid != 0):  # G9 (its version: G16)
        _fail("G9", r, "a resource without locks keeps a value block")
    for lk in r.locks:  # F1
        if lk.token > r.seq:
            _fail("F1", r, f"lock {lk.id} has token {lk.token} above the sequence {r.seq}")


# ----------------------------------------------------------------------------- steps


@dataclass
class History:
    """What the checker has seen of each resource across calls (F1: every token ever
    granted there)."""

    high: dict[bytes, int] = field(default_factory=dict)


def check_step(before: State, after: State, hist: History) -> None:
    """The transition invariants of the module docstring, for every resource."""
    for key, post in after.items():
        pre = before.get(key)
        pre_locks = {lk.id: lk for lk in pre.locks} if pre else {}
        # F1: tokens of the grants made by this call
        high = hist.high.get(key, 0)
        if pre is not None and post.seq < pre.seq:
            _fail("F1", post, f"the sequence went down from {pre.seq}")
        new_tokens = []
        for lk in post.holders():
            old = pre_locks.get(lk.id)
            if old is None or old.queue == "W" or old.token != lk.token:
                new_tokens.append((lk.token, lk.id))
        for tok, lid in new_tokens:
            if tok <= high:
                _fail("F1", post, f"lock {lid} granted with token {tok}, not above {high}, "
                                  "a token seen before on this resource; before: "
                                  + (_show(pre) if pre else "absent"))
        if len({t for t, _ in new_tokens}) != len(new_tokens):
            _fail("F1", post, f"two grants of one call share a token: {new_tokens}")
        hist.high[key] = max([high, *(t for t, _ in new_tokens),
                              *(lk.token for lk in post.locks)])
        if pre is None:
            continue
        # G11 FIFO / wait queue only while the conversion queue is empty
        for lk in post.g:
            old = pre_locks.get(lk.id)
            if old is not None and old.queue != "W":
                continue
            if old is None and lk.flags & F_EXPEDITE and lk.gr == NL:
                continue  # G3
            # (a lock queued by this call itself, after a purge granted lk, is no
            # exception: only locks queued before the call count)
            if any(o.id in pre_locks and pre_locks[o.id].queue == "C" for o in post.c):
                _fail("G8", post, f"waiter {lk.id} granted while conversions are queued")
            for w in post.w:
                if w.id in pre_locks and (w.ticket, w.id) < (lk.ticket, lk.id):
                    _fail("G11", post, f"{lk.id} (ticket {lk.ticket}) granted ahead of "
                                       f"waiter {w.id} (ticket {w.ticket})")
        # G5/G8 QUECVT: never passes a conversion queued ahead of it
        for lk in post.g:
            old = pre_locks.get(lk.id)
            if old is None or not lk.flags & F_QUECVT or old.token == lk.token:
                continue
            if old.queue == "W":
                continue
            # its place is its conversion ticket (G11), also for one just asked
            passed = [o for o in pre.c if (o.cticket, o.id) < (lk.cticket, lk.id)]
            still = {o.id for o in post.c}
            for o in passed:
                if o.id in still:
                    _fail("G5", post, f"QUECVT conversion {lk.id} granted past {o.id}")
        # V6 and G16: the version never goes down, not even when the value block goes with
        # its resource (G9, G13): the tombstone keeps it (only its expiry, 60 s later, which
        # no call here outlives, forgets it)
        if post.version < pre.version:
            _fail("V6", post, f"version went down from {pre.version} to {post.version}")


def conversion_deadlock(pre: Res, lk: Lk, mode: int, cticket: int) -> bool:
    """G7, as docs/rules.md words it: queued in conversion-ticket order, the conversion
    deadlocks if one ahead requests a mode incompatible with its granted mode, or one behind
    is mutually incompatible with it."""
    me = (cticket, lk.id)
    for o in pre.c:
        if o.id == lk.id:
            continue
        if (o.cticket, o.id) < me:
            if not compatible(lk.gr, o.rq):
                return True
        elif not compatible(lk.gr, o.rq) and not compatible(o.gr, mode):
            return True
    return False


def check_conversion(pre: Res | None, post: Res | None, lock_id: str, owner: str, mode: int,
                     flags: int, cticket: int, status: int | None) -> None:
    """G15, G2, G4, G5, G7 for one convert call whose reply status is `status` (None: an error
    reply). Decided from the state before the call; skipped where a lease ran out before it
    (the purge then changes the state first, G10) or the call was refused."""
    if pre is None or status is None or not pre.all_alive():
        return
    lk = pre.find(lock_id)
    if lk is None or lk.owner != owner or lk.queue != "G":
        return
    GRANTED, QUEUED, NOTQUEUED, DEADLOCK, RECOVERING = 0, 1, 2, 3, 4
    now = post.find(lock_id) if post is not None else None
    if cticket < lk.cticket:  # G15: older than the lock's last up-conversion: no change
        if (status != GRANTED or now is None or now.queue != "G" or now.gr != lk.gr
                or now.token != lk.token):
            _fail("G15", post or pre, f"{lock_id} {lk.gr}->{mode} with ticket {cticket} "
                                      f"below its {lk.cticket} gave {status}, changing it")
        return
    if mode == lk.gr or is_down(lk.gr, mode):  # G4
        if status != GRANTED or now is None or now.gr != mode or now.token != lk.token:
            _fail("G4", post or pre, f"{lock_id} {lk.gr}->{mode} gave {status}, not granted "
                                     "at once with its token")
        return
    if status == RECOVERING:  # E1
        return
    at_once = all(compatible(o.gr, mode) for o in pre.holders() if o.id != lock_id) and not (
        flags & F_QUECVT and pre.c)
    if at_once:  # G5
        if status != GRANTED or now is None or now.queue != "G" or now.gr != mode:
            _fail("G5", post or pre, f"{lock_id} {lk.gr}->{mode} can be granted at once but "
                                     f"got status {status}")
        return
    if flags & F_NOQUEUE:  # G2
        if status != NOTQUEUED:
            _fail("G2", post or pre, f"NOQUEUE conversion {lock_id} got status {status}")
        return
    dl = conversion_deadlock(pre, lk, mode, cticket)
    if status == DEADLOCK:
        if not dl or flags & F_CONVDEADLK:
            _fail("G7", post or pre, f"DEADLOCK reply to {lock_id} {lk.gr}->{mode} "
                                     "without a conversion deadlock")
        if now is None or now.queue != "G" or now.gr != lk.gr:
            _fail("G7", post or pre, f"{lock_id} lost its granted mode on DEADLOCK")
        return
    if dl and not flags & F_CONVDEADLK:
        _fail("G7", post or pre, f"{lock_id} {lk.gr}->{mode} is a conversion deadlock but "
                                 f"got status {status}")
    if dl:  # CONVDEADLK: demoted to NL, then any conversion from NL
        if now is None or not ((now.queue == "C" and now.gr == NL) or now.queue == "G"):
            _fail("G7", post or pre, f"CONVDEADLK conversion {lock_id} not demoted to NL")
        return
    # G6 then G8: queued at its conversion ticket, then granted at once by processing only
    # if a QUECVT conversion finds itself first (by ticket) and compatible
    first = all((cticket, lock_id) < (o.cticket, o.id) for o in pre.c)
    by_g8 = flags & F_QUECVT and first and all(
        compatible(o.gr, mode) for o in pre.holders() if o.id != lock_id)
    if by_g8 and status == GRANTED and now is not None and now.gr == mode:
        return
    if status != QUEUED or now is None or now.queue != "C" or now.gr != lk.gr:  # G6
        _fail("G6", post or pre, f"{lock_id} {lk.gr}->{mode} should be queued keeping its "
                                 f"mode, got status {status}")


def check_reply_value(post: Res | None, status: int, gr: int | None, value: bytes | None,
                      version: int, invalid: int) -> None:
    """V2: a grant in any mode but NL returns the value block, its version and validity."""
    if status != 0 or post is None or gr is None:
        return
    if gr == NL:
        if value is not None or version != 0:
            _fail("V2", post, "an NL grant returned a value block")
        return
    if (value, version, invalid) != (post.value, post.version, post.invalid):
        _fail("V2", post, f"a grant in mode {gr} returned {(value, version, invalid)}")


# ----------------------------------------------------------------------------- liveness

Node = tuple[str, bytes, str]  # ('Q', key, lock id): the request; ('H', key, id): the grant


def wait_for_graph(state: State) -> dict[Node, set[Node]]:
    """Who waits for whom, among the locks whose lease still runs (module docstring)."""
    edges: dict[Node, set[Node]] = {}
    queued_of: dict[str, list[Node]] = {}
    for key, r in state.items():
        for lk in r.locks:
            if lk.alive and lk.queue in "CW":
                queued_of.setdefault(lk.owner, []).append(("Q", key, lk.id))
    for key, r in state.items():
        holders = [o for o in r.holders() if o.alive]
        for lk in r.locks:
            if not lk.alive:
                continue
            if lk.queue in "GC":
                edges[("H", key, lk.id)] = set(queued_of.get(lk.owner, ()))
            if lk.queue == "G":
                continue
            out = {("H", key, o.id) for o in holders
                   if o.id != lk.id and not compatible(o.gr, lk.rq)}
            if lk.queue == "C":
                if lk.flags & F_QUECVT:
                    for o in r.c:
                        if o.id == lk.id:
                            break
                        if o.alive:
                            out.add(("Q", key, o.id))
            else:
                out |= {("Q", key, o.id) for o in r.c if o.alive}
                for o in r.w:
                    if o.id == lk.id:
                        break
                    if o.alive:
                        out.add(("Q", key, o.id))
            edges[("Q", key, lk.id)] = out
    return edges


def stuck_locks(state: State) -> list[Node]:
    """Queued locks that wait for nothing at all (behind compatible grants only)."""
    g = wait_for_graph(state)
    return sorted(n for n, out in g.items() if n[0] == "Q" and not out)


def deadlock_cycles(state: State) -> list[set[Node]]:
    """The strongly connected components of the wait-for graph that are cycles (a single
    node only with an edge to itself): the deadlocks."""
    g = wait_for_graph(state)
    index: dict[Node, int] = {}
    low: dict[Node, int] = {}
    stack: list[Node] = []
    on: set[Node] = set()
    out: list[set[Node]] = []
    counter = [0]

    def visit(v: Node) -> None:  # Tarjan, iterative enough for a few dozen nodes
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in g.get(v, ()):
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def queued(state: State) -> list[Lk]:
    return [lk for r in state.values() for lk in r.locks if lk.alive and lk.queue in "CW"]


def owners_waiting(state: State) -> set[str]:
    return {lk.owner for lk in queued(state)}


def dump_views(keys: Iterable[bytes], views: Iterable[Any]) -> dict[bytes, tuple]:
    """`Engine.inspect`'s views in the `{key: (name, seq, value, version, invalid, locks)}`
    shape `state_from_dump` takes (invalid: 0 valid, 1 invalid (V4), 2 forgotten (V5))."""
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
        out[key] = (v.name, v.seq, v.value, v.version, 2 if v.forgotten else int(not v.valid),
                    locks)
    return out


def check_all(state: State, vbmax: int = VBMAX) -> None:
    for r in state.values():
        check_state(r, vbmax)


def keys_of(state: Iterable[Res]) -> list[bytes]:
    return sorted(r.key for r in state)
