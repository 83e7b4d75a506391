"""`Engine`: the lock database of ONE Redis instance, called synchronously.

A thin layer: it builds ARGV with `codec`, calls the Lua script (FCALL, loading the library
when the instance lacks it) and parses the reply. The rules live in the scripts (`lua/`); the
quorum client (`redlockdlm.client`) sends the same scripts to every instance. Useful on its
own for tests, tools and single-instance development.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import InvalidArgument, InvalidType, MissingKeys
from ..wire import Round, script_reply
from . import codec
from .codec import BreakReply, InstanceStatus, LockReply, RenewEntry, ResourceView
from .keys import (
    EPOCH_KEY,
    SLOTS,
    channel_prefix,
    check_name,
    check_namespace,
    display_name,
    epoch_key,
    key_slot,
    parent_key,
    resource_key,
    slot_channel_prefix,
    slot_waiters_key,
    waiters_key,
)
from .modes import Flag
from .scripts import command, ensure_loaded, packed_command

#: Reads of a subtree a break makes before giving up when children keep being added (H4).
BREAK_TRIES = 5


def call_script(client: redis.Redis, name: str, keys: Sequence[bytes], args: Sequence[bytes],
                link: _Link | None = None):
    """Run script `name` (FCALL); if the instance lacks the library (it restarted empty),
    load it and call again, or, if it may not be loaded, EVAL the source. Map DLM_ errors.
    (The contract every caller follows: `redlockdlm.engine.scripts`.) `link`: the Engine's
    lean path to `client`'s pool for the first attempt (`_Link`)."""
    if type(keys) is not list:
        keys = list(keys)
    if type(args) is not list:
        args = list(args)
    if link is not None:
        send = functools.partial(link.execute, packed_command(name, keys, args))
    else:
        send = functools.partial(client.execute_command, *command(name, keys, args))
    return _settle(name, keys, args, send, functools.partial(_pipelined, client))


def _settle(name: str, keys: list, args: list, send: Callable[[], Any],
            again: Callable[[Sequence[tuple]], list]) -> Any:
    """The reply of script call `name` whose first attempt `send` makes (an error reply
    as a value), settled by `wire.Round` with `again` sending what it needs (FUNCTION
    LOAD, the call again, EVAL), DLM_ errors mapped: the tail both call paths share."""
    try:
        first = send()
    except ResponseError as exc:
        first = exc
    return script_reply(Round([(name, keys, args)]).drive([first], again)[0])


def call_cluster_script(client: redis.RedisCluster, name: str, keys: Sequence[bytes],
                        args: Sequence[bytes]):
    """`call_script` on a Redis Cluster member (H2c): the FCALL goes through redis-py's
    cluster client, which routes it to the primary of its keys' hash slot (all the keys of
    one call are of one slot) and follows MOVED and ASK redirections. A node that lacks the
    library (a primary restarted empty, a replica promoted before the library reached it)
    gets it: FUNCTION LOAD goes to every primary (idempotent; the node an ASK redirection
    names may not be the slot's owner in the client's map), then the call is sent again."""
    keys, args = list(keys), list(args)
    return _settle(name, keys, args,
                   functools.partial(client.execute_command, *command(name, keys, args)),
                   functools.partial(_cluster_each, client))


def _cluster_each(client: redis.RedisCluster, cmds: Sequence[tuple]) -> list:
    """The replies of `cmds` sent one by one through the cluster client, error replies as
    values; FUNCTION LOAD to every primary (the first error reply, if any, as its value)."""
    out: list = []
    for cmd in cmds:
        try:
            if cmd[0] == "FUNCTION":
                client.execute_command(*cmd, target_nodes=redis.RedisCluster.PRIMARIES)
                out.append(b"OK")
            else:
                out.append(client.execute_command(*cmd))
        except ResponseError as exc:
            out.append(exc)
    return out


#: error replies of a call sent to a node that no longer serves its slot (or not yet, or
#: not now): sent again through the cluster client, which follows the cluster's map
_REROUTE = (redis.exceptions.MovedError, redis.exceptions.AskError,
            redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)


def _pipelined(client: redis.Redis, cmds: Sequence[tuple]) -> list:
    """The replies of `cmds` sent in one pipeline, error replies as values (a network
    error raises)."""
    pipe = client.pipeline(transaction=False)
    for cmd in cmds:
        pipe.execute_command(*cmd)
    return pipe.execute(raise_on_error=False)


def _attempt(conn, packed: bytes):
    conn.send_packed_command((packed,))  # (connects; the health check if configured)
    return conn.read_response()  # an error reply is raised, the reply read whole


class _Link:
    """The Engine's way to its client's connection pool, without `execute_command`.

    redis-py spends ~100 k instructions per command around the round trip itself (the pool's
    check-out and release, metrics hooks, the retry wrapper's closures, packing through a
    generic serializer): as much again as a trivial call costs in all. A `_Link` keeps ONE
    connection of the client's pool checked out between calls (`spare`: a list, whose pop
    and append are atomic, so threads sharing an Engine never share a connection; a second
    thread simply checks out another one from the pool, as `execute_command` would) and
    sends pre-packed commands (`scripts.packed_command`) on it. What the pool and
    `execute_command` guarantee is kept: before each use the connection is checked as the
    pool checks a connection it hands out (`can_read`: no stale data, not closed by the
    server; else it reconnects), the connection's `retry` policy runs the attempt (a network
    error disconnects and retries as configured), an error reply leaves the connection in
    use, any other failure returns it to the pool (which drops what should reconnect), and a
    forked child never uses its parent's spare. The spare goes back to the pool when the
    Engine is garbage-collected or `Engine.close()` is called. Only for a plain pooled
    RESP2 `redis.Redis` without client-side caching (`usable`); anything else goes through
    `execute_command`."""

    __slots__ = ("pool", "spare", "__weakref__")

    def __init__(self, pool) -> None:
        self.pool = pool
        self.spare: list = []
        _LINKS.add(self)

    @staticmethod
    def usable(client: object) -> bool:
        if type(client) is not redis.Redis or client.connection is not None:
            return False
        pool = client.connection_pool
        if type(pool) is not redis.ConnectionPool or pool.cache is not None:
            return False
        return pool.connection_kwargs.get("protocol") in (None, 2, "2")

    def execute(self, packed: bytes):
        spare = self.spare
        try:
            conn = spare.pop()
        except IndexError:
            conn = self.pool.get_connection()  # checked by the pool itself
        else:
            try:
                if conn.can_read():  # as ConnectionPool.get_connection: stale data
                    conn.disconnect()  # (send_packed_command connects again)
            except (RedisConnectionError, RedisTimeoutError, OSError):  # closed by the server
                conn.disconnect()
        keep = False
        try:
            reply = conn.retry.call_with_retry(
                lambda: _attempt(conn, packed),
                lambda error, failures: conn.disconnect(), with_failure_count=True)
            keep = True
            return reply
        except ResponseError:
            keep = True
            raise
        finally:
            if keep and not spare and not conn.should_reconnect():
                spare.append(conn)
            else:
                self.pool.release(conn)

    def close(self) -> None:
        while self.spare:
            try:
                self.pool.release(self.spare.pop())
            except IndexError:  # another thread took it
                break


_LINKS: weakref.WeakSet[_Link] = weakref.WeakSet()


def _forget_spares() -> None:  # in a forked child: the parent's sockets are not ours
    for link in list(_LINKS):
        link.spare = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spares)


def _renew_items(items: object) -> list:
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, (tuple, list)) and len(i) == 3 for i in items):
        raise InvalidType("renew items must be (key, lock id, floor) tuples")
    return list(items)


def _keys(keys: object) -> list[bytes]:
    """Resource keys as given (bytes, from `Engine.key`); anything else is InvalidType."""
    if type(keys) is list:  # the common case, checked without a copy
        for k in keys:
            if type(k) is not bytes:
                break
        else:
            return keys
    if isinstance(keys, (bytes, str)) or not hasattr(keys, "__iter__"):
        raise InvalidType(f"keys must be a sequence of bytes, not {type(keys).__name__}")
    keys = list(keys)
    for k in keys:
        if not isinstance(k, bytes):
            raise InvalidType(f"a resource key must be bytes (Engine.key), not {type(k).__name__}")
    return keys


@dataclass(frozen=True)
class Shard:
    """One primary of a Redis Cluster member (`Engine.shards`, `dlm status`)."""

    node: str  #: host:port
    slots: tuple[tuple[int, int], ...]  #: the slot ranges it serves, first..last
    keys: int  #: DBSIZE: every key it holds (resources, tombstones, epochs, indexes)
    waiters: int  #: entries of its slots' waiter indexes of this namespace
    #: `Engine.hello` of its first slot, answered by this primary: its run_id and eviction
    #: policy, and that slot's epoch and recovery (E1, E2 are per slot; a primary
    #: restarted empty lost the epochs of all its slots at once)
    status: InstanceStatus | None = None


class Engine:
    """One instance's lock database. Keys are built with `key()`; every call is one round
    trip and atomic on the instance: it either applies whole or raises and changes nothing.

    The instance is a standalone server (`client` a `redis.Redis`) or a Redis Cluster
    (`client` a `redis.RedisCluster`, rule H2c). On a cluster every hash slot has its own
    epoch hash, waiter index and event channels (`keys.epoch_key(slot)`, ...): a call on a
    resource uses those of the resource's slot (`slot_of`), so an epoch, a recovery window
    (E1) and a restart with data (E2) are per slot there. The calls about the epoch take a
    `slot` (None on a standalone server); `init_fresh`, `raise_rejoin` and `set_clock`
    without one apply to every slot of a cluster."""

    def __init__(self, client: redis.Redis | redis.RedisCluster, namespace: str = "default",
                 *, rejoin_ms: int = 30_000, vbmax: int = 64) -> None:
        self.client = client
        self.ns = check_namespace(namespace)
        self.rejoin_ms = rejoin_ms
        self.vbmax = vbmax
        self.chan = channel_prefix(self.ns)
        self.wkey = waiters_key(self.ns)
        #: True when the instance is a Redis Cluster (H2c)
        self.cluster = isinstance(client, redis.RedisCluster)
        self._slot_names: dict[int, tuple[bytes, bytes, bytes]] = {}
        self._link = _Link(client.connection_pool) if _Link.usable(client) else None
        if self._link is not None:
            weakref.finalize(self, _Link.close, self._link)

    def slot_of(self, key: bytes) -> int | None:
        """The hash slot whose epoch governs resource `key`: None on a standalone server."""
        return key_slot(key) if self.cluster else None

    def _names(self, key: bytes) -> tuple[bytes, bytes, bytes]:
        """(epoch key, waiter index, channel prefix) for a call on resource `key` (H2c)."""
        if not self.cluster:
            return EPOCH_KEY, self.wkey, self.chan
        slot = key_slot(key)
        names = self._slot_names.get(slot)
        if names is None:
            names = self._slot_names[slot] = (epoch_key(slot), slot_waiters_key(self.ns, slot),
                                              slot_channel_prefix(self.ns, slot))
        return names

    def _chan(self, key: bytes) -> bytes:
        return self._names(key)[2] if self.cluster else self.chan

    def _script(self, name: str, keys: list[bytes], args: Sequence[bytes]):
        if self.cluster:
            return call_cluster_script(self.client, name, keys, args)
        return call_script(self.client, name, keys, args)

    def _epoch_slot(self, slot: int | None) -> bytes:
        """The epoch key of `slot`: H2c needs one on a cluster, and none elsewhere."""
        if not self.cluster:
            if slot is not None:
                raise InvalidArgument("a standalone instance has one epoch: slot must be None")
            return EPOCH_KEY
        if type(slot) is not int:
            raise InvalidArgument("a Redis Cluster member has one epoch per hash slot: pass "
                                  "slot= (Engine.slot_of(key))")
        return epoch_key(slot)

    def close(self) -> None:
        """Give the connection this Engine keeps between calls back to the client's pool
        (also done when the Engine is garbage-collected). The Engine stays usable."""
        if self._link is not None:
            self._link.close()

    def key(self, *path: str | bytes) -> bytes:
        """The key of resource `path` (root first)."""
        return resource_key(self.ns, [check_name(p) for p in path])

    @staticmethod
    def name(*path: str | bytes) -> bytes:
        return display_name([check_name(p) for p in path])

    def _call(self, script: str, keys: Sequence[bytes], args: Sequence[bytes]):
        keys = _keys(keys)
        if self.cluster:
            ep, wk, _ = self._names(keys[0])
            return call_cluster_script(self.client, script, [ep, wk, *keys], args)
        return call_script(self.client, script, [EPOCH_KEY, self.wkey, *keys], args,
                           self._link)

    def request(self, key: bytes, owner: str, lock_id: str, mode: object, *, ticket: int,
                lease_ms: int, flags: int = 0, name: bytes = b"", parent_key: bytes | None = None,
                parent_id: str = "", priority: int = 0) -> LockReply:
        m = codec.as_mode(mode)
        raw = self._call("request", [key, parent_key] if parent_key else [key], codec.request_args(
            self.rejoin_ms, self._chan(key), owner, lock_id, m, flags, ticket, lease_ms,
            parent_id, name, priority))
        return codec.parse_lock_reply(raw)

    def convert(self, key: bytes, owner: str, lock_id: str, mode: object, *, ticket: int,
                lease_ms: int, flags: int = 0, value: bytes | None = None, version: int = 0,
                floor: int = 0, priority: int = 0) -> LockReply:
        m = codec.as_mode(mode)
        raw = self._call("convert", [key], codec.convert_args(
            self.rejoin_ms, self._chan(key), owner, lock_id, m, flags, ticket, lease_ms, value,
            version, self.vbmax, floor, priority))
        return codec.parse_lock_reply(raw)

    def release(self, key: bytes, owner: str, lock_id: str, *, subtree: bool = False,
                parent_key: bytes | None = None, child_keys: Sequence[bytes] = (),
                value: bytes | None = None, version: int = 0, floor: int = 0) -> LockReply:
        flags = Flag.SUBTREE if subtree else 0
        kids = [] if type(child_keys) is tuple and not child_keys else _keys(child_keys)
        keys = [key, parent_key or key, *kids] if parent_key or kids else [key]
        raw = self._call("release", keys, codec.release_args(
            self.rejoin_ms, self._chan(key), owner, lock_id, int(flags), value, version,
            self.vbmax, floor))
        return codec.parse_lock_reply(raw)

    def cancel(self, key: bytes, owner: str, lock_id: str, *, parent_key: bytes | None = None,
               reason: str = "cancel", notify: bool = False) -> LockReply:
        raw = self._call("cancel", [key, parent_key or key], codec.cancel_args(
            self.rejoin_ms, self._chan(key), owner, lock_id, reason, notify))
        return codec.parse_lock_reply(raw)

    def yield_(self, key: bytes, owner: str, lock_id: str) -> LockReply:
        raw = self._call("yield", [key], codec.yield_args(self.rejoin_ms, self._chan(key),
                                                          owner, lock_id))
        return codec.parse_lock_reply(raw)

    def renew(self, owner: str, lease_ms: int,
              items: Sequence[tuple[bytes, str, int]]) -> tuple[str, list[RenewEntry]]:
        """Renew (key, lock id, fencing floor) items of one owner in one call: one atomic
        script call, answering the epoch it ran under and one entry per item, in order. On
        a Redis Cluster member the items must all be of one hash slot (one epoch; else
        InvalidArgument, nothing renewed): `renew_slots` splits them."""
        items = _renew_items(items)
        if self.cluster and len({key_slot(k) for k, _, _ in items}) > 1:
            raise InvalidArgument("on a Redis Cluster member one renew call covers the locks "
                                  "of one hash slot: use renew_slots")
        return self._renew(owner, lease_ms, items)

    def _renew(self, owner: str, lease_ms: int, items: list) -> tuple[str, list[RenewEntry]]:
        keys = [k for k, _, _ in items]
        raw = self._call("renew", keys, codec.renew_args(
            self.rejoin_ms, self._chan(keys[0]) if keys else self.chan, owner, lease_ms,
            [(i, f) for _, i, f in items]))
        return codec.parse_renew_reply(raw)

    def renew_slots(self, owner: str, lease_ms: int, items: Sequence[tuple[bytes, str, int]]
                    ) -> dict[int | None, tuple[str, list[tuple[int, RenewEntry]]]]:
        """Renew (key, lock id, fencing floor) items of one owner, one atomic call per hash
        slot (H2c): {slot: (that slot's epoch, [(index of the item in `items`, its entry),
        ...])}. A standalone server answers one call, under slot None. A call that fails
        raises (the calls of the slots before it have applied: renewing is idempotent, so
        the caller may simply renew them all again)."""
        items = _renew_items(items)
        groups: dict[int | None, list[int]] = {}
        for n, (k, _, _) in enumerate(items):
            groups.setdefault(self.slot_of(k) if type(k) is bytes else None, []).append(n)
        out: dict[int | None, tuple[str, list[tuple[int, RenewEntry]]]] = {}
        for slot, idx in groups.items():
            epoch, entries = self._renew(owner, lease_ms, [items[n] for n in idx])
            out[slot] = (epoch, list(zip(idx, entries)))
        return out

    def break_(self, key: bytes, *, lock_id: str = "", owner: str = "") -> BreakReply:
        """An operator's break on this instance (H4): the lock `lock_id`, or every lock of
        `owner`, on `key`, each with its whole subtree (children first, depth first), in one
        atomic script call. Every owner gets ``C|id|broken`` for each of its locks that went;
        the reply lists them. The subtree's keys are read first (inspect); a child added
        meanwhile makes the script refuse (DLM_KEYS, nothing broken) and the keys are read
        again, up to BREAK_TRIES times."""
        if not lock_id and not owner:
            raise InvalidArgument("break needs a lock id or an owner")
        (key,) = _keys([key])
        args = codec.break_args(self.rejoin_ms, self._chan(key), lock_id, owner)
        for attempt in range(BREAK_TRIES):
            keys = self.break_keys(key, lock_id=lock_id, owner=owner)
            try:
                return codec.parse_break_reply(self._call("break", keys, args))
            except MissingKeys:
                if attempt == BREAK_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def break_keys(self, key: bytes, *, lock_id: str = "", owner: str = "") -> list[bytes]:
        """The keys a break of (`lock_id` or `owner`) on `key` declares: `key`, the parent
        resource of each matching lock (to unlink it there), and every descendant resource
        of each matching lock (H3), read by inspect level by level."""
        out, seen = [key], {key}
        _, (view,) = self.inspect([key])
        level = [lk for lk in (view.locks if view is not None else ())
                 if (lock_id and lk.lock_id == lock_id) or (owner and lk.owner == owner)]
        pk = parent_key(key)
        if pk is not None and any(lk.parent for lk in level):
            out.append(pk)
            seen.add(pk)
        while level:
            wanted: dict[bytes, set[str]] = {}
            for lk in level:
                for ckey, cid in lk.kids:
                    wanted.setdefault(ckey, set()).add(cid)
                    if ckey not in seen:
                        seen.add(ckey)
                        out.append(ckey)
            if not wanted:
                break
            ckeys = list(wanted)
            _, views = self.inspect(ckeys)
            level = [lk for ckey, v in zip(ckeys, views) if v is not None
                     for lk in v.locks if lk.lock_id in wanted[ckey]]
        return out

    def inspect(self, keys: Sequence[bytes]) -> tuple[InstanceStatus, list[ResourceView | None]]:
        """A read-only view of each resource in `keys` (None: absent), in order, and the
        status of the instance (on a Redis Cluster member: of the first key's slot, each
        slot's keys read in one call)."""
        keys = _keys(keys)
        if not self.cluster:
            raw = call_script(self.client, "inspect", [EPOCH_KEY, *keys], [])
            return codec.parse_inspect(keys, raw)
        groups: dict[int, list[int]] = {}
        for n, k in enumerate(keys):
            groups.setdefault(key_slot(k), []).append(n)
        views: list[ResourceView | None] = [None] * len(keys)
        first: InstanceStatus | None = None
        for slot, idx in groups.items():
            part = [keys[n] for n in idx]
            st, got = codec.parse_inspect(part, call_cluster_script(
                self.client, "inspect", [epoch_key(slot), *part], []))
            first = first or st
            for n, v in zip(idx, got):
                views[n] = v
        if first is None:  # no keys: the status of slot 0
            first = self.status(0)
        return first, views

    def status(self, slot: int | None = None) -> InstanceStatus:
        """The epoch, clock and recovery of the instance (E1), or of hash `slot` of a Redis
        Cluster member (required there)."""
        return codec.parse_status(self._script("init", [self._epoch_slot(slot)], [b"status"]))

    def init_fresh(self, rejoin_ms: int | None = None, *, force: bool = False,
                   slot: int | None = None) -> InstanceStatus:
        """Mark a brand-new instance safe at once (E1). Never on one that may have restarted.

        Idempotent on an instance already marked fresh. An instance whose epoch was created
        by use (it started empty and a lock script ran: it is recovering, or was) raises
        NotFresh and is left as it was, unless `force`: then it is marked safe at once,
        keeping its epoch id. `rejoin_ms`: also store that rejoin wait (raised only, as
        `raise_rejoin`). On a Redis Cluster member every hash slot has its epoch: `slot`
        marks one, None every slot (16384 calls, pipelined per primary; a slot that is
        not fresh raises NotFresh after the others were marked; the status of slot 0)."""
        args = [b"fresh", b"" if rejoin_ms is None else str(int(rejoin_ms)).encode()]
        if force:
            args.append(b"force")
        return self._init(args, slot)

    def _init(self, args: list[bytes], slot: int | None) -> InstanceStatus:
        """`init` with `args` on the instance, on one slot, or (cluster, slot None) on every
        slot: then the status of slot 0; a refusal (DLM_*) on some slots is raised for the
        first of them after all the others were sent."""
        if not self.cluster or slot is not None:
            return codec.parse_status(self._script("init", [self._epoch_slot(slot)], args))
        return codec.parse_status(self._init_all_slots(args)[0])

    def _init_all_slots(self, args: list[bytes], chunk: int = 2048) -> list:
        """`init` with `args` on every hash slot of a cluster member, pipelined per primary
        (CLUSTER SLOTS as the client knows it; the library loaded on each primary first):
        the raw replies by slot; the first error reply raised (typed for DLM_*)."""
        client = self.client
        owners: dict[str, tuple[object, list[int]]] = {}
        for slot in range(SLOTS):
            node = client.nodes_manager.get_node_from_slot(slot)
            owners.setdefault(node.name, (node, []))[1].append(slot)
        replies: list = [None] * SLOTS
        for node, slots in owners.values():
            conn = client.get_redis_connection(node)
            ensure_loaded(conn)
            for i in range(0, len(slots), chunk):
                part = slots[i:i + chunk]
                got = _pipelined(conn, [command("init", [epoch_key(s)], args) for s in part])
                for s, raw in zip(part, got):
                    replies[s] = raw
        for raw in replies:
            if isinstance(raw, BaseException):
                script_reply(raw)  # (raises it)
        return replies

    def hello(self, slot: int | None = None) -> InstanceStatus:
        """The status with the server's run_id and maxmemory-policy (a client's first
        contact); on a Redis Cluster member of hash `slot` (required there: the node that
        serves it answers)."""
        return codec.parse_status(self._script("init", [self._epoch_slot(slot)], [b"hello"]))

    def raise_rejoin(self, rejoin_ms: int, slot: int | None = None) -> InstanceStatus:
        """E1: raise the instance's rejoin wait to `rejoin_ms` (never lowers it; stored
        even before the instance has an epoch, which is then created with it). On a Redis
        Cluster member: of hash `slot`, or of every slot (None; the status of slot 0)."""
        return self._init([b"rejoin", str(int(rejoin_ms)).encode()], slot)

    def set_clock(self, frozen_ms: int | None = None, offset_ms: int = 0,
                  slot: int | None = None) -> InstanceStatus:
        """Tests only: freeze the scripts' clock at `frozen_ms`, or shift it by `offset_ms`
        (on a Redis Cluster member: of hash `slot`, or of every slot when None)."""
        fix = b"" if frozen_ms is None else str(int(frozen_ms)).encode()
        return self._init([b"clock", fix, str(int(offset_ms)).encode()], slot)

    def _waiter_indexes(self) -> Iterator[tuple[redis.Redis, list[bytes]]]:
        """Where the waiter index lives: (client, [its keys]); on a Redis Cluster member,
        per primary, the per-slot indexes found by SCAN (type zset) on that primary."""
        if not self.cluster:
            yield self.client, [self.wkey]
            return
        match = self.wkey + b":{*"
        yield from self._per_primary(
            lambda conn: list(conn.scan_iter(match=match, count=1000, _type="zset")))

    def _per_primary(self, read: Callable[[redis.Redis], list[bytes]]
                     ) -> list[tuple[redis.Redis, list[bytes]]]:
        """(connection, what `read` found there) for every primary of this Redis Cluster
        member that found something. A primary that does not answer may have failed over
        since the cluster client read the topology (the connections are the primaries'
        own, so redis-py does not notice): the topology is read again and the walk starts
        over, once; a second failure is raised."""
        for attempt in (0, 1):
            try:
                out = []
                for node in self.client.get_primaries():
                    conn = self.client.get_redis_connection(node)
                    found = read(conn)
                    if found:
                        out.append((conn, found))
                return out
            except (RedisConnectionError, RedisTimeoutError):
                if attempt:
                    raise
                self.client.nodes_manager.initialize()
        raise AssertionError("unreachable")

    def _clocked_indexes(self) -> Iterator[tuple[redis.Redis, list[bytes], int]]:
        """`_waiter_indexes` with the clock (ms) each part is to be read by: the index is
        scored by lease expiry on the clock of the server that holds it. A standalone
        server: its clock (`status().now_ms`, asked even when the index is empty). A Redis
        Cluster member: every primary is a server of its own, with its own clock: the
        clock of the slot of the first index found on it (`status(slot)`, answered by that
        primary; its scripts read that same TIME for every slot it serves, a test clock
        set on every slot alike included)."""
        if not self.cluster:
            yield self.client, [self.wkey], self.status().now_ms
            return
        for conn, keys in self._waiter_indexes():
            yield conn, keys, self.status(key_slot(keys[0])).now_ms

    @staticmethod
    def _each(conn: redis.Redis, keys: list[bytes], method: str, *args, **kwargs) -> list:
        pipe = conn.pipeline(transaction=False)
        for k in keys:
            getattr(pipe, method)(k, *args, **kwargs)
        return [x for part in pipe.execute() for x in part]

    def waiters(self) -> list[tuple[bytes, float]]:
        """The waiter index: (member 'lock id|resource key', lease expiry ms); on a Redis
        Cluster member the union of every slot's index."""
        return [x for conn, keys in self._waiter_indexes()
                for x in self._each(conn, keys, "zrange", 0, -1, withscores=True)]

    def live_waiters(self, now_ms: int) -> list[bytes]:
        """The members of the waiter index whose lease expires after `now_ms` (this
        instance's clock, `status().now_ms`): its live entries (docs/detector.md D1).
        Members only: their scores would cost more to convert than the whole read. (On a
        Redis Cluster member every shard has its own clock: `live_waiters_now`.)"""
        if not self.cluster:
            return self.client.zrangebyscore(self.wkey, f"({now_ms}", "+inf")
        return [x for conn, keys in self._waiter_indexes()
                for x in self._each(conn, keys, "zrangebyscore", f"({now_ms}", "+inf")]

    def live_waiters_now(self) -> tuple[int, list[bytes]]:
        """D1: the live entries of the waiter index, each judged by the clock of the server
        that holds it (`_clocked_indexes`), and a clock of the instance (ms): a standalone
        server's, or on a Redis Cluster member the earliest of its primaries' clocks read
        (slot 0's when no primary has an index)."""
        out: list[bytes] = []
        clocks = []
        for conn, keys, now in self._clocked_indexes():
            clocks.append(now)
            out.extend(self._each(conn, keys, "zrangebyscore", f"({now}", "+inf"))
        return (min(clocks) if clocks else self.status(0).now_ms), out

    def stale_waiters(self, until_ms: int, limit: int) -> list[tuple[bytes, float]]:
        """Up to `limit` waiter-index entries whose lease expired at or before `until_ms`
        (instance clock): (member, lease expiry ms), oldest first (docs/detector.md D9).
        (On a Redis Cluster member every shard has its own clock: `expired_waiters`.)"""
        if not self.cluster:
            return self.client.zrangebyscore(self.wkey, "-inf", until_ms, withscores=True,
                                             start=0, num=limit)
        found = [x for conn, keys in self._waiter_indexes()
                 for x in self._each(conn, keys, "zrangebyscore", "-inf", until_ms,
                                     withscores=True, start=0, num=limit)]
        return sorted(found, key=lambda x: x[1])[:limit]

    def expired_waiters(self, grace_ms: int, limit: int) -> list[tuple[bytes, float]]:
        """D9: up to `limit` waiter-index entries whose lease ran out more than `grace_ms`
        ago on the clock of the server that holds them (`_clocked_indexes`: each shard's
        own on a Redis Cluster member): (member, lease expiry ms), oldest first."""
        found = [x for conn, keys, now in self._clocked_indexes()
                 for x in self._each(conn, keys, "zrangebyscore", "-inf", now - grace_ms,
                                     withscores=True, start=0, num=limit)]
        return sorted(found, key=lambda x: x[1])[:limit]

    def drop_waiter(self, member: bytes, score: float) -> bool:
        """Remove one waiter-index entry, only if nobody re-added it meanwhile (still the
        same score; WATCH/MULTI). Whether it was removed. (On a Redis Cluster member the
        index of the slot of the resource key the member names.)"""
        client, wkey = self.client, self.wkey
        if self.cluster:
            _, _, rkey = member.partition(b"|")
            slot = key_slot(rkey)
            wkey = slot_waiters_key(self.ns, slot)
            client = client.get_redis_connection(client.nodes_manager.get_node_from_slot(slot))
        with client.pipeline(transaction=True) as p:
            try:
                p.watch(wkey)
                if p.zscore(wkey, member) != score:
                    return False
                p.multi()
                p.zrem(wkey, member)
                return bool(p.execute()[0])
            except redis.WatchError:
                return False  # the index changed under us: try again next time

    def scan_resources(self, chunks: Sequence[Sequence[bytes]], stamps: Sequence[Sequence[bytes]]
                       ) -> Iterator[list]:
        """The raw replies of `lua/scan.lua` (read-only; layout in that file, parsed by
        `redlockdlm.detector.scanning`), one per chunk of resource keys, each call sent
        with its chunk's stamps (what the caller decoded earlier; none: decode all). All
        the calls go in one pipeline (one round trip; each runs alone on the instance),
        sent when the first reply is asked for; calls that met a missing library are sent
        again after loading it (`wire.Round`, as `call_script`). An error reply is raised
        when its reply is asked for (`DLM_*` typed). On a Redis Cluster member every chunk
        must be of one hash slot (InvalidArgument) and each call goes alone, routed to the
        slot's primary."""
        if self.cluster:
            yield from self._scan_cluster(chunks, stamps)
            return
        calls = [("scan", [EPOCH_KEY, *chunk], list(args)) for chunk, args in zip(chunks, stamps)]
        rnd = Round(calls)
        pipelined = functools.partial(_pipelined, self.client)
        for raw in rnd.drive(pipelined([command(*c) for c in calls]), pipelined):
            yield script_reply(raw)

    def _scan_cluster(self, chunks: Sequence[Sequence[bytes]],
                      stamps: Sequence[Sequence[bytes]]) -> Iterator[list]:
        calls = []
        for chunk, args in zip(chunks, stamps):
            chunk = _keys(chunk)
            slots = {key_slot(k) for k in chunk}
            if len(slots) != 1:
                raise InvalidArgument("on a Redis Cluster member a scan chunk holds the keys "
                                      "of one hash slot")
            calls.append(([epoch_key(slots.pop()), *chunk], list(args)))
        # One pipeline per primary (the slot map as the client knows it), as on a
        # standalone server; a call that met a slot moved, or a primary that failed,
        # goes again alone through the cluster client (which follows MOVED / ASK).
        client = self.client
        owners: dict[str, tuple[object, list[int]]] = {}
        for n, (keys, _) in enumerate(calls):
            node = client.nodes_manager.get_node_from_slot(key_slot(keys[0]))
            owners.setdefault(node.name, (node, []))[1].append(n)
        raws: list = [None] * len(calls)
        for node, idx in owners.values():
            part = [("scan", calls[n][0], calls[n][1]) for n in idx]
            pipelined = functools.partial(_pipelined, client.get_redis_connection(node))
            try:
                got = Round(part).drive(pipelined([command(*c) for c in part]), pipelined)
            except (redis.ConnectionError, redis.TimeoutError):
                continue  # (each call of it goes alone below)
            for n, raw in zip(idx, got):
                raws[n] = raw
        for (keys, args), raw in zip(calls, raws):
            if raw is None or isinstance(raw, _REROUTE):
                yield call_cluster_script(client, "scan", keys, args)
            else:
                yield script_reply(raw)

    def shards(self) -> list[Shard]:
        """The primaries of a Redis Cluster member as the client sees them (CLUSTER SLOTS):
        address, slot ranges, DBSIZE, this namespace's waiter-index entries (SCAN and
        ZCARD per primary) and the hello of its first slot; [] on a standalone server."""
        if not self.cluster:
            return []
        client = self.client
        ranges: dict[str, list[list[int]]] = {}
        nodes = {}
        for slot in range(SLOTS):
            node = client.nodes_manager.get_node_from_slot(slot)
            nodes[node.name] = node
            rs = ranges.setdefault(node.name, [])
            if rs and rs[-1][1] == slot - 1:
                rs[-1][1] = slot
            else:
                rs.append([slot, slot])
        out = []
        for name, node in nodes.items():
            conn = client.get_redis_connection(node)
            idx = list(conn.scan_iter(match=self.wkey + b":{*", count=1000, _type="zset"))
            pipe = conn.pipeline(transaction=False)
            pipe.dbsize()
            for k in idx:
                pipe.zcard(k)
            got = pipe.execute()
            out.append(Shard(name, tuple((a, b) for a, b in ranges[name]), int(got[0]),
                             sum(int(n) for n in got[1:]), self.hello(ranges[name][0][0])))
        return out

    def resource_keys(self, count: int = 1000) -> list[bytes]:
        """Resource keys of this namespace by SCAN (for operators; never on a hot path;
        every primary of a Redis Cluster member)."""
        return list(self.scan_keys(b"dlm:{" + self.ns + b":*", count))

    def scan_keys(self, match: bytes, count: int = 1000) -> Iterator[bytes]:
        """The keys matching glob `match`, by SCAN (for operators; never on a hot path): of
        the server, or of every primary of a Redis Cluster member."""
        if not self.cluster:
            yield from self.client.scan_iter(match=match, count=count)
            return
        # (a primary that fails over since the topology was read: read again, as the
        # detector's scans do)
        for _, keys in self._per_primary(
                lambda conn: list(conn.scan_iter(match=match, count=count))):
            yield from keys
