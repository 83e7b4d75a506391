"""The quorum protocol: every decision of the client, and no I/O (docs/design.md §6).

The sync client (`redlockdlm.client`) and the asyncio client (`redlockdlm.aio`) only move
bytes: they send the commands this module builds to all instances at once, feed the replies
and pub/sub events back, and wait until the deadline this module names. So both clients
decide alike, and the rules can be tested without Redis.

Vocabulary: a *vote* is one instance's state for one lock (granted there, queued there,
absent, unreachable...). A lock is *held* when at least Q = N // 2 + 1 votes are granted and
their leases, measured from the moment the request or renewal that set them was *sent*, are
still valid after subtracting the clock drift allowance (Redlock):
``validity = lease - (now - sent_at) - drift``.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine import codec
from .engine.codec import Event, LockReply
from .engine.keys import (
    EPOCH_KEY,
    channel_prefix,
    check_id,
    check_name,
    check_namespace,
    display_name,
    epoch_key,
    key_slot,
    resource_key,
    show_name,
    slot_channel_prefix,
    slot_waiters_key,
    waiters_key,
)
from .engine.modes import (
    COMPAT,
    MAX_PRIORITY,
    MIN_PRIORITY,
    Flag,
    Mode,
    Status,
    is_down_conversion,
)
from .errors import (
    ConfigurationError,
    CorruptKey,
    Deadlock,
    DLMError,
    DuplicateInstance,
    EvictionPolicy,
    InstancesRecovering,
    InvalidArgument,
    InvalidType,
    LeaseTooLong,
    LockLost,
    LockReleased,
    LockStateError,
    LockTimeout,
    NotOwner,
    NotQueued,
    ParentNotGranted,
    QuorumUnavailable,
)

DRIFT_FACTOR = 0.01  #: Redlock: clock drift allowance per ms of lease
DRIFT_MIN_MS = 2
#: Locks per renew call: ~10 ms of script time each, so no instance is held for long
RENEW_CHUNK = 256
#: The hash slot whose epoch a cluster member's first contact (`init hello`) reads
HELLO_SLOT = 0
#: Scripts whose KEYS[1], KEYS[2] are the epoch and the waiter index and ARGV[2] the channel
#: prefix, with the resource key (the slot of the call) at KEYS[3]
SLOTTED_SCRIPTS = frozenset(("request", "convert", "release", "cancel", "yield", "renew", "break"))


class Vote(enum.Enum):
    UNKNOWN = "unknown"  #: no answer yet
    GRANTED = "granted"
    QUEUED = "queued"  #: waiting, or converting (still granted in the old mode)
    ABSENT = "absent"  #: the instance does not have the lock (released, expired, broken)
    RECOVERING = "recovering"  #: E1: the instance may not grant yet
    ERROR = "error"  #: unreachable, timed out, or answered nonsense
    NOPARENT = "noparent"  #: H1: the parent is not granted there
    NOTQUEUED = "notqueued"
    DEADLOCK = "deadlock"


class Phase(enum.Enum):
    ACQUIRING = "acquiring"
    HELD = "held"
    CONVERTING = "converting"
    RELEASED = "released"
    LOST = "lost"
    FAILED = "failed"


@dataclass
class InstanceVote:
    vote: Vote = Vote.UNKNOWN
    mode: Mode | None = None  #: mode granted there
    token: int = 0
    sent_at: float = 0.0  #: monotonic time the request/renewal that set the lease was sent
    value: bytes | None = None
    version: int = 0
    valid: bool = True
    wait_ms: int = -1
    retry_at: float = 0.0
    epoch: str = ""
    #: grants with a token up to this are stale (events and replies): the grant we gave back
    #: last (Y1), or the resource's fencing sequence in our last QUEUED reply from there
    #: (every grant after that reply has a larger token)
    stale_token: int = 0
    error: str = ""  #: why the last call to this instance failed (one line), for messages
    #: that failure does not heal by waiting (authentication, ACL, not Redis, TLS
    #: certificate): a wait does not go on for it (R3)
    lasting: bool = False
    recover_until: float = 0.0  #: E1: monotonic time the instance's rejoin window ends
    #: that failure was the instance's own error reply (it answered), not a lost connection
    answered: bool = False
    by_event: bool = False  #: the current GRANTED came from a pub/sub event
    #: the current GRANTED (in the mode a conversion asks) was learnt from a renewal, which
    #: carries no value block: it holds that mode there, but does not complete the
    #: conversion until a reply or event brings the value (`granted` leaves it out)
    novalue: bool = False
    granted_at: float = 0.0  #: monotonic time we learnt of the current grant
    #: our lease there ran out before we heard from it again (we were paused or cut off):
    #: the instance may have expired our lock and a re-sent request re-created it, so a
    #: grant event may be about the old one; only a reply counts until one says GRANTED
    lapsed: bool = False
    #: V5: the instance restarted empty and may have forgotten a newer value block
    forgotten: bool = False
    #: R2: the instance restarted empty and lost our held lock: request it again there
    rejoin: bool = False
    #: an operator broke the lock there (`C|id|broken`): never requested there again
    broken: bool = False


def covers(held: Mode | None, mode: Mode | None) -> bool:
    """True if a grant in `held` excludes at least every mode `mode` excludes (EX covers
    everything, every mode covers NL): an instance granting us `held` protects a holder
    of `mode` there."""
    return (held, mode) in _COVERS


#: every (held, mode) pair where `held` covers `mode` (computed once: `covers` runs for
#: every vote whenever a lock's validity is read)
_COVERS = frozenset((a, b) for a in Mode for b in Mode
                    if all(COMPAT[a][x] <= COMPAT[b][x] for x in Mode))


def new_id() -> str:
    """A random lock or owner id (the same on every instance)."""
    return os.urandom(8).hex()


class Ticket:
    """Client tickets: microseconds of this client's clock, strictly increasing. The same
    ticket goes to every instance so queues agree on the order (G11)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        t = max(time.time_ns() // 1000, self._last + 1)
        self._last = t
        return t


class Call(tuple):
    """A script call: (script name, keys, args). The I/O layer turns it into a command with
    `redlockdlm.engine.scripts.command` and parses the reply by `name`."""

    __slots__ = ()

    def __new__(cls, name: str, keys: list[bytes], args: list[bytes]) -> Call:
        return tuple.__new__(cls, (name, keys, args))

    @property
    def name(self) -> str:
        return self[0]


def command(name: str, keys: list[bytes], args: list[bytes]) -> Call:
    return Call(name, keys, args)


@dataclass
class Outcome:
    """What the I/O layer must do next for one lock."""

    done: bool = False  #: held (or converted): wake the caller
    error: DLMError | None = None  #: failed: clean up with `cleanup`, then raise
    cleanup: list[tuple[int, tuple]] = field(default_factory=list)  #: (instance, command)
    actions: list[tuple[int, tuple]] = field(default_factory=list)  #: send now, no waiting
    wake_at: float | None = None  #: monotonic time to re-evaluate (re-check, retry)
    #: a failed down-conversion that stands (G4): raise `error`, roll nothing back
    keep: bool = False


class LockCore:
    """One lock's protocol state. Mutated only through `Session` (one thread or task)."""

    def __init__(self, session: Session, path: tuple[bytes, ...], mode: Mode, flags: int,
                 lease_ms: int, parent: LockCore | None, lock_id: str,
                 priority: int = 0) -> None:
        self.session = session
        self.id = lock_id
        self.path = path
        self.key = resource_key(session.ns, path)
        self._slot: int | None = None
        self.name = display_name(path)
        self.parent = parent
        self.children: list[LockCore] = []
        self.mode: Mode | None = None  #: held mode (None until granted)
        self.rq: Mode = mode  #: requested mode (acquiring or converting)
        self.flags = flags
        #: P1: of the request, then of the latest conversion (the detector's victim, D8)
        self.priority = priority
        self.lease_ms = lease_ms
        #: lease changes (`Session.change_lease`): (monotonic time, lease before it), oldest
        #: first; a vote counts the lease its call carried (`lease_at`), not today's
        self.lease_changes: list[tuple[float, int]] = []
        self.ticket = session.tickets.next()
        self.cticket = 0
        #: the conversion in progress as sent: (mode, flags, value, version), for re-sending
        #: it where it did not take (`recheck_cmds`)
        self.cargs: tuple[Mode, int, bytes | None, int] | None = None
        self.phase = Phase.ACQUIRING
        self.votes = [InstanceVote() for _ in range(session.n)]
        self.token = 0
        self.value: bytes | None = None
        self.version = 0
        self.value_valid = True
        self.new_value: bytes | None = None  #: set by the holder, written on release/down
        self.error: DLMError | None = None
        self.deadline: float | None = None
        self.seen_blocking: set[tuple[str, int]] = set()
        self.yield_pending: set[int] = set()
        self.round_done = False  #: the split-vote yield of this round was sent
        self.pending: set[int] = set()  #: instances whose answer to this round is awaited
        #: instances where a repair (R1) is in flight; a conversion waits for it to land
        self.repairing: set[int] = set()
        #: a failed conversion's clean-up is in flight (from `evaluate_convert`'s error to
        #: `rollback_convert` / `end_abandon`): the lock is back in phase HELD, but what
        #: each instance holds is not decided yet, and `mode` may be the sideways claim
        #: (CR), not a mode the lock was converted to; no repair (R1, R2) is sent meanwhile
        self.unwinding = False
        #: (value, version) of this grant's last write by a down-conversion, for R1
        self.written: tuple[bytes, int] | None = None
        #: that down-conversion returned without an error (V7 reads the write back as
        #: valid only then: otherwise it may be stored nowhere)
        self.written_ok = False
        #: commands about this lock in flight (`flows.Flows._send_and_feed`): a withdrawal
        #: or release waits for them, so none lands after it
        self.sends = 0
        #: why the lock was reported lost (`Session.check_held`), for messages
        self.lost_reason = ""
        # Owned by the client (flows.py and its transport), never read by the core: the
        # user's handle (Lock / AsyncLock), the request (Request / AsyncRequest), and what
        # wakes a flow waiting on this lock (`flows.Wait`: a threading.Condition, an
        # asyncio.Event).
        self.user: Any = None
        self.request: Any = None
        self.waker: Any = None
        #: the lock waits (its request or conversion was not settled by its first round):
        #: it reads grant events until it is granted or fails (`Session.reads_events`)
        self.waits = False
        #: cluster members where the transport subscribed (or tried) the lock's slot for
        #: this wait (`flows.Flows._event_gaps`)
        self.listening: set[int] = set()

    @property
    def slot(self) -> int:
        """The Redis Cluster hash slot of the lock's tree (H2: one slot per tree), where its
        keys, epoch, waiter index and event channel live on a cluster member."""
        s = self._slot
        if s is None:
            s = self._slot = key_slot(self.key)
        return s

    # ----------------------------------------------------------------- reading the votes

    def drift_s(self, lease_ms: int | None = None) -> float:
        lease = self.lease_ms if lease_ms is None else lease_ms
        return (lease * DRIFT_FACTOR + DRIFT_MIN_MS) / 1000.0

    def lease_at(self, sent_at: float) -> int:
        """The lease (ms) a call about this lock sent at `sent_at` carried: the lease in
        force then (L1). Calls are built and timed in one step of the client, and a lease
        changes in a step of its own, so a call sent before a change carried the old lease
        and one sent after it the new; a call timed at the very instant of a change counts
        the shorter of the two."""
        for k, (at, before) in enumerate(self.lease_changes):
            if sent_at < at:
                return before
            if sent_at == at:
                after = (self.lease_changes[k + 1][1] if k + 1 < len(self.lease_changes)
                         else self.lease_ms)
                return min(before, after)
        return self.lease_ms

    def vote_validity(self, v: InstanceVote, now: float) -> float:
        lease = self.lease_at(v.sent_at) if self.lease_changes else self.lease_ms
        # (`drift_s(lease)` written out: called for every vote of every grant and check)
        return v.sent_at + lease / 1000.0 - (lease * DRIFT_FACTOR + DRIFT_MIN_MS) / 1000.0 - now

    def granted(self, now: float, mode: Mode | None = None) -> list[int]:
        """Instances where the lock is granted (in `mode`, if given) with a valid lease."""
        return [i for i, v in enumerate(self.votes)
                if v.vote is Vote.GRANTED and (mode is None or v.mode == mode)
                and not v.novalue and self.vote_validity(v, now) > 0]

    def converting_can_queue(self) -> bool:
        """Whether the conversion going on can wait on an instance: an up or middle one
        (G5). One to the same mode or down is granted at once wherever the lock is granted
        (G4): it is never split between instances, and a vote granted in its mode may be
        the grant the lock already held (the same mode) rather than the conversion's."""
        return (self.phase is Phase.CONVERTING and self.mode is not None
                and self.rq != self.mode and not is_down_conversion(self.mode, self.rq))

    def holds(self, v: InstanceVote) -> bool:
        """Whether vote `v` keeps the lock's mode on its instance (lease aside): a queued
        conversion keeps the old mode granted (G6); a grant in a mode that does not cover
        the held one (an up-conversion that instance missed: its request was lost, and a
        renewal found the old mode) protects nothing there, as an incompatible request is
        granted beside it. While converting, the requested mode counts too."""
        if v.vote is Vote.QUEUED:
            return v.mode is not None
        return v.vote is Vote.GRANTED and (
            covers(v.mode, self.mode)
            or (self.phase is Phase.CONVERTING and covers(v.mode, self.rq)))

    def validity(self, now: float) -> float:
        """Seconds the lock stays held: the Q-th best validity among the votes that keep
        its mode (`holds`). A grant there in a weaker mode does not count: its fresh lease
        would say the lock is held for another lease while only a minority protects it
        (found by the simulator, profile r1 seed 153)."""
        vals = sorted((self.vote_validity(v, now) for v in self.votes if self.holds(v)),
                      reverse=True)
        q = self.session.quorum
        return vals[q - 1] if len(vals) >= q else 0.0

    def count(self, *kinds: Vote) -> int:
        return sum(1 for v in self.votes if v.vote in kinds)

    def lasting_failures(self) -> int:
        """Instances whose failure waiting does not heal (R3: `InstanceVote.lasting`)."""
        return sum(1 for v in self.votes if v.vote is Vote.ERROR and v.lasting)

    def next_version(self) -> int:
        """The version a write of this grant stores: derived from the fencing token, so
        versions grow across conflicting writers even where an instance lost the resource
        (G9, a restart) and counted again from 0 while another kept an older, higher one;
        plain `version + 1` would let that stale value win the highest-version read. The
        token of a later conflicting holder is larger, so token * 4 orders writers; + 1
        for a second write by the same grant (EX -> PW -> lower)."""
        return max(self.token * 4, self.version + 1)

    def adopt_grant(self, now: float, mode: Mode) -> None:
        """Quorum reached: fix the token and value block from the granting votes."""
        gi = self.granted(now, mode)
        self.token = max(self.votes[i].token for i in gi)
        self.mode = mode
        if mode != Mode.NL:
            top = max(self.votes[i].version for i in gi)
            # V5: an instance of the quorum restarted empty and may have held a newer
            # value than any the others have
            forgotten = any(self.votes[i].forgotten for i in gi)
            if self.written is not None and self.written[1] > top:
                # V7: this grant's own last write (a down-conversion from PW/EX) is newer
                # than anything the quorum reports: the write reached only instances
                # outside it (the others were not held in PW/EX, or their call failed and
                # one still holds the stronger mode with the older value). A later
                # conflicting writer would have a larger version, on a quorum this one
                # meets; so the own write is the latest. Not valid where an instance of
                # the quorum says its (older) value is not: a PW/EX holder after this
                # write may have expired there (V4), where the write did not arrive.
                self.value, self.version = self.written
                self.value_valid = (self.written_ok and not forgotten
                                    and all(self.votes[i].valid for i in gi))
                self.new_value = None
                return
            at_top = [self.votes[i] for i in gi if self.votes[i].version == top]
            self.version = top
            self.value = at_top[0].value
            # One version, two values: a holder cut off from the majority wrote version
            # v+1 where it still held (a minority of instances) while the next holder,
            # granted by the majority, wrote its own v+1 there. Which one is the latest
            # cannot be told, so the value is not valid (V4) until the next write (top+1).
            self.value_valid = (all(v.valid for v in at_top)
                                and all(v.value == self.value for v in at_top)
                                and not forgotten)
        self.new_value = None


class Session:
    """All the protocol state of one client: its owner id, instances and locks."""

    def __init__(self, n: int, namespace: str = "default", *, lease_ms: int = 10_000,
                 rejoin_ms: int | None = None, vbmax: int = 64, owner: str | None = None) -> None:
        if not isinstance(n, int) or n < 1:
            raise InvalidArgument("at least one instance is needed")
        if n % 2 == 0:
            raise InvalidArgument(f"use an odd number of instances (got {n}): an even one "
                                  "tolerates no more failures than the odd number below it")
        check_lease(lease_ms)
        if rejoin_ms is not None:
            check_int("rejoin_ms", rejoin_ms, 0, 86_400_000)
        check_int("vbmax", vbmax, 0, 65_536)
        self.n = n
        self.quorum = quorum(n)
        self.ns = check_namespace(namespace)
        self.lease_ms = lease_ms
        self.rejoin_ms = lease_ms if rejoin_ms is None else rejoin_ms
        if self.rejoin_ms < lease_ms:
            raise InvalidArgument(f"rejoin_ms ({self.rejoin_ms}) must cover the lease "
                                  f"({lease_ms} ms): rule E1")
        self.vbmax = vbmax
        self.owner = check_id("owner", owner) if owner else new_id()
        self.chan_prefix = channel_prefix(self.ns)
        self.channel = self.chan_prefix + self.owner.encode()
        self.wkey = waiters_key(self.ns)
        self.tickets = Ticket()
        self.locks: dict[str, LockCore] = {}
        #: resource key -> this owner's locks on it (G14: self-deadlocks seen locally)
        self.by_key: dict[bytes, list[LockCore]] = {}
        #: instance labels (URLs, password masked) for error messages; set by the I/O layer
        self.labels: list[str] = [f"instance {i}" for i in range(n)]
        #: docs/operations.md: accept volatile-* maxmemory policies (never allkeys-*)
        self.allow_eviction = False
        #: first contact (`identify`): each instance's server run_id, once it answered
        self.run_ids: list[str | None] = [None] * n
        #: the rejoin wait each instance stores in its epoch hash (E1), as last read
        self.stored_rejoin: list[int | None] = [None] * n
        #: instance -> why its votes never count (a duplicate, an eviction policy...)
        self.refused: dict[int, ConfigurationError] = {}
        #: the epoch id each instance's replies carry (a duplicate's is another's)
        self.epochs: list[str] = [""] * n
        #: member i is a Redis Cluster (`note_cluster`): its epoch, waiter index and event
        #: channels are per hash slot (H2c), so are its epochs (`slot_epochs`)
        self.clustered: list[bool] = [False] * n
        #: a cluster member's epoch per hash slot, as its replies carried it last
        self.slot_epochs: list[dict[int, str]] = [{} for _ in range(n)]
        #: a cluster member's node ids (every node of its cluster), for duplicates
        self.node_ids: list[frozenset[str] | None] = [None] * n
        #: refuse an instance whose epoch is another's (`note_epoch`); the clients turn it
        #: on (epoch ids made by the scripts are unique per server; hand-fed replies in
        #: protocol tests share one)
        self.distinct_epochs = False
        #: monotonic time of the next renewal tick (`flows.Flows._renew_tick` sets it; a
        #: lock with a shorter lease brings it forward)
        self.renew_at = 0.0

    # ----------------------------------------------------------------- first contact

    def identify(self, i: int, hello: codec.InstanceStatus) -> ConfigurationError | None:
        """Record what instance i said at first contact (`init hello`) and return why it
        cannot be used, if so (the I/O layer raises it at construction; for an instance
        first reached later it is that instance's error, and its votes never count):

        * DuplicateInstance: its server (run_id) or its epoch is another instance's: one
          server would cast two votes;
        * EvictionPolicy: a maxmemory-policy that may evict keys (allkeys-* always;
          volatile-* unless `allow_eviction`: lock keys carry no TTL, docs/operations.md);
        * LeaseTooLong: it stores a rejoin wait (E1) shorter than this client's lease.

        Otherwise this client's rejoin_ms (what it stores where it creates an epoch) is
        raised to the instance's rejoin wait, if that is longer."""
        label = self.labels[i]
        for j, other in enumerate(self.run_ids):
            if j != i and other is not None and hello.run_id is not None and other == hello.run_id:
                return self.refuse(i, DuplicateInstance(
                    f"{label} and {self.labels[j]} are the same Redis server (run_id "
                    f"{hello.run_id[:12]}...): one server would cast two votes of the quorum; "
                    "give each instance once", instance=label))
        if hello.epoch is not None:
            err = self.note_epoch(i, hello.epoch, HELLO_SLOT)
            if err is not None:
                return err
        policy = hello.maxmemory_policy or "noeviction"
        if policy != "noeviction" and (policy.startswith("allkeys")
                                        or not self.allow_eviction):
            how = ("allkeys-* policies evict lock keys whatever the layout"
                   if policy.startswith("allkeys") else
                   "pass allow_eviction=True only if you accept its risks "
                   "(docs/operations.md, Memory)")
            return self.refuse(i, EvictionPolicy(
                f"{label} has maxmemory-policy {policy}: Redis may evict keys to free memory, "
                f"and an evicted lock is granted twice; set maxmemory-policy noeviction ({how})",
                policy=policy, instance=label))
        self.run_ids[i] = hello.run_id or f"?{i}"
        return self.note_rejoin(i, hello.rejoin_ms)

    def note_rejoin(self, i: int, stored: int | None) -> ConfigurationError | None:
        """Instance i stores the rejoin wait `stored` (E1; None: none): a lease of this
        client longer than it is refused; else this client's rejoin_ms, what it stores on an
        instance that has none and where it creates an epoch, becomes at least `stored`."""
        if stored is None:
            return None
        self.stored_rejoin[i] = stored
        if self.lease_ms > stored:
            return self.refuse(i, self.lease_too_long(i, self.lease_ms))
        self.rejoin_ms = max(self.rejoin_ms, stored)
        return None

    def lease_too_long(self, i: int, lease: int) -> LeaseTooLong:
        rejoin = self.stored_rejoin[i] or 0
        return LeaseTooLong(
            f"a lease of {lease} ms is longer than the rejoin wait of {self.labels[i]} "
            f"({rejoin} ms, rule E1): after a restart without its data that instance could "
            f"grant the lock again while this lease still runs; raise the wait with "
            f"`dlm rejoin-wait {lease}` (before starting clients with longer leases) or "
            "use a shorter lease", lease_ms=lease, rejoin_ms=rejoin, instance=self.labels[i])

    def note_cluster(self, i: int, node_ids: Sequence[str]) -> ConfigurationError | None:
        """Member i is a Redis Cluster whose nodes have `node_ids` (found at first contact):
        from now on its commands use the per-slot layout (`member_call`) and its epochs are
        per hash slot (E1, E2, R2 per member and slot). A cluster that shares a node with
        another member's is the same cluster reached twice (one URL per node, say): refused
        as DuplicateInstance, as two URLs of one standalone server are."""
        ids = frozenset(node_ids)
        self.clustered[i] = True
        self.node_ids[i] = ids
        for j, other in enumerate(self.node_ids):
            if j != i and other and ids & other and j not in self.refused:
                return self.refuse(i, DuplicateInstance(
                    f"{self.labels[i]} and {self.labels[j]} are the same Redis Cluster (node "
                    f"{sorted(ids & other)[0][:12]}... is in both): one cluster would cast two "
                    "votes of the quorum; give each cluster once", instance=self.labels[i]))
        return self.refused.get(i)

    def member_call(self, i: int, call: Call) -> Call:
        """`call` (built in the standalone layout) as member i takes it: unchanged on a
        standalone member; on a cluster member with the epoch, waiter index and channel
        prefix of the hash slot of its resource keys (H2c: every script touches ONE slot),
        the first contact reading slot `HELLO_SLOT`'s epoch."""
        if not self.clustered[i]:
            return call
        name, keys, args = call
        if name in SLOTTED_SCRIPTS:
            s = key_slot(keys[2])
            keys = [epoch_key(s), slot_waiters_key(self.ns, s), *keys[2:]]
            args = [args[0], slot_channel_prefix(self.ns, s), *args[2:]]
        elif name == "inspect":
            keys = [epoch_key(key_slot(keys[1])), *keys[1:]]
        elif name == "init":
            keys = [epoch_key(HELLO_SLOT)]
        return Call(name, keys, args)

    def reads_events(self, lk: LockCore) -> bool:
        """Whether `lk` reads events now, so that on a cluster member its slot's shard
        channel must be subscribed (N4): a lock with `on_blocking` (BLKAST) from its first
        call to its release; any other lock only while it waits (`LockCore.waits`: a grant,
        a split-vote blocking event, a deadlock or break notice of its wait). A lock that
        is granted at once, or only held, reads none: a break of it is learnt at the next
        renewal."""
        if lk.phase not in (Phase.ACQUIRING, Phase.HELD, Phase.CONVERTING):
            return False
        if lk.flags & Flag.BLKAST:
            return True
        return lk.waits and lk.phase is not Phase.HELD

    def slot_channel(self, slot: int) -> bytes:
        """This owner's shard channel for hash slot `slot` of a cluster member (SSUBSCRIBE)."""
        return slot_channel_prefix(self.ns, slot) + self.owner.encode()

    def _epoch_known(self, i: int, slot: int) -> str:
        return self.slot_epochs[i].get(slot, "") if self.clustered[i] else self.epochs[i]

    def note_epoch(self, i: int, epoch: str, slot: int | None = None) -> ConfigurationError | None:
        """Instance i's replies carry `epoch` (on a cluster member: the epoch of hash slot
        `slot`). The same epoch as another instance's (of the same slot) is the same
        keyspace of one server (epoch ids hold the server's run_id): its votes stop
        counting, whenever this is found (also for an instance first reached after
        construction), so that server never gives two votes."""
        if slot is not None and self.clustered[i]:
            return self._note_slot_epoch(i, epoch, slot)
        if epoch == self.epochs[i] or not epoch:
            return self.refused.get(i)
        self.epochs[i] = epoch
        for j, other in enumerate(self.epochs if self.distinct_epochs else ()):
            if j != i and other == epoch and j not in self.refused:
                return self.refuse(i, DuplicateInstance(
                    f"{self.labels[i]} and {self.labels[j]} answer with the same instance "
                    f"epoch {epoch}: they are one Redis server (one keyspace), which would "
                    "cast two votes of the quorum; give each instance once",
                    instance=self.labels[i]))
        return self.refused.get(i)

    def _note_slot_epoch(self, i: int, epoch: str, slot: int) -> ConfigurationError | None:
        known = self.slot_epochs[i]
        if epoch == known.get(slot) or not epoch:
            return self.refused.get(i)
        known[slot] = epoch
        for j in range(self.n) if self.distinct_epochs else ():
            if (j != i and self.clustered[j] and j not in self.refused
                    and self.slot_epochs[j].get(slot) == epoch):
                return self.refuse(i, DuplicateInstance(
                    f"{self.labels[i]} and {self.labels[j]} answer with the same epoch "
                    f"{epoch} for hash slot {slot}: they are one Redis Cluster, which would "
                    "cast two votes of the quorum; give each cluster once",
                    instance=self.labels[i]))
        return self.refused.get(i)

    def refuse(self, i: int, err: ConfigurationError) -> ConfigurationError:
        """Instance i's votes never count from now on: every vote it gave is dropped."""
        self.refused.setdefault(i, err)
        for lk in self.locks.values():
            v = lk.votes[i]
            v.vote, v.mode, v.error = Vote.ERROR, None, str(self.refused[i])
        return self.refused[i]

    # ----------------------------------------------------------------- building commands

    def _keys(self, *keys: bytes) -> list[bytes]:
        return [EPOCH_KEY, self.wkey, *keys]

    def request_cmd(self, lk: LockCore) -> tuple:
        # (KEYS[4], the parent's resource, only where there is a parent: one key less to send
        # and for the script to read in the common case)
        keys = self._keys(lk.key, lk.parent.key) if lk.parent else self._keys(lk.key)
        return command("request", keys, codec.request_args(
            self.rejoin_ms, self.chan_prefix, self.owner, lk.id, lk.rq, lk.flags, lk.ticket,
            lk.lease_ms, lk.parent.id if lk.parent else "", lk.name, lk.priority))

    def convert_cmd(self, lk: LockCore, mode: Mode, flags: int, value: bytes | None,
                    version: int, i: int | None = None) -> tuple:
        if i is not None and value is not None:
            v = lk.votes[i]
            if not (v.vote is Vote.GRANTED and v.mode is not None and v.mode >= Mode.PW):
                value = None  # V3: only where we hold PW/EX (see release_cmd)
        return command("convert", self._keys(lk.key), codec.convert_args(
            self.rejoin_ms, self.chan_prefix, self.owner, lk.id, mode, flags, lk.cticket,
            lk.lease_ms, value, version, self.vbmax, lk.token, lk.priority))

    def release_cmd(self, lk: LockCore, subtree: bool = False, i: int | None = None,
                    store: tuple[bytes | None, int] | None = None) -> tuple:
        """The release for instance i (None: any instance where the lock is granted in
        PW/EX), writing `store` (value, version), by default `stored_value(lk, i)`."""
        value, version = self.stored_value(lk, i) if store is None else store
        kids = sorted({d.key for d in descendants(lk)})
        keys = (self._keys(lk.key, lk.parent.key if lk.parent else lk.key, *kids)
                if lk.parent or kids else self._keys(lk.key))
        return command("release", keys, codec.release_args(
            self.rejoin_ms, self.chan_prefix, self.owner, lk.id,
            int(Flag.SUBTREE) if subtree else 0, value,
            version if value is not None else lk.next_version(), self.vbmax, lk.token))

    @staticmethod
    def stored_value(lk: LockCore, i: int | None) -> tuple[bytes | None, int]:
        """What a release or down-conversion of `lk` from PW/EX writes on instance i (None:
        any instance where the lock is granted in PW/EX): (value, version), or (None, 0).

        * V3: the holder's new value, only where our vote is granted in PW/EX:
          elsewhere the lock may still wait (V3 would refuse the write), and a quorum of
          granted instances is where readers look.
        * V7, without a new value: where our vote is granted in PW/EX and its grant
          reported an older version than the valid value the lock holds, that value at its
          own version. A write that reached only a minority (one instance of a quorum held
          in PW/EX missed it) is then completed by the next holder that reads it, before
          the lock lets go of the instances that lack it (docs/protocol.md)."""
        if lk.mode is None or lk.mode < Mode.PW:
            return None, 0
        v = lk.votes[i] if i is not None else None
        if v is not None and not (v.vote is Vote.GRANTED and v.mode is not None
                                  and v.mode >= Mode.PW):
            return None, 0
        if lk.new_value is not None:
            return lk.new_value, lk.next_version()
        if (v is not None and lk.value is not None and lk.value_valid
                and v.version < lk.version):
            return lk.value, lk.version
        return None, 0

    def release_cmds(self, lk: LockCore, subtree: bool = False) -> list[tuple[int, tuple]]:
        """(instance, `release_cmd`) for every instance, built once per form (the value
        block it writes, if any): the instances that get the same call share it."""
        forms: dict[tuple[bytes | None, int], tuple] = {}
        out = []
        for i in range(self.n):
            store = self.stored_value(lk, i)
            cmd = forms.get(store)
            if cmd is None:
                cmd = forms[store] = self.release_cmd(lk, subtree, i, store)
            out.append((i, cmd))
        return out

    def cancel_cmd(self, lk: LockCore) -> tuple:
        pkey = lk.parent.key if lk.parent else lk.key
        return command("cancel", self._keys(lk.key, pkey), codec.cancel_args(
            self.rejoin_ms, self.chan_prefix, self.owner, lk.id, "cancel", False))

    def yield_cmd_for(self, lk: LockCore, i: int) -> tuple:
        """Give back the grant on instance i (Y1); later events for it are stale. From now
        on that grant does not count towards a quorum: once the yield lands it is gone (an
        older waiter may already hold the instance), so counting it until the yield's reply
        comes back would let two clients each believe they hold a quorum."""
        v = lk.votes[i]
        v.stale_token = max(v.stale_token, v.token)
        if v.vote is Vote.GRANTED:
            # a yielded up-conversion keeps its previous mode (Y1), a new request waits
            v.vote, v.by_event = Vote.QUEUED, False
            v.mode = lk.mode if lk.phase is Phase.CONVERTING else None
        return self.yield_cmd(lk)

    def yield_cmd(self, lk: LockCore) -> tuple:
        return command("yield", self._keys(lk.key), codec.yield_args(
            self.rejoin_ms, self.chan_prefix, self.owner, lk.id))

    def renew_cmds(self, now: float, instances: Sequence[int] | None = None
                   ) -> list[tuple[int, tuple, list[LockCore]]]:
        """Renewal calls for every lock of this client that is live on an instance: per
        instance, one call per `RENEW_CHUNK` locks of the same lease (a lock's own
        `lease_ms` is what the instances keep, so locks of another lease go in another
        call). The clients send all of an instance's calls in one write: one round trip
        per instance per tick, and the instance serves other clients between the calls
        instead of running one long script (10,000 locks in one call held an instance
        for ~0.5 s)."""
        out = []
        for i in range(self.n) if instances is None else instances:
            # (a cluster member: one call per hash slot, each script touches one slot)
            slotted = self.clustered[i]
            groups: dict[tuple[int, int], list[LockCore]] = {}
            for lk in self.locks.values():
                if (lk.phase in (Phase.ACQUIRING, Phase.HELD, Phase.CONVERTING)
                        and lk.votes[i].vote in (Vote.GRANTED, Vote.QUEUED, Vote.ERROR)):
                    groups.setdefault((lk.slot if slotted else 0, lk.lease_ms), []).append(lk)
            for (_, lease), group in sorted(groups.items()):
                for at in range(0, len(group), RENEW_CHUNK):
                    lks = group[at:at + RENEW_CHUNK]
                    cmd = command("renew", self._keys(*[lk.key for lk in lks]),
                                  codec.renew_args(self.rejoin_ms, self.chan_prefix,
                                                   self.owner, lease,
                                                   [(lk.id, lk.token) for lk in lks]))
                    out.append((i, cmd, lks))
        return out

    def renew_interval(self) -> float:
        """Seconds between renewal ticks: a third of the shortest lease in use."""
        leases = [lk.lease_ms for lk in self.locks.values()
                  if lk.phase in (Phase.ACQUIRING, Phase.HELD, Phase.CONVERTING)]
        return min([self.lease_ms, *leases]) / 3000.0

    # ----------------------------------------------------------------- new locks

    def new_lock(self, name: str | bytes, mode: object, *, parent: LockCore | None = None,
                 noqueue: bool = False, expedite: bool = False, no_deadlock_wait: bool = False,
                 lease_ms: int | None = None, lock_id: str | None = None,
                 priority: int = 0, blocking: bool = False) -> LockCore:
        """A new lock (not sent yet). `blocking`: the caller reads its blocking
        notifications (an `on_blocking` callback): its requests and conversions carry
        BLKAST, so the instances send it every blocking event (N1); without it they send
        only those the split-vote yield reads (an older ticket queued behind it)."""
        m = codec.as_mode(mode)
        prio = check_priority(priority)
        raw = check_name(name)
        if parent is not None:
            if parent.phase not in (Phase.HELD, Phase.CONVERTING):
                raise ParentNotGranted("the parent lock is not held", lock_id=parent.id)
            path = (*parent.path, raw)
        else:
            path = (raw,)
        if expedite and m != Mode.NL:
            raise InvalidArgument("expedite is only for NL requests (G3)")
        flags = ((Flag.NOQUEUE if noqueue else 0) | (Flag.EXPEDITE if expedite else 0)
                 | (Flag.NODLCKWT if no_deadlock_wait else 0) | (Flag.BLKAST if blocking else 0))
        lease = self.lease_ms if lease_ms is None else self.check_lock_lease(lease_ms)
        lk = LockCore(self, path, m, int(flags), lease, parent,
                      check_id("lock id", lock_id) if lock_id else new_id(), prio)
        if not noqueue:
            self._check_self_deadlock(lk, m, "request")
        self.locks[lk.id] = lk
        mine = self.by_key.get(lk.key)
        if mine is None:
            self.by_key[lk.key] = [lk]
        else:
            mine.append(lk)
        if parent is not None:
            parent.children.append(lk)
        return lk

    def check_lock_lease(self, lease_ms: object) -> int:
        """A lease one lock may have (E1): an int of 100..86400000 ms (InvalidType,
        InvalidArgument), no longer than the rejoin wait any instance stores (LeaseTooLong)
        nor than this client's `rejoin_ms` (InvalidArgument)."""
        lease = check_lease(lease_ms)
        for i, stored in enumerate(self.stored_rejoin):
            if stored is not None and lease > stored:
                raise self.lease_too_long(i, lease)  # E1: that instance's own wait
        if lease > self.rejoin_ms:
            # E1: a restarted instance waits rejoin_ms before granting; a longer lease
            # could still be counted by its holder after that
            raise InvalidArgument(f"a lock's lease ({lease} ms) may not exceed the client's "
                                  f"rejoin_ms ({self.rejoin_ms} ms); raise rejoin_ms")
        return lease

    def change_lease(self, lk: LockCore, lease_ms: int, now: float) -> None:
        """From `now` on, calls about `lk` carry the lease `lease_ms` (already checked by
        `check_lock_lease`); the votes of calls sent before keep counting the lease those
        carried (L1, `LockCore.lease_at`)."""
        if lease_ms == lk.lease_ms:
            return
        longest = max([lk.lease_ms, *(b for _, b in lk.lease_changes)]) / 1000.0
        # a change older than every lease it could apply to no longer matters: a call
        # sent before it has run out whatever lease it carried
        lk.lease_changes = [(at, b) for at, b in lk.lease_changes if at + longest >= now]
        lk.lease_changes.append((now, lk.lease_ms))
        lk.lease_ms = lease_ms

    def renew_lock_cmds(self, lk: LockCore) -> list[tuple[int, tuple]]:
        """A renewal of `lk` alone, with its lease, for every instance where it is live
        (as `renew_cmds` chooses them)."""
        return [(i, command("renew", self._keys(lk.key), codec.renew_args(
                    self.rejoin_ms, self.chan_prefix, self.owner, lk.lease_ms,
                    [(lk.id, lk.token)])))
                for i in range(self.n) if i not in self.refused
                and lk.votes[i].vote in (Vote.GRANTED, Vote.QUEUED, Vote.ERROR)]

    def _check_self_deadlock(self, lk: LockCore, mode: Mode, what: str) -> None:
        """G14: a queueing request or up-conversion of this owner on a resource where the
        same owner holds (granted, or converting with its granted mode) an incompatible
        lock would wait for the owner itself: Deadlock at once, before anything is sent
        (as VMS answers SS$_DEADLOCK). NOQUEUE callers skip this: they get NotQueued."""
        for o in self.by_key.get(lk.key, ()):
            if (o is not lk and o.mode is not None
                    and o.phase in (Phase.HELD, Phase.CONVERTING)
                    and not COMPAT[o.mode][mode]):
                raise Deadlock(
                    f"self-deadlock: this owner's {what} for {mode.name} would wait for its "
                    f"own lock {o.id} held in {o.mode.name} on the same resource",
                    resource=show_name(lk.path), lock_id=lk.id)

    def forget(self, lk: LockCore) -> None:
        self.locks.pop(lk.id, None)
        mine = self.by_key.get(lk.key)
        if mine is not None and lk in mine:
            mine.remove(lk)
            if not mine:
                del self.by_key[lk.key]
        if lk.parent is not None and lk in lk.parent.children:
            lk.parent.children.remove(lk)

    # ----------------------------------------------------------------- replies

    def on_reply(self, lk: LockCore, i: int, reply: object, sent_at: float, now: float) -> None:
        """Record instance i's answer to a request, convert or yield of `lk`."""
        v = lk.votes[i]
        if isinstance(reply, BaseException):
            lk.pending.discard(i)
            if isinstance(reply, (InvalidArgument, InvalidType, NotOwner)):
                raise reply  # bad input: every instance refuses alike; nothing was changed
            v.vote = Vote.ERROR  # unreachable, or a state this instance alone is in
            v.error = describe(reply)
            v.lasting = lasting(reply)
            v.answered = is_answer(reply)
            v.retry_at = now + 0.5
            return
        lk.pending.discard(i)
        rep: LockReply = reply  # type: ignore[assignment]
        slot = lk.slot if self.clustered[i] else None
        if (rep.epoch != (self.epochs[i] if slot is None else self._epoch_known(i, slot))
                or i in self.refused) and self.note_epoch(i, rep.epoch, slot) is not None:
            v.vote, v.mode, v.error = Vote.ERROR, None, str(self.refused[i])
            v.retry_at = now + 1.0
            return
        v.epoch = rep.epoch
        v.wait_ms = rep.wait_ms
        st = rep.status
        # Where our lock may already have been (queued, granted, or a call that failed
        # after it arrived), this call did not necessarily set its lease: a repeated
        # request (G12) and a yield leave it as it was. The lease then still dates from
        # the request or renewal that set it; counting it from this call could make us
        # believe in a lock the instance has expired. (Renewals move it forward.)
        if v.vote not in (Vote.GRANTED, Vote.QUEUED, Vote.ERROR):
            v.sent_at = sent_at
        if st == Status.GRANTED and rep.token <= v.stale_token:
            # The grant we gave back (Y1): this reply left the instance before our yield
            # landed (another connection); once it lands the grant is gone, as a grant
            # event not newer than the yield is stale. A grant after the yield has a newer
            # token. (The vote stays as `yield_cmd_for` left it.)
            pass
        elif st == Status.GRANTED:
            if v.vote is not Vote.GRANTED or v.mode != rep.mode:
                v.granted_at = now
            if not (v.vote is Vote.GRANTED and v.token > rep.token):
                v.mode, v.token = rep.mode, rep.token
                v.value, v.version, v.valid = rep.value, rep.version, rep.valid
                v.forgotten = rep.forgotten
            v.vote, v.by_event, v.lapsed, v.novalue = Vote.GRANTED, False, False, False
        elif st == Status.QUEUED:
            # Events and replies travel on two connections, either may come first. A grant
            # made after this reply has a token above the resource's fencing sequence it
            # reports (`extra`): such a grant learnt from an event stands. A grant event not
            # above it is older than this reply (the instance has expired that grant since,
            # and queued a re-sent request: sim deadlock seed 14), now or when it arrives.
            v.stale_token = max(v.stale_token, rep.extra)
            if not (v.vote is Vote.GRANTED and v.by_event and v.token > v.stale_token
                    and v.mode == lk.rq):
                v.vote, v.mode, v.by_event = Vote.QUEUED, rep.mode, False
                if rep.mode is not None:
                    v.token = rep.token
        elif st == Status.NOTQUEUED:
            v.vote = Vote.NOTQUEUED
        elif st == Status.DEADLOCK:
            v.vote = Vote.DEADLOCK
        elif st == Status.RECOVERING:
            v.vote = Vote.RECOVERING
            v.recover_until = now + max(rep.extra, 0) / 1000.0
            v.retry_at = now + max(rep.extra, 10) / 1000.0
        elif st == Status.NOPARENT:
            v.vote = Vote.NOPARENT
        elif st == Status.NOTFOUND:
            v.vote, v.mode = Vote.ABSENT, None
        elif st in (Status.CANCELLED, Status.CANCELGRANT):
            pass
        else:
            v.vote = Vote.ERROR

    def on_late_reply(self, lk: LockCore, i: int, reply: object, sent_at: float,
                      now: float) -> list[tuple[int, tuple]]:
        """R4: instance i's reply to `lk`'s request that came after the call that sent it
        had returned on the other instances' replies (a stalled instance). Recorded as any
        reply while the lock is acquiring or held (a late grant adds its vote, a late queue
        entry is renewed and granted later); where the request failed or the lock was
        released meanwhile, the release to send there: the request may have landed after
        the clean-up (they travel on different connections), and nothing may stay behind."""
        live = self.locks.get(lk.id) is lk
        if live and lk.phase in (Phase.ACQUIRING, Phase.HELD):
            try:
                self.on_reply(lk, i, reply, sent_at, now)
            except DLMError as exc:  # a refusal this instance alone gave
                lk.votes[i].vote, lk.votes[i].error = Vote.ERROR, describe(exc)
            return []
        if live or isinstance(reply, BaseException):
            return []  # converting: the conversion's own reply from i tells its state there
        lk.pending.discard(i)
        if reply.status in (Status.GRANTED, Status.QUEUED):  # type: ignore[attr-defined]
            return [(i, self.release_cmd(lk, i=i))]
        return []

    def on_late_convert(self, lk: LockCore, i: int, reply: object, sent_at: float,
                        cticket: int, now: float) -> list[tuple[int, tuple]]:
        """R4 for a conversion: instance i's late reply to the conversion of ticket
        `cticket`. Recorded while that conversion is still going on, or when it was granted
        in the mode the reply grants (a vote more); a conversion left queued there by one
        that ended (failed, or decided without it) is cancelled. A grant there in a stronger
        mode than the lock holds is repaired by the renewals (R1)."""
        live = self.locks.get(lk.id) is lk
        if not live or isinstance(reply, BaseException):
            lk.pending.discard(i)
            return []
        if lk.phase is Phase.CONVERTING and lk.cticket == cticket:
            self.on_reply(lk, i, reply, sent_at, now)
            return []
        lk.pending.discard(i)
        rep: LockReply = reply  # type: ignore[assignment]
        if lk.phase is Phase.HELD and lk.cticket == cticket and (
                rep.status == Status.GRANTED and rep.mode == lk.mode):
            self.on_reply(lk, i, reply, sent_at, now)
        elif lk.phase is Phase.HELD and rep.status == Status.QUEUED:
            return [(i, self.cancel_cmd(lk))]
        return []

    def on_renew_reply(self, i: int, lks: Sequence[LockCore], reply: object,
                       sent_at: float, now: float) -> list[str]:
        """Record instance i's answer to a renewal of `lks`. Returns what went wrong, one
        line each, for the I/O layer to log as it happens: a failed call, a lock whose
        renewal failed there (its resource key is corrupt: that lock alone loses its vote,
        the others of the call are renewed), a held lock gone from the instance."""
        notes: list[str] = []
        if isinstance(reply, BaseException):
            why = describe(reply)
            notes.append(f"renewal of {len(lks)} lock(s) on {self.labels[i]} failed: {why}")
            for lk in lks:
                lk.votes[i].error = why
                lk.votes[i].answered = is_answer(reply)
                if lk.votes[i].vote is Vote.QUEUED:
                    lk.votes[i].vote = Vote.ERROR
                # a granted vote keeps its old lease and simply runs out if this persists
            return notes
        epoch, entries = reply  # type: ignore[misc]
        slot = lks[0].slot if self.clustered[i] and lks else None
        if (epoch != (self.epochs[i] if slot is None else self._epoch_known(i, slot))
                or i in self.refused) and self.note_epoch(i, epoch, slot) is not None:
            return  # (`refuse` dropped its votes)
        for lk, e in zip(lks, entries):
            v = lk.votes[i]
            if e.status == Status.CORRUPT:
                # K1: the key there holds no lock resource; the script renewed the others
                v.error = f"resource key {lk.key.decode('utf-8', 'replace')} corrupt"
                v.answered = True
                v.vote, v.mode, v.epoch = Vote.ERROR, None, epoch
                notes.append(f"renewal of lock {lk.id} on {self.labels[i]} failed: {v.error}; "
                             "the lock loses its vote there")
                continue
            if (v.vote is Vote.GRANTED and v.granted_at > sent_at
                    and (e.status != Status.GRANTED or e.mode != v.mode)):
                # The renewal ran before a grant we learnt of since it was sent (its event
                # or reply overtook this reply): "queued", "absent" or the previous mode is
                # stale, not a loss.
                continue
            if e.status == Status.GRANTED:
                # (another token than ours: a grant of the lock re-created after ours
                # expired there, not the one we know)
                news = v.vote is not Vote.GRANTED or v.mode != e.mode or v.token != e.token
                if news and e.mode != Mode.NL and lk.phase is Phase.ACQUIRING:
                    # A grant learnt from a renewal, before its reply or event: a renewal
                    # carries no value block, and the vote still has the one of an older
                    # state (none). Counted now, it could complete the lock with a stale
                    # value said valid. Keep it waiting: the grant event, or the re-check it
                    # triggers at once (the request is idempotent, G12, and returns the
                    # value), completes it.
                    v.vote, v.sent_at, v.wait_ms, v.mode = Vote.QUEUED, sent_at, 0, None
                    v.epoch = epoch
                    continue
                if news and e.mode != Mode.NL and (
                        lk.phase is Phase.CONVERTING and e.mode == lk.rq):
                    # The same for a conversion, but the instance no longer holds the old
                    # mode: recorded as a grant in the new mode (it protects that mode
                    # there) that does not complete the conversion (`novalue`) until the
                    # event or the re-check brings the value. Kept as "queued in the old
                    # mode", it made a failed conversion count the old mode held where the
                    # new one was granted (simulator, profile cut seed 50: two holders).
                    v.vote, v.mode, v.token, v.sent_at = Vote.GRANTED, e.mode, e.token, sent_at
                    v.granted_at, v.novalue, v.by_event, v.epoch = now, True, False, epoch
                    continue
                if news:
                    v.token = e.token
                    v.granted_at = now
                    v.novalue = False
                v.vote, v.mode, v.sent_at = Vote.GRANTED, e.mode, sent_at
            elif e.status == Status.QUEUED:
                v.vote, v.mode, v.sent_at = Vote.QUEUED, e.mode, sent_at
                v.wait_ms = e.wait_ms
            else:
                if lk.phase is Phase.HELD and v.epoch and epoch != v.epoch:
                    # R2: the instance restarted empty (a new epoch) and forgot our lock
                    v.rejoin, v.retry_at = True, now
                if v.vote is Vote.GRANTED and lk.phase in (Phase.HELD, Phase.CONVERTING):
                    notes.append(f"lock {lk.id} lost its vote on {self.labels[i]}: "
                                 "gone from the instance")
                v.vote, v.mode = Vote.ABSENT, None
            v.epoch = epoch
        return notes

    def on_event(self, i: int, ev: Event, now: float) -> list[tuple[str, LockCore, object]]:
        """A pub/sub event from instance i. Returns notifications for the I/O layer:
        ('blocking', lock, mode) to deliver once, ('yield', lock, i) to send."""
        lk = self.locks.get(ev.lock_id)
        if lk is None or i in self.refused:
            return []
        v = lk.votes[i]
        out: list[tuple[str, LockCore, object]] = []
        if ev.kind == "G":
            if v.vote is not Vote.GRANTED and (v.lapsed or lk.vote_validity(v, now) <= 0):
                # Our lease there has run out: this may be the grant of a lock the instance
                # has expired since (we were paused, or cut off). Ask it at once instead.
                v.lapsed, v.wait_ms = True, 0
            elif ev.token > v.stale_token and (v.vote is not Vote.GRANTED
                                                 or ev.token > v.token):
                v.vote, v.mode, v.token, v.by_event = Vote.GRANTED, ev.mode, ev.token, True
                v.novalue = False
                v.value, v.version, v.valid = ev.value, ev.version, ev.valid
                v.forgotten = ev.forgotten
                v.granted_at = now
        elif ev.kind == "B":
            if (lk.converting_can_queue() and v.vote is Vote.GRANTED and v.mode == lk.rq
                    and ev.ticket < lk.cticket):
                # split vote between conversions (each granted on a minority, waiting for
                # the other's grant elsewhere): an older one waits behind ours here, so give
                # this grant back, as a new request does (Y1 keeps our previous mode).
                # Only an up or middle conversion: a grant in the mode of one to the same
                # mode is the lock's own grant, which the instance would send back to the
                # wait queue as a new request's (Y1), the lock lost there (seed 80).
                out.append(("yield", lk, i))
            elif lk.phase in (Phase.HELD, Phase.CONVERTING):
                key = (ev.other, int(ev.mode))
                if key not in lk.seen_blocking:  # each blocking event once, however many
                    lk.seen_blocking.add(key)    # instances report it
                    out.append(("blocking", lk, ev.mode))
            elif (lk.phase is Phase.ACQUIRING and v.vote is Vote.GRANTED
                  and ev.ticket < lk.ticket):
                out.append(("yield", lk, i))  # split vote: an older ticket waits behind us
        elif ev.kind == "C":
            if ev.reason == "deadlock" and lk.phase in (Phase.ACQUIRING, Phase.CONVERTING):
                lk.error = Deadlock("chosen as a deadlock victim", resource=show_name(lk.path),
                                    lock_id=lk.id)
            elif ev.reason == "broken":
                v.vote, v.mode, v.broken = Vote.ABSENT, None, True
                if (lk.phase is Phase.ACQUIRING and lk.error is None
                        and sum(1 for x in lk.votes if x.broken) > self.n - self.quorum):
                    # an operator broke the waiting request (`dlm break`): it is not sent
                    # again (`recheck_cmds`), so no quorum can grant it any more
                    lk.error = LockLost("the request was broken by an operator",
                                        resource=show_name(lk.path), lock_id=lk.id)
        return out

    # ----------------------------------------------------------------- decisions

    def evaluate_acquire(self, lk: LockCore, now: float) -> Outcome:
        """After replies or events: is `lk` held, failed, or still waiting?

        R3: a wait ends by a decision of the instances or by the caller's timeout, never by
        one bad round. Instances that failed (unreachable, stalled, restarting) or are in
        their rejoin window (E1) are asked again until the deadline; only failures that
        waiting cannot heal (`lasting`), or a call without a timeout whose instances could
        not make a quorum, fail at once. A NOQUEUE request without a timeout gets one round:
        every instance answered (or failed) and no quorum granted, so it fails, naming why.
        R4: the decision is taken as soon as the replies in hand settle it; a reply still on
        its way only matters when they do not."""
        n, q = self.n, self.quorum
        if lk.error is not None:
            return self._fail(lk, lk.error)
        if self.try_grant(lk, now):
            return Outcome(done=True)
        res = show_name(lk.path)
        # Answers that no reply still on its way can change
        if lk.count(Vote.NOTQUEUED) > n - q:
            return self._fail(lk, NotQueued("not granted at once (noqueue)" + self._causes(lk),
                                            resource=res, lock_id=lk.id))
        if lk.count(Vote.NOPARENT) > n - q:
            return self._fail(lk, ParentNotGranted(
                "the parent lock is not granted on a quorum", resource=res, lock_id=lk.id))
        if lk.lasting_failures() > n - q:
            return self._fail(lk, QuorumUnavailable(
                f"{self.tally(lk)}; {q} needed" + self._causes(lk, silent_only=True),
                resource=res, lock_id=lk.id))
        timed_out = lk.deadline is not None and now >= lk.deadline
        if timed_out:
            return self._fail(lk, self._why_not(lk, now))
        if lk.pending:
            return Outcome(wake_at=lk.deadline)  # replies still on their way
        noqueue = bool(lk.flags & Flag.NOQUEUE)
        if lk.deadline is None and (noqueue or lk.count(Vote.ERROR) > n - q):
            return self._fail(lk, self._why_not(lk, now))
        if noqueue and not lk.count(Vote.ERROR, Vote.RECOVERING, Vote.ABSENT):
            # every instance decided and no quorum granted: not grantable at once
            return self._fail(lk, NotQueued("not granted at once (noqueue)", resource=res,
                                            lock_id=lk.id))
        out = Outcome()
        # Split vote: granted somewhere but short of a quorum while every instance has
        # answered. Give those grants back to our place in the queue (Y1): where our ticket
        # is the oldest we are granted again at once, elsewhere the older ticket wins.
        if not noqueue and not lk.round_done:
            lk.round_done = True
            for i in lk.granted(now):
                out.actions.append((i, self.yield_cmd_for(lk, i)))
        out.wake_at = self._recheck_at(lk, now)
        return out

    def try_grant(self, lk: LockCore, now: float) -> bool:
        """If a quorum grants the acquiring `lk` (valid leases), adopt the grant (token,
        value block) and mark it held: True. Otherwise change nothing: False. The part of
        `evaluate_acquire` a grant event can settle at once (no waiting flow in between)."""
        if (lk.error is not None or lk.phase is not Phase.ACQUIRING
                or len(lk.granted(now, lk.rq)) < self.quorum):
            return False
        lk.adopt_grant(now, lk.rq)
        lk.phase = Phase.HELD
        return True

    def _why_not(self, lk: LockCore, now: float) -> DLMError:
        """The error of a request that ends without a quorum (its timeout came, or a
        NOQUEUE request's round, or a call without a timeout met too few instances), by
        cause: held back by other locks on too many instances (LockTimeout, or NotQueued
        for NOQUEUE); else instances in their rejoin window (InstancesRecovering, naming
        them and how long each still has); else instances that did not answer
        (QuorumUnavailable, naming them and why)."""
        n, q = self.n, self.quorum
        res = show_name(lk.path)
        noqueue = bool(lk.flags & Flag.NOQUEUE)
        blocked = lk.count(Vote.QUEUED, Vote.NOTQUEUED, Vote.DEADLOCK, Vote.NOPARENT)
        rec = {self.labels[i]: max(0.0, v.recover_until - now)
               for i, v in enumerate(lk.votes) if v.vote is Vote.RECOVERING}
        silent = lk.count(Vote.ERROR, Vote.UNKNOWN)
        head = "not granted at once (noqueue)" if noqueue else "not granted within the timeout"
        if blocked > n - q or not (rec or silent):
            cls = NotQueued if noqueue else LockTimeout
            return cls(head + self._causes(lk), resource=res, lock_id=lk.id)
        if rec:
            return InstancesRecovering(
                f"{head}: {len(rec)} of {n} instances may not grant yet (rejoin window, E1; "
                f"{q} needed)" + self._causes(lk), recovering=rec, resource=res, lock_id=lk.id)
        return QuorumUnavailable(
            f"{head}: {self.tally(lk)}; {q} needed" + self._causes(lk, silent_only=True),
            resource=res, lock_id=lk.id)

    def _recheck_at(self, lk: LockCore, now: float) -> float:
        """When to look again without an event: the earliest lease expiry of a lock ahead
        (a dead holder never stalls the queue), a retry of an instance that failed or is
        recovering, the timeout."""
        cands = [now + self.lease_ms / 3000.0]
        for i, v in enumerate(lk.votes):
            if v.vote is Vote.QUEUED and v.wait_ms >= 0:
                cands.append(now + v.wait_ms / 1000.0 + 0.002)
            if self._conversion_missing(lk, i):
                cands.append(max(v.retry_at, now + 0.01))
            if v.vote is Vote.GRANTED and v.novalue:
                cands.append(now + 0.002)
            if v.vote in (Vote.ERROR, Vote.RECOVERING, Vote.UNKNOWN) or (
                    v.vote is Vote.ABSENT and lk.phase is Phase.ACQUIRING):
                cands.append(max(v.retry_at, now + 0.01))
        if lk.deadline is not None:
            cands.append(lk.deadline)
        return min(cands)

    def _conversion_missing(self, lk: LockCore, i: int) -> bool:
        """While `lk` converts: instance i is known not to have the conversion (it failed
        there: refused, e.g. while the lock still waited there, or no answer; or the lock
        is granted there in a mode that is not the one asked, the conversion lost on the
        way) and no call about it is in flight. Only re-sending the conversion can change
        that: no event will come from there (sim `jobs` seed 11 waited for ever)."""
        v = lk.votes[i]
        return (lk.phase is Phase.CONVERTING and lk.cargs is not None and i not in lk.pending
                and (v.vote in (Vote.ERROR, Vote.RECOVERING)
                     or (v.vote is Vote.GRANTED and v.mode != lk.rq)))

    def recheck_cmds(self, lk: LockCore, now: float, only: Iterable[int] | None = None
                     ) -> list[tuple[int, tuple]]:
        """Commands to re-ask instances at a wake-up: the request is idempotent (G12), so
        re-sending it returns the current state and lets the instance purge expired
        blockers; instances that failed or were recovering get it again too. With `only`:
        those instances alone (a slot subscribed after the lock queued there, N4)."""
        out = []
        retry = (Vote.ERROR, Vote.RECOVERING)
        if lk.phase is Phase.ACQUIRING:
            retry += (Vote.ABSENT,)  # the instance lost our request (restart, expiry)
        which = None if only is None else set(only)
        for i, v in enumerate(lk.votes):
            if which is not None and i not in which:
                continue
            if v.broken:
                continue  # a broken lock must not come back (`dlm break`)
            if self._conversion_missing(lk, i):
                if now >= v.retry_at:  # the conversion itself, not a request (sim jobs 11)
                    out.append((i, self.convert_cmd(lk, *lk.cargs, i)))
                    v.retry_at = now + 0.5
                continue
            if (v.vote is Vote.QUEUED or (v.vote in retry and now >= v.retry_at)
                    or (v.vote is Vote.GRANTED and v.novalue)):
                out.append((i, self.request_cmd(lk)))
                if lk.vote_validity(v, now) <= 0:
                    v.lapsed = True  # the request may re-create our lock there (see lapsed)
        lk.pending.update(i for i, _ in out)
        return out

    def _causes(self, lk: LockCore, now: float | None = None, silent_only: bool = False) -> str:
        """': <label>: <why>; ...' for the instances that failed, did not answer (yet), or
        are in their rejoin window (one line); with `silent_only`, not those whose failure
        was their own error reply (`tally` counts those)."""
        now = time.monotonic() if now is None else now
        why = []
        for i, v in enumerate(lk.votes):
            if v.vote is Vote.ERROR:
                if not (silent_only and v.answered):
                    why.append(f"{self.labels[i]}: {v.error or 'no answer'}")
            elif v.vote is Vote.UNKNOWN:
                why.append(f"{self.labels[i]}: no answer yet")
            elif v.vote is Vote.RECOVERING:
                left = max(0.0, v.recover_until - now)
                why.append(f"{self.labels[i]}: recovering (rejoin window, E1) for another "
                           f"{left:.1f} s")
        return ": " + "; ".join(why) if why else ""

    def tally(self, lk: LockCore) -> str:
        """How the instances answered about `lk`, counting an error reply as an answer:
        '3 of 3 instances answered; 2 reported resource key K corrupt'."""
        n = self.n
        silent = sum(1 for v in lk.votes if v.vote is Vote.ERROR and not v.answered)
        said: dict[str, int] = {}
        for v in lk.votes:
            if v.vote is Vote.ERROR and v.answered:
                said[v.error] = said.get(v.error, 0) + 1
        out = f"{n - silent} of {n} instances answered"
        for why, k in said.items():
            out += f"; {k} reported {why}"
        return out

    def _fail(self, lk: LockCore, err: DLMError) -> Outcome:
        lk.phase = Phase.FAILED
        lk.error = err
        return Outcome(error=err, cleanup=self.release_cmds(lk))

    # conversions ------------------------------------------------------------

    def start_convert(self, lk: LockCore, mode: object, *, noqueue: bool = False,
                      quecvt: bool = False, convdeadlk: bool = False,
                      no_deadlock_wait: bool = False,
                      priority: int = 0) -> tuple[Mode, int, bool]:
        m = codec.as_mode(mode)
        prio = check_priority(priority)
        if lk.phase is not Phase.HELD:
            raise self._not_held(lk)
        flags = ((Flag.NOQUEUE if noqueue else 0) | (Flag.QUECVT if quecvt else 0)
                 | (Flag.CONVDEADLK if convdeadlk else 0)
                 | (Flag.NODLCKWT if no_deadlock_wait else 0)
                 | (lk.flags & Flag.BLKAST))  # (a conversion stores its flags: N1 kept)
        down = is_down_conversion(lk.mode, m)
        if not noqueue and not down:
            self._check_self_deadlock(lk, m, "conversion")
        lk.priority = prio  # (kept by the instances only if the conversion queues or is granted)
        if {lk.mode, m} == {Mode.CW, Mode.PR}:
            # M2: neither mode covers the other, and the instances switch one at a time
            # (a grant of PR there lets another PR in, which CW would not): until the
            # conversion completes, or its clean-up's answers are in (`rollback_convert`,
            # `end_abandon`), the lock holds only what both protect, CR (simulator seed
            # 2327: two holders while a failed CW -> PR was being cancelled)
            lk.mode = Mode.CR
        lk.rq = m
        lk.cticket = self.tickets.next()
        lk.error = None
        lk.round_done = False
        lk.phase = Phase.CONVERTING
        return m, int(flags), down

    def _not_held(self, lk: LockCore) -> DLMError:
        """Why `lk` cannot be converted now, by its state: lost (LockLost), released by
        its owner or its request withdrawn (LockReleased), not granted yet or converting
        already (LockStateError)."""
        res, lid = show_name(lk.path), lk.id
        if lk.phase is Phase.LOST:
            return LockLost("the lock was lost", resource=res, lock_id=lid)
        if lk.phase is Phase.RELEASED:
            return LockReleased("the lock was released", resource=res, lock_id=lid)
        if lk.phase is Phase.FAILED:
            return LockReleased("the lock's request failed or was withdrawn", resource=res,
                                lock_id=lid)
        if lk.phase is Phase.CONVERTING:
            return LockStateError("a conversion of this lock is in progress", resource=res,
                                  lock_id=lid)
        return LockStateError("the lock is not granted yet", resource=res, lock_id=lid)

    def convert_value(self, lk: LockCore, down: bool) -> tuple[bytes | None, int]:
        if down and lk.new_value is not None and lk.mode is not None and lk.mode >= Mode.PW:
            return lk.new_value, lk.next_version()
        return None, 0

    def evaluate_convert(self, lk: LockCore, old: Mode, now: float,
                         timed_out: bool = False) -> Outcome:
        n, q = self.n, self.quorum
        res = show_name(lk.path)
        granted = lk.granted(now, lk.rq)
        if lk.error is None and len(granted) >= q:
            wrote = lk.new_value is not None
            new_value, version = lk.new_value, lk.next_version()
            lk.adopt_grant(now, lk.rq)
            if wrote and lk.rq != Mode.NL:  # our own write is the newest value
                lk.value, lk.version, lk.value_valid = new_value, version, True
            # R1 writes it where the down-conversion did not arrive; a newer up-conversion
            # makes it history (the next write is this grant's own)
            lk.written = ((new_value, version)
                          if wrote and old >= Mode.PW and is_down_conversion(old, lk.rq)
                          else None)
            lk.written_ok = True
            lk.phase = Phase.HELD
            return Outcome(done=True)
        # Reported lost meanwhile (too few instances kept it): nothing renews it any more, so
        # waiting could only end at the timeout, or never without one.
        lost = lk.phase is Phase.LOST
        if lk.pending and lk.error is None and not timed_out and not lost:
            return Outcome()
        err: DLMError | None = lk.error
        if err is None:
            if lost:
                err = LockLost("the lock was lost during the conversion", resource=res,
                               lock_id=lk.id)
            elif lk.count(Vote.DEADLOCK):
                err = Deadlock("conversion deadlock (G7)", resource=res, lock_id=lk.id)
            elif lk.count(Vote.ERROR) > n - q and (  # R3: a timeout waits through failures
                    lk.deadline is None or timed_out or now >= lk.deadline
                    or lk.lasting_failures() > n - q):
                err = QuorumUnavailable(f"{self.tally(lk)}; {q} needed"
                                        + self._causes(lk, silent_only=True),
                                        resource=res, lock_id=lk.id)
            elif lk.count(Vote.NOTQUEUED):  # only a NOQUEUE conversion is answered so
                err = NotQueued("conversion not granted at once (noqueue)", resource=res,
                                lock_id=lk.id)
            elif timed_out or (lk.deadline is not None and now >= lk.deadline):
                err = LockTimeout("conversion not granted within the timeout", resource=res,
                                  lock_id=lk.id)
            elif lk.count(Vote.ABSENT) > n - q:
                err = LockLost("the lock is gone from a quorum of instances", resource=res,
                               lock_id=lk.id)
        if err is not None and not lost and not isinstance(err, LockLost) and (
                is_down_conversion(old, lk.rq)):
            return self._keep_down_conversion(lk, old, err)
        if err is not None:
            # Put the lock back in its old mode everywhere: cancel queued conversions and
            # convert granted ones back (down after an up-conversion, always granted at
            # once, G4; sideways after a sideways one, which may queue: rollback_convert
            # counts only what the instances answer).
            lk.phase = Phase.LOST if lost else Phase.HELD
            lk.rq = old
            lk.unwinding = True  # (until `rollback_convert`: no repair meanwhile, R1)
            out = Outcome(error=err)
            for i, v in enumerate(lk.votes):
                if v.vote is Vote.QUEUED:
                    out.cleanup.append((i, self.cancel_cmd(lk)))
                elif v.vote is Vote.GRANTED and v.mode != old:
                    out.cleanup.append((i, self.convert_cmd(lk, old, 0, None, 0, i)))
            return out
        out = Outcome()
        if not lk.round_done and lk.converting_can_queue():  # (see `on_event`)
            lk.round_done = True
            for i in granted:
                out.actions.append((i, self.yield_cmd_for(lk, i)))
        out.wake_at = self._recheck_at(lk, now)
        return out

    def _keep_down_conversion(self, lk: LockCore, old: Mode, err: DLMError) -> Outcome:
        """G4: a down-conversion is never taken back. Converting back up could wait, or be
        refused, where the weaker mode has already let another lock in; counted as granted
        there, it made two incompatible holders (found by the simulator, seed 20). So a
        down-conversion that did not reach a quorum in time (a paused or unreachable
        instance) still stands: the lock takes the weaker mode, which every instance covers
        (it holds either the old, stronger mode or the new one), and the renewals finish
        the conversion where it did not arrive (R1, with the value block it wrote). The
        caller still gets `err` (`Outcome.keep`): its value write is not known to be on a
        quorum."""
        new = lk.rq
        if lk.new_value is not None and old >= Mode.PW:  # the write it carried (R1 resends)
            lk.written = (lk.new_value, lk.next_version())
            lk.written_ok = False  # (not known to be stored anywhere: V7 reads it not valid)
            if new != Mode.NL:
                lk.value, lk.version = lk.written
                lk.value_valid = True
        lk.new_value = None
        lk.mode = new
        lk.error = None
        lk.pending.clear()
        lk.phase = Phase.HELD
        return Outcome(error=err, keep=True)

    def rollback_convert(self, lk: LockCore, old: Mode, results: dict[int, object]) -> None:
        """After the clean-up of a failed conversion (a cancel where it was queued, a
        conversion back to `old` where it was granted): what each instance holds now, as
        it answered. Where the way back did not go through at once (a sideways conversion
        back may queue behind a lock the new mode let in), the instance keeps the mode it
        reports, which may not cover `old`: it does not count for the lock (never counted
        without an answer that says so), which is reported lost if too few instances hold
        `old`. Where nothing was sent, the conversion did not happen: `old` is held."""
        for i, v in enumerate(lk.votes):
            if i not in results:
                if v.vote in (Vote.GRANTED, Vote.NOTQUEUED, Vote.DEADLOCK):
                    v.vote, v.mode = Vote.GRANTED, old
                continue
            rep = results[i]
            if isinstance(rep, BaseException) or not isinstance(rep, LockReply):
                v.vote = Vote.ERROR
            elif rep.status in (Status.GRANTED, Status.QUEUED, Status.CANCELLED,
                                Status.CANCELGRANT) and rep.mode is not None:
                v.vote, v.mode = Vote.GRANTED, rep.mode  # (QUEUED: the way back waits)
            else:
                v.vote, v.mode = Vote.ABSENT, None
        lk.rq = old
        lk.mode = old
        lk.unwinding = False
        if lk.phase is not Phase.LOST:
            lk.phase = Phase.HELD

    def abandon_convert_cmds(self, lk: LockCore, old: Mode, down: bool,
                             sent: Sequence[tuple[int, tuple]], first: bool = True
                             ) -> list[tuple[int, tuple]]:
        """What to send when the caller gave up on a conversion before it returned
        (cancelled, interrupted): replies may have been cut short, so what an instance did
        with the conversion is not known everywhere (`lk.pending`).

        A down-conversion (`down`) is completed: it never waits (G4) and, once it reached
        an instance, other locks may already be granted beside its new mode there, so the
        old mode cannot be taken back without waiting. It is sent again (`sent`) wherever
        its grant is not known (a conversion to the mode already held is granted again,
        and writes the same value and version).

        Any other conversion is withdrawn and the lock keeps its old mode: on the `first`
        pass a cancel (N3: a queued conversion returns to the old mode; a granted one
        answers CANCELGRANT with its mode) wherever the conversion is not known to be
        granted, a conversion back to `old` (always at once, G4) where it is granted in
        another mode. Later passes (after `on_abandon_reply`) only convert back where a
        cancel found the conversion granted."""
        if down:
            return [(i, cmd) for i, cmd in sent
                    if i in lk.pending or not (lk.votes[i].vote is Vote.GRANTED
                                               and lk.votes[i].mode == lk.rq)]
        out = []
        for i, v in enumerate(lk.votes):
            if v.vote is Vote.GRANTED and v.mode != old and i not in lk.pending:
                out.append((i, self.convert_cmd(lk, old, 0, None, 0, i)))
            elif first and (i in lk.pending or v.vote is not Vote.GRANTED):
                out.append((i, self.cancel_cmd(lk)))
        lk.pending.clear()
        return out

    def on_abandon_reply(self, lk: LockCore, i: int, reply: object, sent_at: float,
                         now: float) -> None:
        """Record an answer to `abandon_convert_cmds`: a cancel's answer is the mode the
        lock holds there now (the old one if the conversion was still queued)."""
        rep = reply
        if isinstance(rep, LockReply) and rep.status in (Status.CANCELLED,
                                                          Status.CANCELGRANT):
            v = lk.votes[i]
            lk.pending.discard(i)
            if rep.mode is None:
                v.vote, v.mode = Vote.ABSENT, None
            else:
                v.vote, v.mode, v.token, v.by_event = Vote.GRANTED, rep.mode, rep.token, False
            return
        try:
            self.on_reply(lk, i, reply, sent_at, now)
        except DLMError as exc:  # refused alike everywhere: nothing changed there
            lk.votes[i].vote, lk.votes[i].error = Vote.ERROR, describe(exc)

    def end_abandon(self, lk: LockCore, old: Mode) -> None:
        """After a withdrawn (not down) conversion: the lock holds `old` again."""
        lk.rq = old
        lk.mode = old
        lk.error = None
        lk.pending.clear()
        lk.unwinding = False
        if lk.phase is not Phase.LOST:
            lk.phase = Phase.HELD

    # renewal ----------------------------------------------------------------

    def holding(self, lk: LockCore, now: float) -> int:
        """Instances where `lk` still holds its mode with a valid lease (`LockCore.holds`)."""
        return sum(1 for v in lk.votes if lk.holds(v) and lk.vote_validity(v, now) > 0)

    _REJOIN_FROM = (Vote.ABSENT, Vote.RECOVERING, Vote.ERROR, Vote.NOTQUEUED, Vote.NOPARENT)

    def _rejoin_due(self, lk: LockCore, i: int, now: float) -> bool:
        v = lk.votes[i]
        return (lk.phase is Phase.HELD and not lk.unwinding and v.rejoin
                and i not in lk.repairing
                and v.vote in self._REJOIN_FROM and now >= v.retry_at)

    def repairs_due(self, i: int, now: float) -> bool:
        """True if instance i owes a held lock a rejoin (R2), even with no renewal to send
        it (the lock lives on other instances only)."""
        return any(self._rejoin_due(lk, i, now) for lk in self.locks.values())

    def repair_cmds(self, i: int, now: float) -> list[tuple[LockCore, tuple]]:
        """After a renewal reply from instance i, the commands that repair what it says:

        * R1: where a held lock is still granted in a stronger mode than it holds (a
          down-conversion that did not arrive there), that down-conversion again (granted
          at once, G4), with the value block it wrote, if any. A stale stronger mode is
          safe but blocks others for the lock's life.
        * R2: where the instance restarted empty and lost a held lock, the lock's request
          again (same id, ticket and mode): the instance answers RECOVERING until it is
          safe (E1), then grants it or queues it like any request; so the lock regains its
          vote there, and the writes and releases that follow reach that instance again.

        Each lock is marked `repairing` until `on_repair_reply`: a conversion or release
        started meanwhile waits, so the repair can never land after it and undo it."""
        out = []
        for lk in self.locks.values():
            v = lk.votes[i]
            if (lk.phase is Phase.HELD and not lk.unwinding and lk.mode is not None
                    and i not in lk.repairing and v.vote is Vote.GRANTED
                    and v.mode is not None and v.mode != lk.mode
                    and is_down_conversion(v.mode, lk.mode)):
                value, version = lk.written if lk.written else (None, 0)
                lk.repairing.add(i)
                out.append((lk, self.convert_cmd(lk, lk.mode, 0, value, version, i)))
            elif self._rejoin_due(lk, i, now):
                lk.repairing.add(i)
                out.append((lk, self.request_cmd(lk)))
        return out

    def on_repair_reply(self, lk: LockCore, i: int, reply: object, sent_at: float,
                        now: float) -> None:
        lk.repairing.discard(i)
        if lk.phase is not Phase.HELD:
            return  # released or lost meanwhile: nothing to record
        if isinstance(reply, BaseException):
            lk.votes[i].error = describe(reply)  # the next renewal tells, and repairs again
            return
        self.on_reply(lk, i, reply, sent_at, now)
        v = lk.votes[i]
        if v.vote in (Vote.GRANTED, Vote.QUEUED):
            v.rejoin = False  # R2 done: renewals keep it from here

    def check_held(self, now: float) -> list[LockCore]:
        """Locks that were held and no longer are: reported lost."""
        lost = []
        for lk in list(self.locks.values()):
            if lk.phase in (Phase.HELD, Phase.CONVERTING) and lk.mode is not None:
                held = self.holding(lk, now)
                if held < self.quorum:
                    lk.phase = Phase.LOST
                    lk.lost_reason = (f"held on {held} of {self.n} instances, "
                                      f"{self.quorum} needed; {self.tally(lk)}")
                    lost.append(lk)
        return lost


def descendants(lk: LockCore) -> list[LockCore]:
    out = []
    for c in lk.children:
        out.append(c)
        out.extend(descendants(c))
    return out


def lasting(exc: BaseException) -> bool:
    """True for an instance failure that waiting does not heal: authentication, the ACL,
    an instance that is not Redis, a TLS certificate refused, an answer the protocol does
    not expect. A timeout, a refused or reset connection, a server still loading are
    short failures (a paused, restarting or overloaded instance): a wait goes on (R3)."""
    if isinstance(exc, DLMError):
        return True  # a typed refusal by the instance (ProtocolError, a script's error...)
    why = describe(exc)
    return why.startswith(("authentication failed", "refused by the instance's ACL",
                           "not a Redis server")) or "certificate" in why


def check_int(what: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidType(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidArgument(f"{what} must be {lo}..{hi}, got {value}")
    return value


def check_callback(what: str, fn: object) -> None:
    """A notification callback: None or callable (a wrong one fails here, not later on the
    callback thread)."""
    if fn is not None and not callable(fn):
        raise InvalidType(f"{what} must be callable or None, not {type(fn).__name__}")


def is_answer(exc: BaseException) -> bool:
    """True if `exc` is an instance's own error reply (it answered), not a failure to reach
    it: a script's typed error, or any error reply of the server."""
    return isinstance(exc, DLMError) or any(
        c.__name__ == "ResponseError" for c in type(exc).__mro__)


def describe(exc: BaseException) -> str:
    """One line saying why an instance failed, naming the usual causes: authentication,
    the ACL, an instance that is not Redis, a timeout, a refused connection, a corrupt
    resource key. (Every one-line account of an instance's failure, client or operator
    tool, is this one.)"""
    name = type(exc).__name__
    text = " ".join(str(exc).split())[:200] or name
    if isinstance(exc, CorruptKey):
        return f"resource key {exc.key} corrupt"
    if "Authentication" in name or text.startswith(("WRONGPASS", "NOAUTH", "invalid username")):
        return f"authentication failed (wrong user name or password?): {text}"
    if "NoPermission" in name or "NOPERM" in text[:40] or "no permissions" in text:
        return f"refused by the instance's ACL: {text}"
    if name in ("InvalidResponse", "AttributeError") or "Protocol" in text or (
            name == "ProtocolError" and text.startswith("unexpected")) or (
            not type(exc).__module__.startswith("redis.") and not isinstance(exc, OSError)
            and from_redis_py(exc)):
        return f"not a Redis server? ({name}: {text})"
    if isinstance(exc, DLMError):  # a typed error (LockTimeout is no network timeout)
        return f"{name}: {text}"
    if "Timeout" in name:
        return f"timed out ({text})"
    if "Connection" in name or isinstance(exc, OSError):
        return f"unreachable ({text})"
    return f"{name}: {text}"


def from_redis_py(exc: BaseException) -> bool:
    """True if `exc` was raised inside redis-py: talking to something that is not Redis,
    redis-py may fail with any exception (an AttributeError on a '+OK' to HELLO, say)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("redis.")


def quorum(n: int) -> int:
    """Q: the votes of N instances that hold a lock, a majority (N // 2 + 1)."""
    return n // 2 + 1


def check_lease(lease_ms: object) -> int:
    if isinstance(lease_ms, bool) or not isinstance(lease_ms, int):
        raise InvalidType("lease_ms must be an int (milliseconds)")
    if not 100 <= lease_ms <= 86_400_000:
        raise InvalidArgument("lease_ms must be 100..86400000")
    return lease_ms


def check_priority(priority: object) -> int:
    """P1: an int in MIN_PRIORITY..MAX_PRIORITY (a C int), checked before anything is sent."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidType(f"priority must be an int, not {type(priority).__name__}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidArgument(f"priority must be {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}")
    return int(priority)


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidType("timeout must be a number of seconds or None")
    if timeout < 0 or timeout != timeout:
        raise InvalidArgument("timeout must be >= 0")
    return float(timeout)
