"""Hand-made script replies for the tests that drive the protocol core without I/O."""

from __future__ import annotations

from redlockdlm.engine.codec import LockReply
from redlockdlm.engine.modes import Mode, Status


def reply(status: Status, mode: Mode | None = None, token: int = 0, extra: int = 0
          ) -> LockReply:
    """A lock reply with `status`, granted `mode`, fencing `token` and `extra` (QUEUED: the
    resource's fencing sequence); nothing else set."""
    return LockReply(status=status, epoch="e", mode=mode, token=token, position=0,
                     value=None, version=0, valid=True, wait_ms=-1, extra=extra,
                     blockers_count=0, blockers=())
