"""Worker processes that use the DLM, and the independent observer that judges them.

Workers (:func:`worker_main`, started with multiprocessing *spawn*, one `DLM` each) loop
over a few resources: new locks in random modes NL..EX, conversions up and down, and
"keeper" locks held in NL and converted up to work (the VMS idiom, which also keeps each
resource and its value block alive). PW/EX holders increment a counter kept in the value
block. Every critical section is reported, while it happens, to the :class:`Observer`, which
lives in the test process, outside Redis and outside the DLM:

* ``begin``: the lock was granted and ``lock.valid`` was confirmed at ``t_start``; the token
  is *presented* to the protected resource (a storage model that remembers tokens and
  refuses a stale one, as a fencing-aware storage would).
* ``write`` (PW/EX): the holder checked ``lock.valid`` and writes the protected resource with
  its token; the storage accepts or refuses.
* ``lvb`` / ``lvb_done``: a value-block write is about to be sent (release or down
  conversion) / the call returned.
* ``end``: the last moment the holder confirmed ``lock.valid`` (``t_valid``), and whether
  the lock was still valid when the section ended.

Times are ``time.monotonic_ns()``, one clock for every process of the machine. A time of
confirmation is taken *before* ``lock.valid`` is asked, so "valid at t" is never claimed
later than the client itself believed it.

What the observer checks (:meth:`Observer.check`):

1. **Overlap**: no two incompatible sections (``COMPAT``) of different locks on one
   resource were confirmed held at the same instant (intervals ``[t_start, t_valid]``).
2. **Fencing at the resource**: between incompatible holders, the later one's token is
   strictly greater; and the storage never refused a holder that still confirmed its lock
   valid after the refusal (that would mean an incompatible, newer holder coexisted).
   Writes the storage accepted are counted as held up to the moment of the write, so a
   stale write that was *not* refused shows as an overlap.
3. **Value blocks**: a value read with ``value_valid`` True is the last write committed
   before the request was sent, or one attempted while it waited; never an older one.
4. **Liveness** (driven by the tests): every live worker keeps completing sections once
   the faults heal.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import secrets
import signal
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Listener
from typing import Any

from redlockdlm.engine.modes import COMPAT

NAMES = ("NL", "CR", "CW", "PR", "PW", "EX")
PW, EX = 4, 5

# Worker phases, published in a shared integer so a test can see where a process died.
IDLE, ACQUIRE, HOLD, CONVERT, RELEASE = 0, 1, 2, 3, 4
PHASES = ("idle", "acquire", "hold", "convert", "release")


def conflict(a: int, b: int) -> bool:
    return not COMPAT[a][b]


def now_ns() -> int:
    return time.monotonic_ns()


# --------------------------------------------------------------------------- observer


@dataclass
class Section:
    sid: str
    worker: str
    lock_id: str
    res: str
    mode: int
    token: int
    origin: str  #: new | up | down (how the mode was obtained)
    t_req: int  #: the request/conversion was sent after this
    t_ret: int  #: lock()/convert() had returned before this
    t_start: int | None  #: first confirmation of lock.valid (None: never confirmed)
    t_valid: int | None  #: last confirmation of lock.valid
    t_present: int = 0  #: observer time the storage saw the token
    read: tuple | None = None  #: (value, value_valid, version) at grant, for origin new/up
    accepted: bool = True  #: the storage accepted the token at begin
    writes: list = field(default_factory=list)  #: (t, value, accepted, valid_when_written)
    ended: bool = False
    valid_at_end: bool | None = None
    refused_then_valid: bool = False
    confirms: list = field(default_factory=list)  #: every confirmation of lock.valid


@dataclass
class LvbWrite:
    sid: str
    lock_id: str
    value: bytes
    t_intent: int
    t_done: int | None = None
    ok: bool = False


class Observer:
    """The independent judge. Runs in the test process: a listener thread accepts one
    connection per worker (``multiprocessing.connection``, 127.0.0.1, an auth key); every
    message is answered, so a worker never runs ahead of what the observer recorded.
    In-process clients call :meth:`handle` directly."""

    def __init__(self) -> None:
        self.mu = threading.RLock()
        self.sections: dict[str, Section] = {}
        self.by_res: dict[str, list[Section]] = defaultdict(list)
        self.top: dict[str, list[list[tuple[int, str]]]] = defaultdict(
            lambda: [[] for _ in range(6)])
        self.lvb: dict[str, list[LvbWrite]] = defaultdict(list)
        #: res -> keeper lock id -> [first, last] confirmation of lock.valid (NL keepers)
        self.keepers: dict[str, dict[str, list[int]]] = defaultdict(dict)
        self.keeper_owner: dict[str, str] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.begins: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.paused: list[tuple[str, str]] = []  #: (worker, sid) that stopped themselves
        self.errors: list[str] = []
        self.debug: dict[str, str] = {}
        self.tokens_checked = 0
        self.refused = 0
        self.authkey = secrets.token_bytes(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=self.authkey)
        self.address = self._listener.address
        self._closed = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept_loop, name="observer", daemon=True)
        t.start()
        self._threads.append(t)

    # ------------------------------------------------------------------ transport

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception:  # noqa: BLE001 - closed, or a failed handshake
                if self._closed:
                    return
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="observer-conn")
            t.start()
            self._threads.append(t)

    def _serve(self, conn: Any) -> None:
        worker = None
        try:
            while True:
                msg = conn.recv()
                if msg[0] == "hello":
                    worker = msg[1]
                conn.send(self.handle(msg))
        except (EOFError, OSError):
            pass
        finally:
            if worker is not None:
                with self.mu:
                    self.workers.setdefault(worker, {})["t_gone"] = now_ns()
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._listener.close()

    # ------------------------------------------------------------------ the storage model

    def _refuses(self, res: str, mode: int, token: int, lock_id: str) -> bool:
        """The protected resource refuses a token when it has already accepted an equal or
        greater one from another lock in an incompatible mode (tokens of conflicting
        holders strictly increase, so an equal one is not newer)."""
        self.tokens_checked += 1
        top = self.top[res]
        for m in range(6):
            if conflict(m, mode):
                for tok, lid in top[m]:
                    if lid != lock_id and tok >= token:
                        return True
        return False

    def _accept(self, res: str, mode: int, token: int, lock_id: str) -> None:
        """Remember an accepted token: per mode, the two highest of distinct locks (enough
        to answer "the highest of any *other* lock")."""
        top = self.top[res][mode]
        for i, (tok, lid) in enumerate(top):
            if lid == lock_id:
                top[i] = (max(tok, token), lid)
                break
        else:
            top.append((token, lock_id))
        top.sort(reverse=True)
        del top[2:]

    # ------------------------------------------------------------------ messages

    def handle(self, msg: tuple) -> Any:
        kind = msg[0]
        with self.mu:
            if kind == "hello":
                _, worker, owner, pid = msg
                self.workers[worker] = {"owner": owner, "pid": pid, "t_hello": now_ns()}
                return True
            if kind == "begin":
                (_, sid, worker, lock_id, res, mode, token, origin, t_req, t_ret, t_start,
                 read) = msg
                s = Section(sid, worker, lock_id, res, mode, token, origin, t_req, t_ret,
                            t_start, t_start, read=read)
                if t_start is not None:
                    s.confirms.append(t_start)
                s.accepted = not self._refuses(res, mode, token, lock_id)
                s.t_present = now_ns()
                if s.accepted:
                    self._accept(res, mode, token, lock_id)
                else:
                    self.refused += 1
                self.sections[sid] = s
                self.by_res[res].append(s)
                self.begins[worker] += 1
                return s.accepted
            if kind == "valid":  # the holder confirmed lock.valid at t
                _, sid, t = msg
                s = self.sections[sid]
                s.confirms.append(t)
                s.t_valid = t if s.t_valid is None else max(s.t_valid, t)
                if s.t_start is None:
                    s.t_start = t
                if not s.accepted or any(not w[2] for w in s.writes):
                    s.refused_then_valid = True
                return True
            if kind == "write":
                _, sid, value, valid_now = msg
                s = self.sections[sid]
                ok = s.accepted and not self._refuses(s.res, s.mode, s.token, s.lock_id)
                s.writes.append((now_ns(), value, ok, valid_now))
                if not ok:
                    self.refused += 1
                elif not valid_now:
                    self.stats["stale writes accepted (no newer holder yet)"] += 1
                return ok
            if kind == "lvb":
                _, sid, value, t = msg
                s = self.sections[sid]
                self.lvb[s.res].append(LvbWrite(sid, s.lock_id, value, t))
                return True
            if kind == "lvb_done":
                _, sid, t, ok = msg
                for w in reversed(self.lvb[self.sections[sid].res]):
                    if w.sid == sid:
                        w.t_done, w.ok = t, ok
                        break
                return True
            if kind == "end":
                _, sid, valid_at_end = msg
                s = self.sections[sid]
                s.ended, s.valid_at_end = True, valid_at_end
                return True
            if kind == "keeper":  # an NL keeper lock confirmed valid at t
                _, res, lock_id, t, worker = msg
                span = self.keepers[res].setdefault(lock_id, [t, t])
                span[1] = max(span[1], t)
                self.keeper_owner[lock_id] = worker
                return True
            if kind == "debug":
                self.debug[msg[1]] = msg[2]
                return True
            if kind == "paused":
                _, worker, sid = msg
                self.paused.append((worker, sid))
                return True
            if kind == "stat":
                _, name, n = msg
                self.stats[name] += n
                return True
            if kind == "error":
                self.errors.append(f"{msg[1]}: {msg[2]}")
                return True
        raise ValueError(f"unknown message {kind!r}")

    # ------------------------------------------------------------------ queries

    def begins_of(self, worker: str) -> int:
        with self.mu:
            return self.begins[worker]

    def newer_conflicting(self, sid: str) -> Section | None:
        """A section, on the resource of `sid`, incompatible with it, with a greater token,
        that the storage accepted (so a stale write of `sid` must now be refused)."""
        with self.mu:
            s = self.sections[sid]
            for o in self.by_res[s.res]:
                if (o.lock_id != s.lock_id and o.accepted and conflict(o.mode, s.mode)
                        and o.token > s.token):
                    return o
        return None

    # ------------------------------------------------------------------ the checks

    def check(self) -> dict[str, Any]:
        """Run every check; returns counts and the list of violations (strings)."""
        with self.mu:
            violations: list[str] = []
            intervals = 0
            for res, secs in self.by_res.items():
                violations += self._check_overlap(res, secs)
                violations += self._check_tokens(res, secs)
                intervals += sum(1 for s in secs if s.t_start is not None)
            for s in self.sections.values():
                if s.refused_then_valid:
                    violations.append(
                        f"fencing: {s.res}: section {s.sid} ({NAMES[s.mode]}, token {s.token}) "
                        f"was refused by the storage yet its lock was still valid afterwards")
            lvb_checked, lvb_invalid, v = self._check_values()
            violations += v
            if violations and os.environ.get("DLM_FAULT_DUMP"):
                self._dump(os.environ["DLM_FAULT_DUMP"])
            return {
                "sections": len(self.sections),
                "held_intervals": intervals,
                "sections_ended_invalid": sum(1 for s in self.sections.values()
                                              if s.ended and s.valid_at_end is False),
                "tokens_checked": self.tokens_checked,
                "refused": self.refused,
                "writes": sum(len(s.writes) for s in self.sections.values()),
                "lvb_reads_checked": lvb_checked,
                "lvb_reads_invalid": lvb_invalid,
                "violations": violations,
                "stats": dict(self.stats),
                "worker_errors": list(self.errors),
            }

    @staticmethod
    def _held_end(s: Section) -> int:
        """Held until the last confirmation of lock.valid, or until the last write the
        storage accepted (a stale write that got through counts as holding)."""
        end = s.t_valid if s.t_valid is not None else s.t_start
        for t, _, ok, _ in s.writes:
            if ok:
                end = max(end, t)
        return end

    def _check_overlap(self, res: str, secs: list[Section]) -> list[str]:
        out = []
        spans = sorted(((s.t_start, self._held_end(s), s) for s in secs
                        if s.t_start is not None), key=lambda x: x[0])
        active: list[tuple[int, int, Section]] = []
        for start, end, s in spans:
            active = [a for a in active if a[1] > start]
            for a_start, a_end, a in active:
                if a.lock_id != s.lock_id and conflict(a.mode, s.mode):
                    out.append(
                        f"overlap: {res}: {a.worker} {NAMES[a.mode]} token {a.token} held "
                        f"[{a_start}, {a_end}] and {s.worker} {NAMES[s.mode]} token {s.token} "
                        f"[{start}, {end}] ({(a_end - start) / 1e6:.3f} ms in common)")
            active.append((start, end, s))
        return out

    def _check_tokens(self, res: str, secs: list[Section]) -> list[str]:
        """Between incompatible holders whose held intervals are disjoint, the later token
        is strictly greater. (Overlapping ones are reported by the overlap check.)"""
        out = []
        held = [s for s in secs if s.t_start is not None]
        by_end = sorted(held, key=self._held_end)
        by_start = sorted(held, key=lambda s: s.t_start)
        best: dict[int, Section] = {}  # mode -> the section of highest token ended so far
        j = 0
        for s in by_start:
            while j < len(by_end) and self._held_end(by_end[j]) < s.t_start:
                e = by_end[j]
                if e.mode not in best or e.token > best[e.mode].token:
                    best[e.mode] = e
                j += 1
            for m, e in best.items():
                if conflict(m, s.mode) and e.lock_id != s.lock_id and e.token >= s.token:
                    if s.sid in self.debug:
                        out.append(f"debug {s.sid}: {self.debug[s.sid]}")
                    out.append(
                        f"token: {res}: {s.worker} {NAMES[s.mode]} got token {s.token} after "
                        f"{e.worker} {NAMES[e.mode]} held token {e.token} (ended "
                        f"{(s.t_start - self._held_end(e)) / 1e6:.3f} ms before)")
        return out

    def _kept(self, res: str, a: int, b: int) -> bool:
        """Was some NL keeper of `res` confirmed held at every instant of [a, b]? Then the
        resource, and its value block, existed all along (G9: they disappear only with
        their last lock)."""
        t = a
        for first, last in sorted(self.keepers[res].values()):
            if first > t:
                break
            t = max(t, last)
            if t >= b:
                return True
        return t >= b

    def _dump(self, path: str) -> None:
        """Debugging (DLM_FAULT_DUMP=file, with DLM_FAULT_DEBUG=1): every resource's
        sections and value writes in time order, with the votes each one saw."""
        with open(path, "w") as f:
            for res, secs in self.by_res.items():
                rows: list[tuple[int, str]] = []
                for s in secs:
                    rows.append((s.t_req, f"req  {s.sid} {s.worker} {NAMES[s.mode]} {s.origin} "
                                          f"tok {s.token} ret +{(s.t_ret - s.t_req) // 1000} us "
                                          f"read {s.read} {self.debug.get(s.sid, '')}"))
                for w in self.lvb[res]:
                    rows.append((w.t_intent, f"lvb  {w.sid} {w.value!r} ok {w.ok} done "
                                             f"{w.t_done} {self.debug.get(w.sid + '.lvb', '')}"))
                f.write(f"== {res}\n")
                for t, line in sorted(rows):
                    f.write(f"{t} {line}\n")

    def _check_values(self) -> tuple[int, int, list[str]]:
        out: list[str] = []
        checked = invalid = 0
        for res, secs in self.by_res.items():
            writes = self.lvb[res]
            for s in secs:
                if s.read is None or s.origin == "down" or s.mode == 0:
                    continue
                value, valid, version = s.read
                if not valid:
                    invalid += 1
                    continue
                checked += 1
                base_i = -1
                for i, w in enumerate(writes):
                    if w.ok and w.t_done is not None and w.t_done < s.t_req:
                        base_i = i
                allowed = [] if base_i < 0 else [writes[base_i].value]
                if base_i < 0 or not self._kept(res, writes[base_i].t_intent, s.t_ret):
                    # no write yet, or the resource may have vanished since, up to the grant
                    # that read it (every lock gone, G9): an empty value block is legitimate
                    allowed.append(None)
                    self.stats["value reads after a possible resource gap"] += base_i >= 0
                allowed += [w.value for w in writes[base_i + 1:] if w.t_intent < s.t_ret]
                if value not in allowed:
                    if s.sid in self.debug:
                        a = writes[base_i].t_intent if base_i >= 0 else 0
                        spans = sorted((f, lst, self.keeper_owner.get(lid), lid)
                                       for lid, (f, lst) in self.keepers[res].items()
                                       if lst >= a and f <= s.t_ret)
                        out.append(f"debug {s.sid}: {self.debug[s.sid]}; keepers over "
                                   f"[{a}, {s.t_ret}]: {spans}")
                    base = writes[base_i].value if base_i >= 0 else None
                    out.append(
                        f"value: {res}: {s.worker} {NAMES[s.mode]} (token {s.token}) read "
                        f"{value!r} v{version} with value_valid True; the last committed write "
                        f"before its request was {base!r}"
                        + (f", later attempts {allowed[1:]!r}" if len(allowed) > 1 else ""))
        return checked, invalid, out


# --------------------------------------------------------------------------- worker


def _value_counter(v: bytes | None) -> int:
    if not v:
        return 0
    try:
        return int(v.split(b":", 1)[0])
    except ValueError:
        return 0


class _Worker:
    """The body of one worker process (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any], stop: Any, phase: Any) -> None:
        from redlockdlm import DLM

        self.cfg = cfg
        self.wid = cfg["wid"]
        self.stop = stop
        self.phase = phase
        self.rng = random.Random(cfg.get("seed"))
        self.conn = Client(tuple(cfg["observer"]), authkey=cfg["authkey"])
        self.conn_mu = threading.Lock()
        opts = dict(lease_ms=cfg["lease_ms"], socket_timeout=cfg["socket_timeout"],
                    connect_timeout=cfg["connect_timeout"])
        if cfg.get("client", "sync") == "async":  # AsyncDLM behind a blocking facade
            from quorum.clients import make_client

            self.dlm = make_client("async", cfg["urls"], cfg["namespace"], **opts)
        else:
            self.dlm = DLM(cfg["urls"], cfg["namespace"], **opts)
        self.keepers: dict[str, Any] = {}
        self.seq = 0
        self.pw_sections = 0
        self.phase_counts: Counter[int] = Counter()
        self.call("hello", self.wid, self.dlm.owner, os.getpid())

    def _instances_view(self, lk: Any) -> str:
        """Debugging: the resource as each instance holds it right now."""
        import redis

        from redlockdlm.engine.instance import Engine

        out = []
        for url in self.cfg["direct_urls"]:
            c = redis.Redis.from_url(url, socket_timeout=1.0)
            try:
                eng = Engine(c, self.cfg["namespace"])
                _, (v,) = eng.inspect([eng.key(lk.resource)])
                out.append(None if v is None else (v.value, v.version, v.valid, [
                    (x.queue, x.owner[:4], x.mode, x.lease_left_ms) for x in v.locks]))
            except Exception as exc:  # noqa: BLE001
                out.append(repr(exc))
            finally:
                c.close()
        return str(out)

    def call(self, *msg: Any) -> Any:
        with self.conn_mu:
            self.conn.send(msg)
            return self.conn.recv()

    def stat(self, name: str) -> None:
        self.call("stat", name, 1)

    # ------------------------------------------------------------------ phases & plans

    def set_phase(self, p: int) -> None:
        self.phase.value = p
        if p in (ACQUIRE, CONVERT, RELEASE):
            self.phase_counts[p] += 1
            die = self.cfg.get("die")  # (phase, nth, delay_ms): SIGKILL ourselves mid-call
            if die and die[0] == p and die[1] == self.phase_counts[p]:
                t = threading.Timer(die[2] / 1000.0, os.kill, (os.getpid(), signal.SIGKILL))
                t.daemon = True
                t.start()

    def pick_mode(self, low: int = 0, other_than: int | None = None) -> int:
        weights = list(self.cfg["mode_weights"])
        for m in range(low):
            weights[m] = 0
        if other_than is not None:
            weights[other_than] = 0
        return self.rng.choices(range(6), weights)[0]

    # ------------------------------------------------------------------ one section

    def section(self, lk: Any, mode: int, origin: str, t_req: int,
                t_ret: int) -> tuple[str, bytes | None]:
        """A critical section in `mode`: present the token, hold a while (confirming
        validity), then, for PW/EX, write the protected resource. Returns the section id
        and the value the holder may put in the value block (None: nothing to write)."""
        t = now_ns()
        ok = lk.valid
        read = (lk.value, lk.value_valid, lk.version) if mode != 0 else None
        self.seq += 1
        sid = f"{self.wid}.{self.seq}"
        accepted = self.call("begin", sid, self.wid, lk.id, lk.resource, mode, lk.token,
                             origin, t_req, t_ret, t if ok else None, read)
        if self.cfg.get("debug_votes"):
            extra = ""
            if read is not None and read[0] is None and self.cfg.get("direct_urls"):
                extra = " instances now: " + self._instances_view(lk)
            self.call("debug", sid, f"{origin} t_req={t_req} t_ret={t_ret} " + str([
                (v.vote.value, v.mode, v.token, round(time.monotonic() - v.sent_at, 3),
                 v.by_event, v.version, v.value, v.valid) for v in lk._core.votes]) + extra)
        if ok and not accepted:
            # legitimate when the process stopped between its check and the presentation
            # (a newer holder came meanwhile); a violation if it still holds afterwards,
            # which the hold loop below reports
            self.stat("token refused at its first use (stopped after the check?)")
        self.set_phase(HOLD)
        end = time.monotonic() + self.rng.uniform(*self.cfg["hold_ms"]) / 1000.0
        while accepted:
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.02))
            t = now_ns()
            if lk.valid:
                self.call("valid", sid, t)
        # the end: confirm validity right before acting on the resource
        t = now_ns()
        ok = lk.valid
        if ok:
            self.call("valid", sid, t)
        new = None
        if mode >= PW and accepted and ok:
            self.pw_sections += 1
            pause = self.cfg.get("pause_every")
            if (pause and self.pw_sections % pause == 0
                    and self.pw_sections // pause <= self.cfg.get("pause_max", 1 << 30)):
                # the Kleppmann hazard: checked valid, then the process stops (GC, SIGSTOP)
                # for longer than the lease, and writes when it wakes up
                self.call("paused", self.wid, sid)
                os.kill(os.getpid(), signal.SIGSTOP)
                ok_now = lk.valid
            else:
                ok_now = True
            ok = ok and ok_now
            self.seq += 1
            new = f"{_value_counter(read[0]) + 1}:{self.wid}:{self.seq}".encode()
            if not self.call("write", sid, new, ok_now):
                t2 = now_ns()
                if lk.valid:  # refused, yet we believe we hold: the observer flags it
                    self.call("valid", sid, t2)
                new = None
            elif self.rng.random() >= self.cfg["p_write_lvb"]:
                new = None
        self.call("end", sid, ok)
        return sid, new

    def write_lvb_then(self, lk: Any, sid: str, new: bytes | None, action: Any) -> Any:
        """Run `action` (a release or down-conversion) writing `new` to the value block."""
        if new is not None:
            lk.value = new
            self.call("lvb", sid, new, now_ns())
        ok = False
        try:
            result = action()
            ok = True
            return result
        finally:
            if new is not None:
                self.call("lvb_done", sid, now_ns(), ok)
                if self.cfg.get("debug_votes"):
                    self.call("debug", f"{sid}.lvb", f"wrote {new!r}: " + str([
                        (v.vote.value, v.mode, v.version, v.value) for v in lk._core.votes]))

    def convert(self, lk: Any, to: int) -> tuple[bool, int, int]:
        """Convert; (converted, t_req, t_ret). A refused conversion keeps the old mode."""
        from redlockdlm.errors import Deadlock, LockTimeout, NotQueued

        t_req = now_ns()
        self.set_phase(CONVERT)
        try:
            lk.convert(to, timeout=self.cfg["acquire_timeout"])
        except (Deadlock, LockTimeout, NotQueued) as exc:
            self.stat(f"convert: {type(exc).__name__}")
            return False, t_req, now_ns()
        return True, t_req, now_ns()

    # ------------------------------------------------------------------ the two patterns

    def use_new_lock(self, res: str) -> None:
        """lock(mode); section; maybe convert and a second section; release."""
        from redlockdlm.errors import DLMError

        mode = self.pick_mode()
        t_req = now_ns()
        self.set_phase(ACQUIRE)
        try:
            lk = self.dlm.lock(res, mode, timeout=self.cfg["acquire_timeout"])
        except DLMError as exc:
            self.set_phase(IDLE)
            self.stat(f"lock: {type(exc).__name__}")
            time.sleep(0.02)
            return
        t_ret = now_ns()
        try:
            sid, new = (self.section(lk, mode, "new", t_req, t_ret) if mode != 0
                        else (None, None))
            if self.rng.random() < self.cfg["p_convert"]:
                to = self.pick_mode(other_than=mode)
                down = to < mode
                done, t_req, t_ret = self.write_lvb_then(
                    lk, sid, new if down else None, lambda: self.convert(lk, to))
                new = None
                if done and to != 0:
                    sid, new = self.section(lk, to, "down" if down else "up", t_req, t_ret)
            self.set_phase(RELEASE)
            self.write_lvb_then(lk, sid, new, lk.release)
        except DLMError as exc:
            self.stat(f"use: {type(exc).__name__}")
            with contextlib.suppress(DLMError):
                lk.release()
        finally:
            self.set_phase(IDLE)

    def keeper(self, res: str) -> Any:
        """This worker's NL lock on `res` (taken again if it was lost)."""
        from redlockdlm.errors import DLMError

        lk = self.keepers.get(res)
        if lk is not None and lk.valid:
            return lk
        if lk is not None:
            self.stat("keeper lost")
            with contextlib.suppress(DLMError):
                lk.release()
            self.keepers.pop(res, None)
        self.set_phase(ACQUIRE)
        try:
            lk = self.dlm.lock(res, "NL", timeout=self.cfg["acquire_timeout"])
        except DLMError as exc:
            self.stat(f"keeper: {type(exc).__name__}")
            return None
        finally:
            self.set_phase(IDLE)
        self.keepers[res] = lk
        self.confirm_keepers()
        return lk

    def confirm_keepers(self) -> None:
        for res, lk in list(self.keepers.items()):
            t = now_ns()
            if lk.valid:
                self.call("keeper", res, lk.id, t, self.wid)

    def _confirm_keepers_loop(self) -> None:
        """Keepers are confirmed every 50 ms, also while the main thread waits for a lock:
        the value-block check needs to know when a resource surely existed."""
        while not self.stop.is_set():
            time.sleep(0.05)
            try:
                self.confirm_keepers()
            except Exception:  # noqa: BLE001 - e.g. the client closed at the end
                return

    def use_keeper(self, res: str) -> None:
        """Convert the NL keeper up; section; convert back to NL (writing the value)."""
        from redlockdlm.errors import DLMError

        lk = self.keeper(res)
        if lk is None:
            time.sleep(0.02)
            return
        to = self.pick_mode(low=1)
        try:
            done, t_req, t_ret = self.convert(lk, to)
            if done:
                sid, new = self.section(lk, to, "up", t_req, t_ret)
                self.write_lvb_then(lk, sid, new, lambda: self.convert(lk, 0))
        except DLMError as exc:
            self.stat(f"keeper use: {type(exc).__name__}")
            with contextlib.suppress(DLMError):
                lk.release()
            self.keepers.pop(res, None)
        finally:
            self.set_phase(IDLE)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        for res in self.cfg["resources"]:
            if self.cfg["p_keeper"] > 0:
                self.keeper(res)
        self.call("stat", "workers ready", 1)
        threading.Thread(target=self._confirm_keepers_loop, daemon=True).start()
        while not self.stop.is_set():
            res = self.rng.choice(self.cfg["resources"])
            self.confirm_keepers()
            try:
                if self.rng.random() < self.cfg["p_keeper"]:
                    self.use_keeper(res)
                else:
                    self.use_new_lock(res)
            except Exception:  # noqa: BLE001 - report and go on: the test judges
                self.call("error", self.wid, traceback.format_exc(limit=8))
                time.sleep(0.05)
            time.sleep(self.rng.uniform(*self.cfg["idle_ms"]) / 1000.0)
        self.set_phase(IDLE)
        with contextlib.suppress(Exception):
            getattr(self.dlm, "shutdown", self.dlm.close)()


def _dump(w: _Worker) -> None:
    """SIGUSR1: print this worker's protocol state (a test found it stuck)."""
    import sys

    now = time.monotonic()
    lines = [f"--- worker {w.wid} phase {PHASES[w.phase.value]}"]
    lines[0] += f" ({w.cfg.get('client', 'sync')} client)"
    for lk in list(w.dlm._core.locks.values()):
        lines.append(
            f"  {lk.name!r} {lk.phase.value} mode={lk.mode} rq={lk.rq} token={lk.token} "
            f"wake_at={getattr(lk, 'wake_at', None) and round(lk.wake_at - now, 3)} "
            f"deadline={lk.deadline and round(lk.deadline - now, 3)} votes=" + str([
                (v.vote.value, v.mode, v.token, round(now - v.sent_at, 3), v.wait_ms,
                 v.lapsed, v.by_event) for v in lk.votes]))
    thread = getattr(w.dlm, "_thread", None)
    if thread is not None:
        lines.append(f"  event thread alive: {thread.is_alive()}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def worker_main(cfg: dict[str, Any], stop: Any, phase: Any) -> None:
    """Entry point of a worker process."""
    w = _Worker(cfg, stop, phase)
    signal.signal(signal.SIGUSR1, lambda *_: _dump(w))
    w.run()


# --------------------------------------------------------------------------- handles

DEFAULTS: dict[str, Any] = {
    "lease_ms": 1500,
    "socket_timeout": 0.3,
    "connect_timeout": 0.3,
    "acquire_timeout": 8.0,
    "hold_ms": (5.0, 40.0),
    "idle_ms": (0.0, 10.0),
    #               NL  CR  CW  PR  PW  EX
    "mode_weights": (1, 2, 1, 3, 2, 3),
    "p_convert": 0.5,
    "p_keeper": 0.4,
    "p_write_lvb": 0.85,
    "client": "sync",  #: or "async": AsyncDLM (through tests/quorum/clients.py's facade)
}


class WorkerHandle:
    """A worker process, as seen from the test."""

    _ctx = multiprocessing.get_context("spawn")

    def __init__(self, wid: str, cfg: dict[str, Any]) -> None:
        self.wid = wid
        self.cfg = cfg
        self.stop_event = self._ctx.Event()
        self.phase = self._ctx.Value("i", IDLE, lock=False)
        self.proc = self._ctx.Process(target=worker_main, args=(cfg, self.stop_event, self.phase),
                                      name=f"dlm-worker-{wid}", daemon=True)
        self.proc.start()
        self.paused = False
        self.killed_in: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def _signal(self, sig: int) -> None:
        if self.proc.pid is not None and self.proc.exitcode is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> str:
        """SIGKILL; returns the phase the worker was in."""
        phase = PHASES[self.phase.value]
        self._signal(signal.SIGKILL)
        self.proc.join(5)
        self.killed_in = phase
        return phase

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        self.stop_event.set()
        if self.paused:
            self.resume()

    def join(self, timeout: float) -> bool:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGKILL)
            self.proc.join(5)
            return False
        return True
