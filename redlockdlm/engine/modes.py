"""Lock modes, the compatibility matrix, request flags and reply codes of one instance.

This module is the single Python source of the numbers the Lua scripts use (`lua/lib/`);
`tests/engine/test_codes.py` checks that both agree.
"""

from __future__ import annotations

import enum


class Mode(enum.IntEnum):
    """The six lock modes of the OpenVMS DLM, weakest to strongest (rule M1)."""

    NL = 0  #: null: no access, keeps the resource and its value block alive
    CR = 1  #: concurrent read
    CW = 2  #: concurrent write
    PR = 3  #: protected read (shared)
    PW = 4  #: protected write (update, readers of CR allowed)
    EX = 5  #: exclusive

    # Printed by name ("EX"), as users write them, not as the number an IntEnum prints;
    # int(mode) and b"%d" % mode still give the number the scripts take.
    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


# Rule M1. Rows: granted mode; columns: requested mode.
#            NL     CR     CW     PR     PW     EX
COMPAT = (
    (True, True, True, True, True, True),  # NL
    (True, True, True, True, True, False),  # CR
    (True, True, True, False, False, False),  # CW
    (True, True, False, True, False, False),  # PR
    (True, True, False, False, False, False),  # PW
    (True, False, False, False, False, False),  # EX
)


def compatible(granted: int, requested: int) -> bool:
    """True if a lock granted in `granted` may coexist with one granted in `requested`."""
    return COMPAT[granted][requested]


def is_down_conversion(granted: int, requested: int) -> bool:
    """Rule M2: lower mode, except PR->CW which is a middle conversion (fs/dlm)."""
    if granted == Mode.PR and requested == Mode.CW:
        return False
    return requested < granted


class Flag(enum.IntFlag):
    """Request flags; the bit values are part of the script protocol."""

    NONE = 0
    NOQUEUE = 1  #: G2: fail instead of waiting
    EXPEDITE = 2  #: G3: NL request granted whatever the queues hold
    QUECVT = 4  #: G5: an up-conversion also waits behind queued conversions
    CONVDEADLK = 8  #: G7: demote to NL instead of failing a conversion deadlock
    NODLCKWT = 16  #: the deadlock detector never picks this request as a victim
    SUBTREE = 32  #: H3: release the whole subtree
    #: N1: the owner reads this lock's blocking events (it has an `on_blocking` callback);
    #: without it a holder gets one only when the queued request's ticket is older than
    #: its own (the split-vote yield, Y1)
    BLKAST = 64


REQUEST_FLAGS = Flag.NOQUEUE | Flag.EXPEDITE | Flag.NODLCKWT | Flag.BLKAST
CONVERT_FLAGS = Flag.NOQUEUE | Flag.QUECVT | Flag.CONVDEADLK | Flag.NODLCKWT | Flag.BLKAST
RELEASE_FLAGS = Flag.SUBTREE

#: P1: a request's priority for the detector's choice of a deadlock victim (D8: the lowest
#: goes first); 0 by default. A C int's range, as the scripts check it.
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1


class Status(enum.IntEnum):
    """Outcome codes in the first field of a script reply (not errors)."""

    GRANTED = 0
    QUEUED = 1  #: waiting (new request) or converting
    NOTQUEUED = 2  #: G2
    DEADLOCK = 3  #: G7, or cancelled by the detector
    RECOVERING = 4  #: E1: the instance may have forgotten leases; retry later
    NOPARENT = 5  #: H1
    NOTFOUND = 6  #: no such lock on this instance (normal for quorum releases)
    RELEASED = 7
    CANCELLED = 8
    CANCELGRANT = 9  #: cancel found the lock granted: nothing to cancel
    CORRUPT = 10  #: renew: this lock's resource key holds no lock resource (K1)


MODE_NAMES = tuple(m.name for m in Mode)
