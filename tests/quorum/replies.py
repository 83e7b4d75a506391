"""Hand-made script replies for the tests that drive the protocol core without I/O."""

from __future__ import annotations

from redlockdlm.engine.codec import LockReply
from redlockdlm.engine.modes import Mode, Status


def reply(status: Status, mode: Mode | None = None, token: int = 0) -> LockReply:
    """A lock reply with `status`, granted `mode` and fencing `token`; nothing else set."""
    return LockReply(status=status, epoch="e", mode=mode, token=token, position=0,
                     value=None, version=0, valid=True, wait_ms=-1, extra=0,
                     blockers_count=0, blockers=())
