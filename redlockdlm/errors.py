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
    │   └── UnknownLock                     no such lock
    ├── LockTimeout (TimeoutError)          not granted within the timeout
    ├── NotQueued                           NOQUEUE request that could not be granted at once
    ├── Deadlock                            chosen as a deadlock victim, or conversion deadlock
    ├── ParentNotGranted                    the parent lock is not granted on a quorum
    ├── LockLost                            a held lock could not be kept valid
    ├── QuorumUnavailable (ConnectionError) fewer than a quorum of instances answered
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


class LockTimeout(DLMError, TimeoutError):
    """The lock was not granted within the timeout; the request was cancelled."""


class NotQueued(DLMError):
    """A NOQUEUE request (or conversion) could not be granted at once."""


class Deadlock(DLMError):
    """The request was chosen as a deadlock victim, or hit a conversion deadlock."""


class ParentNotGranted(DLMError):
    """The parent lock is not granted on a quorum of instances."""


class LockLost(DLMError):
    """A lock that was held could not be kept valid (lease ran out, instances lost)."""


class QuorumUnavailable(DLMError, ConnectionError):
    """Fewer than a quorum of instances answered."""


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
        "BadArgument",
        "CorruptKey",
        "DLMError",
        "Deadlock",
        "HasChildren",
        "InvalidArgument",
        "InvalidType",
        "LockLost",
        "LockStateError",
        "LockTimeout",
        "MissingKeys",
        "NotOwner",
        "NotQueued",
        "ParentNotGranted",
        "ProtocolError",
        "QuorumUnavailable",
        "UnknownLock",
        "from_script_error",
        "SCRIPT_ERRORS",
    ]
)
