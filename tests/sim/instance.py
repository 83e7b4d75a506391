"""A simulated Redis instance: the reference model (`tests/model.py`, kept equal to the Lua
by `tests/engine/test_model_vs_lua.py`, events included) behind the wire form the real
transports read.

`SimInstance.execute(call, t)` decodes one `protocol.Call` (script name, KEYS, ARGV as the
client builds them with `engine/codec.py`) into a model call at the instance's own clock,
and answers the raw reply as Redis hands the Lua script's return value to redis-py (a list
of ints, bytes and None; a `DLM_*` error reply as a `ResponseError`), plus the events the
call published, as (owner, payload bytes). The client settles the raw reply with the real
`wire.settle` and parses events with the real `codec.parse_event`.
"""

from __future__ import annotations

import pickle
from typing import Any

from model import EngineError, Model, event_bytes
from redis.exceptions import ResponseError

from redlockdlm.engine.modes import Flag, Mode
from redlockdlm.errors import SCRIPT_ERRORS, DLMError

_CODE = {cls: code for code, cls in SCRIPT_ERRORS.items()}
T0_MS = 1_800_000_000_000  #: the instances' wall clock at simulated time 0


class SimModel(Model):
    """The reference model with a cheaper snapshot: `Model._run` deep-copies the whole
    state before every call, to restore it if the call fails (half the simulator's time);
    a pickle of it is five to ten times cheaper and restores the same state."""

    def _run(self, fn, *args):  # noqa: ANN001, ANN002, ANN202 (as Model._run)
        saved = pickle.dumps((self.res, self.windex, self.epoch_safe, self.epoch_restarted,
                              self.reloaded), -1)
        ev: list = []
        try:
            out = fn(ev, *args)
        except EngineError:
            (self.res, self.windex, self.epoch_safe, self.epoch_restarted,
             self.reloaded) = pickle.loads(saved)
            raise
        for key, r in self.res.items():
            self._finish(key, r)
        self.events.extend(ev)
        return out


def _lock_reply(rep: Any, epoch: bytes) -> list:
    out = [int(rep.status), epoch, -1 if rep.gr is None else int(rep.gr), rep.token, rep.pos,
           rep.vb, rep.vv, rep.vi, rep.wait_ms, rep.extra, rep.nblockers]
    for owner, lid, gr in rep.blockers:
        out += [owner.encode(), lid.encode(), int(gr)]
    return out


class SimInstance:
    """One instance: a model, a clock (`rate` and `offset_ms` against simulated time: the
    skew of its wall clock), an epoch id per empty start, and its fault state."""

    def __init__(self, idx: int, rate: float, offset_ms: int) -> None:
        self.idx = idx
        self.rate = rate
        self.offset_ms = offset_ms
        self.gen = 0
        self.model = SimModel()
        self.model.init_fresh(self.clock_ms(0.0))  # a brand-new cluster (`init fresh`)
        self.epoch: bytes | None = None
        self.up = True  #: False while crashed (connections refused)
        self.paused_until = 0.0  #: simulated time a pause (SIGSTOP) ends
        self.calls = 0
        #: the observer's hook: fn(instance, key, value, version, stored) after a call
        #: that carried a value block write
        self.on_write: Any = None
        #: AOF with `appendfsync everysec` (the "aofrestart" fault): the file is synced
        #: every second of simulated time, at `sync_phase` past the second; `synced` is the
        #: state as of the last sync (None: persistence off, the default)
        self.sync_phase = (idx * 0.37) % 1.0
        self.next_sync = 0.0
        self.synced: bytes | None = None
        #: E2: restarts from the AOF so far, and whether the last one's epoch is still the
        #: reloaded one (the model replaces it at its first call that commits)
        self.reloads = 0
        self.reload_pending = False

    def enable_aof(self) -> None:
        self.synced = self._state()

    def _state(self) -> bytes:
        m = self.model
        return pickle.dumps((m.res, m.windex, m.epoch_safe, m.epoch_restarted, self.epoch,
                             self.gen), -1)

    def _sync(self, t: float) -> None:
        """Before a call at `t`: if a sync instant has passed since the last call, the
        state now (no call ran since that instant) is what the file holds."""
        if t >= self.next_sync:
            self.synced = self._state()
            k = int(t - self.sync_phase)  # the last sync instant at or before t
            self.next_sync = k + self.sync_phase + 1.0

    def restart_from_aof(self, crashed_at: float) -> None:
        """A restart that reloads the AOF as synced before the crash at `crashed_at`: every
        key written by the last second's calls is lost, the rest is back, the epoch key
        included. A new server process (E2): its first call that commits replaces the
        epoch (a rejoin wait, V5), and clients then see a new epoch id (R2)."""
        self._sync(crashed_at)
        m = self.model = SimModel()
        m.res, m.windex, m.epoch_safe, m.epoch_restarted, self.epoch, self.gen = (
            pickle.loads(self.synced))
        if m.epoch_safe is None:  # synced before its first epoch: a new one, a new id
            self.gen += 1
            self.epoch = None
        else:
            m.reload()
            self.reloads += 1
            self.reload_pending = True

    def clock_ms(self, t: float) -> int:
        return T0_MS + self.offset_ms + int(t * 1000.0 * self.rate)

    def restart_empty(self) -> None:
        """A restart that lost every key (no persistence): a new server, no epoch (E1: the
        first script creates one that waits its rejoin window)."""
        self.gen += 1
        self.model = SimModel()
        self.epoch = None
        self.reload_pending = False
        if self.synced is not None:  # its AOF went with its data
            self.synced = self._state()

    def _epoch(self) -> bytes | None:
        if self.reload_pending and not self.model.reloaded:  # E2: the epoch was replaced
            self.reload_pending = False
            self.epoch = b"i%dr%d" % (self.idx, self.reloads)  # (never reloaded from a file)
        if self.epoch is None and self.model.epoch_safe is not None:
            self.epoch = b"i%dg%d" % (self.idx, self.gen)
        return self.epoch

    def execute(self, call: tuple, t: float) -> tuple[Any, list[tuple[str, bytes]]]:
        """Run one script call at simulated time `t`: (raw reply, events published)."""
        self.calls += 1
        if self.synced is not None:
            self._sync(t)
        name, keys, args = call
        m = self.model
        now = self.clock_ms(t)
        try:
            raw = self._dispatch(m, name, keys, args, now)
        except DLMError as exc:
            raw = ResponseError(f"{_CODE[type(exc)]} {exc}")
        if self.on_write is not None and not isinstance(raw, BaseException):
            self._written(name, keys, args)
        events = [(owner, event_bytes(ev)) for owner, ev in m.events] if m.events else []
        m.events.clear()
        return raw, events

    def _written(self, name: str, keys: list, a: list) -> None:
        """Tell the observer of a value block write this call carried, and whether the
        instance now stores it (V6 keeps a newer one; V3 refuses a non-writer)."""
        if name == "release" and a[5] == b"1":
            value, version = a[6], int(a[7])
        elif name == "convert" and a[8] == b"1":
            value, version = a[9], int(a[10])
        else:
            return
        r = self.model.res.get(keys[2])
        stored = r is not None and r.vb == value and r.vv == version
        self.on_write(self, keys[2], value, version, stored)

    def unprocessed(self, keys: list) -> str | None:
        """G8, "queues processed on every instance": after a call, no conversion of the
        resources it touched is compatible with every granted and converting lock, and no
        first waiter is (while no conversion waits). Expired locks still count: the model
        purges a resource only when a call touches it, and then processes it."""
        m = self.model
        for key in keys[2:]:
            r = m.res.get(key)
            if r is None:
                continue
            for lk in r.c:
                if lk.flags & Flag.QUECVT and r.c[0] is not lk:
                    continue
                if m._compatible_with_granted(r, lk, lk.rq):
                    return f"conversion {lk.id} to {Mode(lk.rq).name} left waiting on {key!r}"
            if not r.c and r.w and m._compatible_with_granted(r, r.w[0], r.w[0].rq):
                return f"first waiter {r.w[0].id} {Mode(r.w[0].rq).name} left on {key!r}"
        return None

    def _dispatch(self, m: Model, name: str, keys: list, a: list, now: int) -> Any:
        if name == "request":
            pid = a[8].decode()
            rep = m.request(keys[2], a[9], a[2].decode(), a[3].decode(), int(a[4]), int(a[5]),
                            int(a[6]), int(a[7]), now, int(a[0]),
                            keys[3] if pid else b"", pid, int(a[10]) if len(a) > 10 else 0)
        elif name == "convert":
            rep = m.convert(keys[2], a[2].decode(), a[3].decode(), int(a[4]), int(a[5]),
                            int(a[6]), int(a[7]), now, int(a[0]),
                            a[9] if a[8] == b"1" else None, int(a[10]), int(a[11]),
                            int(a[12]), int(a[13]))
        elif name == "release":
            rep = m.release(keys[2], a[2].decode(), a[3].decode(), int(a[4]), now, int(a[0]),
                            keys[3] if len(keys) > 3 else keys[2], tuple(keys[4:]),
                            a[6] if a[5] == b"1" else None,
                            int(a[7]), int(a[8]), int(a[9]))
        elif name == "cancel":
            rep = m.cancel(keys[2], a[2].decode(), a[3].decode(), now, int(a[0]),
                           a[4].decode(), a[5] == b"1", keys[3])
        elif name == "yield":
            rep = m.yield_(keys[2], a[2].decode(), a[3].decode(), now, int(a[0]))
        elif name == "renew":
            items = [(a[k].decode(), int(a[k + 1])) for k in range(4, len(a), 2)]
            reps = m.renew(list(keys[2:]), a[2].decode(), int(a[3]), items, now, int(a[0]))
            out: list = [self._epoch()]
            for r in reps:
                out += [int(r.status), -1 if r.gr is None else int(r.gr), r.token, r.pos,
                        r.wait_ms]
            return out
        elif name == "break":  # (tests/sim/jobs.py: an operator's `dlm break`)
            rep = m.break_(keys[2], a[2].decode(), a[3].decode(), now, int(a[0]),
                           tuple(keys[3:]))
            out = _lock_reply(rep, self._epoch())
            for key, rname, lid, owner, gr, rq, qn in rep.broken:
                out += [key, rname, lid.encode(), owner.encode(), -1 if gr is None else int(gr),
                        -1 if rq is None else int(rq), qn.encode()]
            return out
        elif name == "scan":  # lua/scan.lua without its memo (no stamps: every key '+')
            return self._scan(m, keys[1:], now)
        elif name == "waiters":  # the detector's read of the waiter index (D1)
            return [now, *[b"%s|%s" % (lid.encode(), key)
                           for (lid, key), exp in sorted(m.windex.items()) if exp > now]]
        elif name == "init" and a[0] == b"hello":
            safe = m.epoch_safe
            return [self._epoch(), now, 0 if safe is None else max(0, safe - now), None,
                    b"run%d.%d" % (self.idx, self.gen), b"noeviction"]
        else:
            raise ValueError(f"the simulator does not model {name} {a[:1]!r}")
        return _lock_reply(rep, self._epoch())

    @staticmethod
    def _scan(m: Model, keys: list, now: int) -> list:
        """The reply of lua/scan.lua (layout there) for `keys`, from the model: live locks
        only, read-only (nothing purged), each present key sent in full ('+')."""
        status, heads, body = bytearray(), [], []
        for key in keys:
            r = m.res.get(key)
            if r is None:
                status += b"-"
                continue
            status += b"+"
            live = 0
            for qn, q in ((b"G", r.g), (b"C", r.c), (b"W", r.w)):
                for lk in q:
                    if lk.exp > now:
                        live += 1
                        body += [qn, lk.id.encode(), lk.owner.encode(),
                                 -1 if lk.gr is None else int(lk.gr),
                                 -1 if lk.rq is None else int(lk.rq), lk.flags, lk.ticket,
                                 lk.cticket, lk.exp, lk.parent.encode(), lk.priority]
            heads += [b"s", live, r.name or b""]
        return [now, bytes(status), *heads, *body]

    def live_locks(self, t: float) -> list[tuple[bytes, str, str]]:
        """(key, lock id, owner) of every lock whose lease has not ended at `t`."""
        now = self.clock_ms(t)
        return [(key, lk.id, lk.owner) for key, r in sorted(self.model.res.items())
                for q in (r.g, r.c, r.w) for lk in q if lk.exp > now]
