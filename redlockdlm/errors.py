"""Every error redlockdlm raises.

::

    DLMError
    ├── InvalidArgument (ValueError)        bad input; nothing was changed
    │   ├── BadArgument                     a script refused an argument (DLM_BADARG)
    │   └── MissingKeys                     a subtree release lacked a child's key (DLM_KEYS)
    ├── InvalidType (TypeError)             an argument of the wrong type
    ├── NotOwner (PermissionError)          the lock belongs to another owner (DLM_NOTOWNER)
    ├── LockStateError                      the call does not fit the lock's state (DLM_STATE)
    │   ├── HasChildren                     release of a lock with children (DLM_HASCHILDREN)
    │   ├── UnknownLock                     no such lock
    │   ├── NotHeld (RuntimeError)          release of a Mutex that holds nothing
    │   └── AlreadyHeld                     acquire of a Mutex that holds (not reentrant)
    ├── LockTimeout (TimeoutError)          not granted within the timeout
    ├── NotQueued                           NOQUEUE request that could not be granted at once
    ├── Deadlock                            chosen as a deadlock victim, or conversion deadlock
    ├── ParentNotGranted                    the parent lock is not granted on a quorum
    ├── LockLost                            a held lock could not be kept valid
    ├── ConfigurationError                  the instances or options cannot be used safely
    │   ├── DuplicateInstance               two URLs reach one Redis server
    │   ├── MixedTransport                  rediss:// (TLS) and plain redis:// URLs mixed
    │   ├── EvictionPolicy                  an instance may evict keys (maxmemory-policy)
    │   ├── LeaseTooLong                    a lease longer than an instance's rejoin wait (E1)
    │   ├── MetricsUnavailable              metrics asked for without prometheus-client
    │   └── FakesUnavailable                redlockdlm.testing without fakeredis/lupa
    ├── QuorumUnavailable (ConnectionError) fewer than a quorum of instances answered
    │   └── InstancesRecovering             too few may grant yet: rejoin window (E1)
    ├── NotFresh                            `init fresh` of an instance that is not brand-new
    └── ProtocolError                       an instance answered something we did not expect
        └── CorruptKey                      a resource key holds no lock resource (DLM_CORRUPT)

Errors carry their context as attributes (`resource`, `lock_id`, `instance`), not only in
their message.
"""

from __future__ import annotations


class DLMError(Exception):
    """Base of every redlockdlm error."""

    def __init__(self, message: str = "", *, resource: str | None = None,
                 lock_id: str | None = None, instance: str | None = None) -> None:
        super().__init__(message)
        self.resource = resource
        self.lock_id = lock_id
        self.instance = instance


class InvalidArgument(DLMError, ValueError):
    """An argument was refused; no lock state was changed."""


class BadArgument(InvalidArgument):
    """A script refused an argument (reply code DLM_BADARG)."""


class MissingKeys(InvalidArgument):
    """A subtree release did not pass the key of every child (DLM_KEYS)."""


class InvalidType(DLMError, TypeError):
    """An argument had the wrong type."""


class NotOwner(DLMError, PermissionError):
    """The lock belongs to another owner (DLM_NOTOWNER)."""


class LockStateError(DLMError):
    """The operation does not fit the lock's state, e.g. converting a waiting lock."""


class HasChildren(LockStateError):
    """Releasing a lock that still has child locks without asking for the subtree."""


class UnknownLock(LockStateError):
    """No such lock (released, expired or never granted)."""


class NotHeld(LockStateError, RuntimeError):
    """`Mutex.release()` of a mutex that holds nothing (never acquired, released already,
    or its acquisition failed): nothing was sent. A RuntimeError, as `threading.Lock`
    raises for the same mistake."""


class AlreadyHeld(LockStateError):
    """`Mutex.acquire()` of a mutex that holds its lock, or is acquiring it on another
    thread or task, and is not reentrant: nothing was sent. (A second `DLM.lock` of a
    resource its owner holds in a conflicting mode is a self-deadlock: `Deadlock`, G14.)"""


class LockReleased(LockStateError):
    """The lock was released by its owner (or its request withdrawn): it cannot be
    converted any more; ask for a new lock."""


class LockTimeout(DLMError, TimeoutError):
    """The lock was not granted within the timeout; the request was cancelled."""


class StillWaiting(LockTimeout):
    """`Request.wait(timeout)` ended before the request did: the request is NOT withdrawn,
    it keeps waiting with its own timeout (`cancel()` withdraws it). The only LockTimeout
    that leaves a request behind."""


class NotQueued(DLMError):
    """A NOQUEUE request (or conversion) could not be granted at once."""


class Deadlock(DLMError):
    """The request was chosen as a deadlock victim, or hit a conversion deadlock."""


class ParentNotGranted(DLMError):
    """The parent lock is not granted on a quorum of instances."""


class LockLost(DLMError):
    """A lock that was held could not be kept valid (lease ran out, instances lost)."""


class ConfigurationError(DLMError):
    """The instances, or the options given, cannot be used safely; nothing was changed.
    Raised at first contact with an instance (the constructor, or the first call of an
    AsyncDLM), or, for an instance first reached later, given as that instance's error
    (its votes never count) and logged."""


class MetricsUnavailable(ConfigurationError):
    """Metrics were asked for (`metrics.enable`, `dlm detector --metrics-port`) but
    prometheus-client is not installed (the optional extra `redlockdlm[metrics]`)."""


class FakesUnavailable(ConfigurationError):
    """`redlockdlm.testing` was asked for in-process fake instances but fakeredis (with
    its Lua extra, `lupa`) is not installed, or is a version whose Lua runtime it cannot
    complete (install `redlockdlm[testing]`)."""


class DuplicateInstance(ConfigurationError):
    """Two URLs reach the same Redis server (the same `run_id`, or the same instance epoch):
    one server would cast two votes of the quorum."""


class MixedTransport(ConfigurationError):
    """TLS (``rediss://``) and plain ``redis://`` URLs in one instance list."""


class EvictionPolicy(ConfigurationError):
    """An instance's ``maxmemory-policy`` lets Redis evict keys (docs/operations.md).
    `policy` is the policy found."""

    def __init__(self, message: str = "", *, policy: str = "", **context: str | None) -> None:
        super().__init__(message, **context)
        self.policy = policy


class LeaseTooLong(ConfigurationError):
    """A lease longer than an instance's rejoin wait (rule E1): after that instance restarted
    empty it could grant the lock again while this lease still runs. `lease_ms` and
    `rejoin_ms` are the two numbers."""

    def __init__(self, message: str = "", *, lease_ms: int = 0, rejoin_ms: int = 0,
                 **context: str | None) -> None:
        super().__init__(message, **context)
        self.lease_ms = lease_ms
        self.rejoin_ms = rejoin_ms


class QuorumUnavailable(DLMError, ConnectionError):
    """Fewer than a quorum of instances answered."""


class InstancesRecovering(QuorumUnavailable):
    """Too few instances may grant yet: some restarted (or are new and were not marked
    fresh) and are in their rejoin window (rule E1). `recovering` maps each such instance
    to the seconds its window still had to run when the call gave up."""

    def __init__(self, message: str = "", *, recovering: dict[str, float] | None = None,
                 **context: str | None) -> None:
        super().__init__(message, **context)
        self.recovering = dict(recovering or {})


class NotFresh(DLMError):
    """`init fresh` refused: the instance is not brand-new (its epoch was created by use:
    it is recovering, or was), so it may have forgotten leases it granted before a restart
    (rule E1). Nothing was changed; `force` overrides (DLM_NOTFRESH)."""


class ProtocolError(DLMError):
    """An instance answered something the protocol does not expect."""


class CorruptKey(ProtocolError):
    """A resource key on an instance holds something that is not a lock resource (another
    type, or bytes that do not decode): written by another program, or damaged. The script
    refused to touch it and changed nothing (K1). `key` is the key, as the script named
    it."""

    def __init__(self, message: str = "", *, resource: str | None = None,
                 lock_id: str | None = None, instance: str | None = None) -> None:
        super().__init__(message, resource=resource, lock_id=lock_id, instance=instance)
        self.key = message.split(" ", 1)[0] if message else ""


#: Error code prefix of a script's error reply -> exception class.
SCRIPT_ERRORS: dict[str, type[DLMError]] = {
    "DLM_BADARG": BadArgument,
    "DLM_KEYS": MissingKeys,
    "DLM_NOTOWNER": NotOwner,
    "DLM_STATE": LockStateError,
    "DLM_HASCHILDREN": HasChildren,
    "DLM_NOTFRESH": NotFresh,
    "DLM_CORRUPT": CorruptKey,
}


def from_script_error(message: str, **context: str | None) -> DLMError:
    """Map a script error reply to its exception; unknown codes become ProtocolError."""
    code, _, text = message.partition(" ")
    cls = SCRIPT_ERRORS.get(code)
    if cls is None:
        return ProtocolError(message, **context)
    return cls(text, **context)


__all__ = sorted(
    [
        "AlreadyHeld",
        "BadArgument",
        "ConfigurationError",
        "CorruptKey",
        "DLMError",
        "Deadlock",
        "DuplicateInstance",
        "EvictionPolicy",
        "HasChildren",
        "InstancesRecovering",
        "InvalidArgument",
        "InvalidType",
        "LeaseTooLong",
        "LockLost",
        "LockReleased",
        "LockStateError",
        "LockTimeout",
        "MetricsUnavailable",
        "MissingKeys",
        "MixedTransport",
        "NotFresh",
        "NotHeld",
        "NotOwner",
        "NotQueued",
        "ParentNotGranted",
        "ProtocolError",
        "QuorumUnavailable",
        "StillWaiting",
        "UnknownLock",
        "from_script_error",
        "SCRIPT_ERRORS",
    ]
)
