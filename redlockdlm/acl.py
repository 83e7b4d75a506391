"""The least-privilege Redis ACL rule for a redlockdlm user (`dlm acl` prints it).

What the rule allows, and why:

* keys ``dlm:*`` (or, per namespace, ``dlm:epoch``, ``dlm:epoch:{*``, ``dlm:{<ns>:*``,
  ``dlm:<ns>:waiters`` and ``dlm:<ns>:waiters:{*``): the epoch hash, the resource keys and
  the waiter index, on a Redis Cluster member one epoch hash and one waiter index per hash
  slot (rule H2c);
* channels ``dlm:*:ch:*`` (or ``dlm:<ns>:ch:*``): each owner's event channel (on a cluster
  member the shard channels ``dlm:<ns>:ch:{<slot tag>}:<owner>``);
* commands, in three groups (`COMMANDS`):

  - the library: FCALL of the Functions library and FUNCTION LOAD when an instance lacks
    it (after a restart or FUNCTION FLUSH); SUBSCRIBE and UNSUBSCRIBE for events
    (SSUBSCRIBE and SUNSUBSCRIBE on a Redis Cluster member), PING; on a cluster member
    CLUSTER SLOTS and COMMAND, which redis-py's cluster client reads to route commands;
  - the scripts' own calls, which Redis checks against the CALLER's ACL: HMGET HSET HEXISTS
    HDEL TIME GET SET ZADD ZREM PUBLISH, SPUBLISH on a cluster member, INFO (the server's
    run_id for E2, whether it is a cluster member);
  - the operators' tools (`dlm status/ls/show/graph`, the detector): SCAN (resource
    listing, never on a hot path), INFO (version), ZCARD ZRANGE ZRANGEBYSCORE ZSCORE (the
    waiter index), WATCH UNWATCH MULTI EXEC DISCARD (the detector removes a stale index
    entry only if it is unchanged).

AUTH and HELLO need no permission. redis-py also sends CLIENT SETINFO on Redis >= 7.2;
refused, it is ignored (add ``+client|setinfo`` there to keep ``ACL LOG`` quiet; Redis 7.0
rejects the whole rule if it names that subcommand).

Caveats the rule cannot remove (docs/operations.md): the Functions library is shared by
every user of an instance, so a user allowed FUNCTION LOAD could replace the code other
users' calls run (``function_load=False`` gives ``+eval`` instead: the clients then send
each script as EVAL, which runs with the caller's own rights only); and ``dlm:epoch`` is
shared by all namespaces. A per-namespace rule keeps tenants' keys apart from mistakes,
not from a hostile tenant: give those separate instances.
"""

from __future__ import annotations

import re
import secrets

from .engine.keys import EPOCH_KEY, check_namespace
from .errors import InvalidArgument, InvalidType

LIBRARY = ("fcall", "function|load", "subscribe", "unsubscribe", "ping", "ssubscribe",
           "sunsubscribe", "cluster|slots", "command")
SCRIPTS = ("hget", "hmget", "hset", "hexists", "hdel", "time", "get", "set", "zadd", "zrem",
           "publish", "spublish")
OPERATORS = ("scan", "info", "zcard", "zrange", "zrangebyscore", "zscore", "watch", "unwatch",
             "multi", "exec", "discard")
#: Every command a redlockdlm user needs, grouped as above.
COMMANDS = LIBRARY + SCRIPTS + OPERATORS

PLACEHOLDER = "<password>"
_USER = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def keys_and_channels(namespace: str | None = None) -> list[str]:
    """The key (``~``) and channel (``&``) patterns: every namespace, or one."""
    if namespace is None:
        return ["~dlm:*", "&dlm:*:ch:*"]
    ns = check_namespace(namespace).decode()
    epoch = EPOCH_KEY.decode()
    return [f"~{epoch}", f"~{epoch}:{{*", f"~dlm:{{{ns}:*", f"~dlm:{ns}:waiters",
            f"~dlm:{ns}:waiters:{{*", f"&dlm:{ns}:ch:*"]


def commands(*, function_load: bool = True) -> list[str]:
    """``+command`` items; without FUNCTION LOAD, ``+eval`` (the clients' fallback)."""
    cmds = list(COMMANDS)
    if not function_load:
        cmds[cmds.index("function|load")] = "eval"
    return [f"+{c}" for c in cmds]


def rule_args(user: str = "dlm", password: str | None = None, *,
              namespace: str | None = None, function_load: bool = True) -> list[str]:
    """The arguments of ``ACL SETUSER`` (user first): ``reset`` so that re-running it makes
    the user exactly this, ``on``, the password (``>password``), the key and channel
    patterns, ``-@all``, then each command. `password` None: a random one."""
    if not isinstance(user, str) or not _USER.fullmatch(user):
        raise InvalidArgument(f"user {user!r} must be 1..64 characters of [A-Za-z0-9_.-]")
    if password is None:
        password = secrets.token_urlsafe(24)
    if not isinstance(password, str):
        raise InvalidType(f"password must be a str, not {type(password).__name__}")
    if not password or any(c.isspace() for c in password):
        raise InvalidArgument("password must be non-empty, without spaces")
    return [user, "reset", "on", f">{password}", *keys_and_channels(namespace), "-@all",
            *commands(function_load=function_load)]


def rule(user: str = "dlm", password: str | None = None, *, namespace: str | None = None,
         function_load: bool = True) -> str:
    """The whole ``ACL SETUSER ...`` line (for redis-cli or an ACL file, as ``user ...``)."""
    return "ACL SETUSER " + " ".join(rule_args(user, password, namespace=namespace,
                                               function_load=function_load))


def url_hint(user: str, password: str) -> str:
    return f"redis://{user}:{password}@HOST:PORT"
