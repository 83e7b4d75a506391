"""Connections to the instances: URLs checked, pools built, the session opened.

What the sync client (`redlockdlm.client`), the asyncio client (`redlockdlm.aio`) and the
operator views (`redlockdlm.admin`) share before they differ in how they move bytes: every
mistake in a URL or connection option is a typed error raised before anything connects.
"""

from __future__ import annotations

import functools
import logging
import select
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.driver_info import DriverInfo
from redis.retry import Retry

from .engine import codec
from .engine.keys import key_slot
from .engine.scripts import command
from .errors import DLMError, InvalidArgument, InvalidType, MixedTransport
from .protocol import Call, LockCore, Session, Vote, describe
from .wire import Round, settle

try:  # redis-py's parser with hiredis (the one `direct_io` reads through)
    from redis._parsers.hiredis import _HiredisParser
except ImportError:  # (older redis-py)
    _HiredisParser = None

_log = logging.getLogger("redlockdlm")

#: an idle connection is checked for a close by its peer before reuse once idle this long
CHECK_IDLE_S = 0.05


def _mask(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def url_list(urls: object) -> list[str]:
    """The instance URLs: a list (or tuple) of str, or one comma-separated str."""
    if isinstance(urls, str):
        return [u.strip() for u in urls.split(",") if u.strip()]
    if not isinstance(urls, (list, tuple)):
        raise InvalidType(f"urls must be a list of redis:// URLs or a comma-separated str, "
                          f"not {type(urls).__name__}")
    return list(urls)


def check_url(url: object) -> str:
    """A redis://, rediss:// or unix:// URL with what it needs (a host; a numeric port and
    database; a socket path). InvalidType / InvalidArgument otherwise, nothing connected."""
    if not isinstance(url, str):
        raise InvalidType(f"instance URL must be a str, not {type(url).__name__}")
    bad = f"bad redis URL {_mask(url)!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"{bad}: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise InvalidArgument(f"not a redis URL: {_mask(url)!r} (redis://, rediss:// or "
                              "unix://)")
    if parts.scheme == "unix":
        if not parts.path:
            raise InvalidArgument(f"{bad}: a unix:// URL needs a socket path")
        return url
    if not parts.hostname:
        raise InvalidArgument(f"{bad}: no host (redis://[user:password@]host:port[/db])")
    if port == 0:
        raise InvalidArgument(f"{bad}: port 0")
    if parts.path not in ("", "/") and not parts.path[1:].isdigit():
        raise InvalidArgument(f"{bad}: the database must be a number, not {parts.path[1:]!r}")
    return url


# The longest socket or connect timeout accepted: a day (the OS refuses much larger ones,
# and a connection silent that long is dead).
MAX_TIMEOUT_S = 86_400.0


def check_timeouts(**timeouts: object) -> None:
    for what, t in timeouts.items():
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise InvalidType(f"{what} must be a number of seconds, not {type(t).__name__}")
        if not 0 < t <= MAX_TIMEOUT_S:
            raise InvalidArgument(f"{what} must be > 0 and at most {MAX_TIMEOUT_S} seconds "
                                  f"(a day), got {t}")


@functools.cache
def _driver_info() -> DriverInfo:
    """What every connection announces with `CLIENT SETINFO` (`CLIENT LIST` shows
    `lib-name=redis-py(redlockdlm_v0.1.0)`), built once per process: redis-py's default
    reads its package metadata from disk for every new connection, which made 1,000
    sessions in one process take tens of seconds to connect."""
    from . import __version__

    return DriverInfo(lib_version=redis.__version__).add_upstream_driver(
        "redlockdlm", __version__)


def pool_from_url(pool_class: Any, url: object, **options: Any) -> Any:
    """`pool_class.from_url(url, **options)` with every mistake typed: a malformed URL or
    option value is InvalidArgument, an unknown option InvalidType (checked by building
    one connection object, which does not connect)."""
    url = check_url(url)
    if not {"driver_info", "lib_name", "lib_version"} & options.keys():
        options["driver_info"] = _driver_info()
    try:
        pool = pool_class.from_url(url, **options)
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        raise InvalidType(f"bad connection option for {_mask(url)}: {exc}") from None
    except (ValueError, redis.RedisError) as exc:
        raise InvalidArgument(f"bad redis URL or option {_mask(url)}: {exc}") from None
    return pool


class Pooled:
    """One Redis instance's connections: a pool (of `pool_class`, URL and options checked
    by `pool_from_url`), a `client_class` client on it, and idle connections of our own
    (`get` / `put`: no pool bookkeeping on the hot path). The sync and asyncio clients
    subclass it with their own redis-py classes and `close`."""

    pool_class: Any = redis.ConnectionPool
    client_class: Any = redis.Redis

    def __init__(self, url: str, *, socket_timeout: float, connect_timeout: float,
                 **options: Any) -> None:
        check_timeouts(socket_timeout=socket_timeout, connect_timeout=connect_timeout)
        self.pool = pool_from_url(self.pool_class, url, socket_timeout=socket_timeout,
                                  socket_connect_timeout=connect_timeout, **options)
        self.url = _mask(url)
        self.timeout = socket_timeout
        self.client = self.client_class(connection_pool=self.pool)
        self._idle: list[Any] = []
        #: what `cluster_client` needs to reach the member as a cluster (URL, options)
        self._how = (url, dict(options, socket_timeout=socket_timeout,
                               socket_connect_timeout=connect_timeout))
        #: the member's kind, once found at first contact (`cluster_enabled`): a
        #: `redis.RedisCluster` (or its asyncio twin) for a cluster member, None otherwise
        self.cluster: Any = None
        self.detected = False  #: the kind is known (standalone until found otherwise)

    def get(self) -> Any:
        """A connection of our own; a new one connects on its first command. An idle
        connection that the server (or a proxy, or Redis's own idle `timeout`) closed
        meanwhile, or that has bytes nobody asked for, is dropped rather than used: a
        command written on it would fail, and count as the instance failing. (Checked
        once idle for `CHECK_IDLE_S`: a connection back-to-back requests pass along costs
        no system call.)"""
        while self._idle:
            conn, since = self._idle.pop()
            if time.monotonic() - since < CHECK_IDLE_S or not self.stale(conn):
                return conn
            self.drop(conn)
        conn = self.pool.make_connection()
        conn.dlm_node = None  # (not a cluster primary's: `Routes`)
        conn.dlm_direct = self.direct(conn)
        return conn

    @staticmethod
    def direct(conn: Any) -> bool:
        """True if the client may move `conn`'s bytes itself (`direct_io`); the asyncio
        client's never."""
        return False

    @staticmethod
    def stale(conn: Any) -> bool:
        """True if idle `conn` is readable: closed by its peer, or holding stray bytes."""
        sock = conn._sock
        if sock is None:
            return False
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):  # closed under us
            return True

    @staticmethod
    def drop(conn: Any) -> None:
        conn.disconnect()

    #: a cluster member's own connections to its primaries (`Routes`), else None
    routes: Any = None

    def put(self, conn: Any) -> None:
        if routed(conn):  # (a cluster primary's: back to `Routes`)
            self.routes.put(conn)
        else:
            self._idle.append((conn, time.monotonic()))


#: what a standalone server answers to CLUSTER SLOTS
_NOT_CLUSTER = "cluster support disabled"


def cluster_node_ids(slots: object) -> list[str] | None:
    """The node ids in a `CLUSTER SLOTS` reply (every node serving a slot range, primaries
    and replicas), or None if the reply is the error of a server that is not a cluster
    node. `CLUSTER SLOTS` rather than `INFO cluster`: the least-privilege ACL (`dlm acl`)
    allows it, as redis-py's cluster client needs it anyway. Any other error is raised."""
    if isinstance(slots, redis.ResponseError):
        if _NOT_CLUSTER in str(slots) or isinstance(slots, redis.exceptions.NoPermissionError):
            return None  # (refused by the ACL: used as a standalone server)
        raise slots
    out = []
    for rng in slots:  # type: ignore[attr-defined]
        for node in rng[2:]:
            if len(node) > 2 and node[2]:
                nid = node[2]
                out.append(nid.decode() if isinstance(nid, bytes) else str(nid))
    return out


def cluster_client(cluster_class: Any, how: tuple[str, dict[str, Any]]) -> Any:
    """A `cluster_class` (redis.RedisCluster or redis.asyncio.RedisCluster) for the member
    at URL `how[0]` with the member's options `how[1]`: the node of the URL is where it
    learns the cluster's slots; it routes each call to the slot's primary and follows
    MOVED / ASK and a failover. The same timeouts as a standalone member. InvalidArgument for
    what a cluster refuses (a database other than 0), InvalidType for an unknown option."""
    url, options = how
    options = {k: v for k, v in options.items() if k != "driver_info"}
    # One retry without backoff (redis-py's default backs off over several seconds): the
    # slot map refreshed once after a failed call, which follows a failover that happened;
    # a shard that stays down then fails its call within the timeouts, and the protocol
    # asks again (R3) instead of a call blocking the others.
    if "retry" not in options:
        if cluster_class.__module__.startswith("redis.asyncio"):
            from redis.asyncio.retry import Retry as AsyncRetry

            options["retry"] = AsyncRetry(NoBackoff(), 1)
        else:
            options["retry"] = Retry(NoBackoff(), 1)
    try:
        return cluster_class.from_url(url, **options)
    except TypeError as exc:
        raise InvalidType(f"bad connection option for the cluster at {_mask(url)}: {exc}"
                          ) from None
    except ValueError as exc:
        raise InvalidArgument(f"bad redis URL or option for the cluster at {_mask(url)}: "
                              f"{exc}") from None


#: error replies of a call sent to a node that does not serve its slot (any more, or not
#: yet, or not now): the call did nothing there, and goes again through redis-py's cluster
#: client, which follows the cluster's map (and updates the one `Routes` reads)
REROUTE = (redis.exceptions.MovedError, redis.exceptions.AskError,
           redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)

#: the least time between two refreshes of a cluster member's slot map after a timeout (s)
REFRESH_EVERY_S = 1.0


def routed(conn: Any) -> bool:
    """True for a cluster primary's connection of our own (`Routes.get` tags it)."""
    return getattr(conn, "dlm_node", None) is not None


def reroute(conn: Any, exc: BaseException) -> bool:
    """True if `exc`, raised connecting or writing on `conn` (nothing read yet), means a
    call on a cluster primary's connection of our own (`Routes`) did not reach it and can
    go through the cluster client: the address refused, the connection lost; not a
    timeout (the call's time is spent, and it may have been written)."""
    if not routed(conn) or isinstance(exc, (redis.TimeoutError, TimeoutError)):
        return False
    return isinstance(exc, (redis.ConnectionError, OSError))


class Routes:
    """The fast path to a cluster member: connections of our own to each primary, a call
    written on the connection of its slot's primary as a standalone member's call is
    (`get`, `put`; no thread, no redis-py bookkeeping per call). The slot map is the
    cluster client's (`redis.RedisCluster.nodes_manager`, read from CLUSTER SLOTS and
    updated on every MOVED that client follows), so the fast path learns a moved slot as
    soon as a call rerouted through it (`REROUTE`) has. A slot the map does not cover, or a
    call with no key, has no route (`node` None): it goes through the cluster client."""

    def __init__(self, rc: Any) -> None:
        self.rc = rc
        self._idle: dict[str, list[tuple[Any, float]]] = {}
        self._refreshing = False
        self._refreshed = 0.0

    def node(self, call: Call) -> Any:
        """The primary of `call`'s hash slot as the map says, or None (no route)."""
        keys = call[1]
        if not keys:
            return None
        try:
            return self.rc.nodes_manager.get_node_from_slot(key_slot(keys[0]))
        except (redis.exceptions.SlotNotCoveredError, KeyError):
            return None

    def by_primary(self, calls: Sequence[Call]) -> list[tuple[Any, list[int]]]:
        """The indexes of `calls` grouped by their slot's primary (`node`), each primary
        with its calls in order; a call with no route is in no group."""
        groups: dict[str, tuple[Any, list[int]]] = {}
        for k, c in enumerate(calls):
            node = self.node(c)
            if node is not None:
                groups.setdefault(node.name, (node, []))[1].append(k)
        return list(groups.values())

    def get(self, node: Any) -> Any:
        """A connection of our own to `node` (idle ones checked as `Pooled.get` does); a
        new one, with the member's options, connects on its first command."""
        idle = self._idle.get(node.name)
        while idle:
            try:
                conn, since = idle.pop()
            except IndexError:  # (another thread took the last one)
                break
            if time.monotonic() - since < CHECK_IDLE_S or not Pooled.stale(conn):
                return conn
            conn.disconnect()
        conn = self.rc.get_redis_connection(node).connection_pool.make_connection()
        conn.dlm_node = node.name  # (where `put` brings it back)
        conn.dlm_direct = direct_io(conn)
        return conn

    def put(self, conn: Any) -> None:
        self._idle.setdefault(conn.dlm_node, []).append((conn, time.monotonic()))

    def refresh(self) -> None:
        """Read the cluster's slot map again, on a thread of its own (at most once per
        `REFRESH_EVERY_S`): after a primary timed out, a failover may have moved its slots,
        and nothing else would tell the map (a MOVED needs an answer)."""
        now = time.monotonic()
        if self._refreshing or now - self._refreshed < REFRESH_EVERY_S:
            return
        self._refreshing, self._refreshed = True, now

        def run() -> None:
            try:
                self.rc.nodes_manager.initialize()
            except Exception:  # noqa: BLE001 - the cluster unreachable: the next timeout
                pass
            finally:
                self._refreshing = False

        threading.Thread(target=run, daemon=True, name="redlockdlm-slots").start()

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop()[0].disconnect()


def cluster_round(rc: Any, calls: Sequence[Call], url: str) -> list[Any]:
    """Run `calls` (already in the member's per-slot layout, `Session.member_call`) on the
    cluster `rc` (a blocking redis.RedisCluster), one after another, each routed to its
    slot's primary by redis-py (MOVED, ASK, a failover handled there); the library loaded
    on that primary where it is missing (`wire.Round`). One result per call, as `settle`
    gives it; a failure to reach the shard is that call's result."""
    out = []
    for call in calls:
        try:
            raws = _cluster_call(rc, call)
        except Exception as exc:  # noqa: BLE001 - unreachable, cluster down, not Redis...
            out.append(exc)
            continue
        out.append(settle(call, raws, url))
    return out


async def acluster_round(rc: Any, calls: Sequence[Call], url: str) -> list[Any]:
    """`cluster_round` on a `redis.asyncio.RedisCluster`."""
    out = []
    for call in calls:
        try:
            rnd = Round([call])
            cmds = rnd.feed([await _aone(rc, command(*call), call)])
            while cmds:
                cmds = rnd.feed([await _aone(rc, c, call) for c in cmds])
        except Exception as exc:  # noqa: BLE001 - unreachable, cluster down, not Redis...
            out.append(exc)
            continue
        out.append(settle(call, rnd.raws[0], url))
    return out


async def _aone(rc: Any, cmd: tuple, call: Call) -> Any:
    try:
        if cmd[0] == "FUNCTION":
            return await rc.execute_command(
                *cmd, target_nodes=rc.get_node_from_key(call[1][0]))
        return await rc.execute_command(*cmd)
    except redis.ResponseError as exc:
        return exc


def _cluster_call(rc: Any, call: Call) -> Any:
    rnd = Round([call])
    cmds = rnd.feed([_one(rc, command(*call), call)])
    while cmds:
        cmds = rnd.feed([_one(rc, c, call) for c in cmds])
    return rnd.raws[0]


def _one(rc: Any, cmd: tuple, call: Call) -> Any:
    """One command on the cluster, an error reply as its ResponseError. The library load
    goes to the primary of `call`'s slot (the one that lacks it)."""
    try:
        if cmd[0] == "FUNCTION":
            return rc.execute_command(*cmd, target_nodes=rc.get_node_from_key(call[1][0]))
        return rc.execute_command(*cmd)
    except redis.ResponseError as exc:
        return exc


def direct_io(conn: Any) -> bool:
    """True if the sync client may write commands on redis-py connection `conn` with the
    socket's own `sendall` and read replies straight from its hiredis reader (`client.
    _write`, `client._replies`), doing what `send_packed_command` / `read_response` do
    for it: a plain redis-py connection class (TCP, TLS, unix) parsed by hiredis, no
    health check to run before a command. Anything else goes through redis-py."""
    return (_HiredisParser is not None and type(conn._parser) is _HiredisParser
            and type(conn).read_response is AbstractConnection.read_response
            and type(conn).send_packed_command is AbstractConnection.send_packed_command
            and not conn.health_check_interval)


class Instance(Pooled):
    """One Redis instance: a pool for commands and a pub/sub connection for events."""

    direct = staticmethod(direct_io)

    def __init__(self, url: str, *, socket_timeout: float, connect_timeout: float,
                 **options: Any) -> None:
        super().__init__(url, socket_timeout=socket_timeout, connect_timeout=connect_timeout,
                         **options)
        self.pubsub: redis.client.PubSub | None = None
        #: a cluster member's shard subscriptions (`client._Shards`) and their sockets
        self.shards: Any = None
        self.shard_socks: set[Any] = set()
        self.warned = False  #: a failed subscription was logged as a warning already
        self.sock: Any = None  #: the pub/sub socket registered in the selector
        #: a cluster member's own connections to its primaries (`Routes`)
        self.routes: Routes | None = None

    def detect(self) -> list[str] | None:
        """First contact: find the member's kind (`CLUSTER SLOTS`). A cluster member gets
        its `redis.RedisCluster` (`cluster`); returns its node ids (None: a standalone
        server). Raises what reaching it raised (unreachable, authentication...): tried
        again later."""
        try:
            slots = self.client.execute_command("CLUSTER", "SLOTS")
        except redis.ResponseError as exc:
            slots = exc
        ids = cluster_node_ids(slots)
        if ids is not None:
            rc = cluster_client(redis.RedisCluster, self._how)
            self.routes = Routes(rc)
            self.cluster = rc
        self.detected = True
        return ids

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[0].disconnect()
        if self.routes is not None:
            self.routes.close()
        if self.cluster is not None:
            self.cluster.close()


def check_transports(urls: Sequence[str]) -> None:
    """MixedTransport if TLS (rediss://) and plain TCP (redis://) URLs are mixed: almost
    always a slip (one instance left without TLS, its password and lock traffic sent in
    clear), and nothing needs it (an instance on the same host can use unix://, which mixes
    with either)."""
    tls = [u for u in urls if urlsplit(u).scheme == "rediss"]
    plain = [u for u in urls if urlsplit(u).scheme == "redis"]
    if tls and plain:
        raise MixedTransport(
            f"TLS and plain instance URLs are mixed: TLS (rediss://) {', '.join(map(_mask, tls))}; "
            f"plain (redis://) {', '.join(map(_mask, plain))}: use rediss:// for every "
            "instance (or unix:// for a local one)", instance=_mask(plain[0]))


def open_session(instance_cls: Any, urls: Sequence[str] | str, namespace: str, *,
                 lease_ms: int, socket_timeout: float, connect_timeout: float,
                 rejoin_ms: int | None, vbmax: int, owner: str | None,
                 redis_options: dict[str, Any],
                 allow_eviction: bool = False) -> tuple[Session, list[Any]]:
    """The protocol session and one `instance_cls` per URL: what DLM and AsyncDLM share
    before they differ in how they move bytes."""
    urls = url_list(urls)
    for u in urls:
        check_url(u)
    check_transports(urls)
    if not isinstance(allow_eviction, bool):
        raise InvalidType("allow_eviction must be a bool")
    core = Session(len(urls), namespace, lease_ms=lease_ms, rejoin_ms=rejoin_ms, vbmax=vbmax,
                   owner=owner)
    core.allow_eviction = allow_eviction
    core.distinct_epochs = True
    instances = [instance_cls(u, socket_timeout=socket_timeout,
                              connect_timeout=connect_timeout, **redis_options) for u in urls]
    core.labels = [inst.url for inst in instances]
    return core, instances


def deliver_shard_message(msg: dict[str, Any], deliver: Any) -> None:
    """One message read from a shard channel subscription (both clients): an event of
    ours (`smessage`) goes to `deliver`; a garbled one is logged and dropped; subscription
    confirmations and anything else are ignored."""
    if msg.get("type") == "smessage":
        try:
            ev = codec.parse_event(msg["data"])
        except (ValueError, DLMError) as exc:
            _log.info("garbled event ignored: %s", describe(exc))
            return
        deliver(ev)


#: calls about one lock (its id their 4th argument) that may need its slot subscribed first
EVENT_CALLS = frozenset(("request", "convert", "yield", "cancel"))


def event_slot(core: Session, subscribed: set[int], call: Call) -> int | None:
    """N4, before `call` (in a cluster member's layout) goes to a cluster member whose
    subscribed slots are `subscribed` (both clients): the hash slot whose shard channel
    must be subscribed first, if the call is about a lock that reads events now
    (`Session.reads_events`: an `on_blocking` lock, a waiting one) and its slot is not
    subscribed yet; otherwise None (a lock granted at once never reads an event, and one
    that queues subscribes then: `event_gaps`)."""
    if call.name not in EVENT_CALLS:
        return None
    lk = core.locks.get(call[2][3].decode())
    if lk is None or not core.reads_events(lk):
        return None
    slot = key_slot(call[1][2])
    return None if slot in subscribed else slot


def event_gaps(core: Session, instances: Sequence[Any], lk: LockCore) -> list[int]:
    """N4 (both clients): the cluster members where `lk`, which waits, is queued or granted
    and whose shard channel of its slot is neither subscribed nor tried in this wait
    (`LockCore.listening`): where a `flows.Subscribe` must go before it waits."""
    out = []
    for i, inst in enumerate(instances):
        shards = inst.shards
        if (shards is None or i in lk.listening or i in core.refused
                or lk.votes[i].vote not in (Vote.QUEUED, Vote.GRANTED)):
            continue
        if lk.slot not in shards.slots:
            out.append(i)
    return out


def event_slots(core: Session) -> set[int]:
    """The hash slots of the locks that read events now (N4): a cluster member's slots
    that must stay subscribed when it prunes the others past `MAX_SLOT_SUBS`."""
    return {lk.slot for lk in list(core.locks.values()) if core.reads_events(lk)}
