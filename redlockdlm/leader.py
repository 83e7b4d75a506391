"""Leader election with a lock of this DLM: several detectors may run, one leads.

`Leadership(dlm)` is a callable for `Detector(leader=...)`: it returns True while this
process holds the EX lock `__leader__/<role>` on a quorum. A follower retries with NOQUEUE
each time it is asked, so when a leader dies its lock frees itself after its lease and the
next follower to ask takes over: a dead leader is replaced within one lease plus one
detector interval.

Each attempt is bounded (R3): a NOQUEUE request returns NotQueued when another leads,
InstancesRecovering while instances are in their rejoin window (E1: a new deployment
whose instances were not marked fresh), QuorumUnavailable when too few answer; the
detector asks again next round, so it leads once the window ends, and a stop request
(SIGTERM) is seen between rounds.
"""

from __future__ import annotations

import logging

from .client import DLM, Lock
from .engine.modes import Mode
from .errors import DLMError, InstancesRecovering, NotQueued

log = logging.getLogger("redlockdlm.leader")


class Leadership:
    """Hold `__leader__/<role>` in EX while alive; `__call__` says whether we lead now."""

    def __init__(self, dlm: DLM, role: str = "detector") -> None:
        self.dlm = dlm
        self.role = role
        self._lock: Lock | None = None
        self._waiting_for = ""  #: why we could not lead last time (logged once)

    @property
    def resource(self) -> str:
        return f"__leader__/{self.role}"

    def __call__(self) -> bool:
        if self._lock is not None:
            if self._lock.valid:
                return True
            log.warning("leadership of %s lost", self.role)
            try:
                self._lock.release()
            except DLMError:
                pass
            self._lock = None
        try:
            self._lock = self.dlm.lock(self.resource, Mode.EX, noqueue=True)
            log.info("leading %s (token %d)", self.role, self._lock.token)
            self._waiting_for = ""
            return True
        except NotQueued:
            return False
        except InstancesRecovering as exc:
            if self._waiting_for != "recovering":  # once per window, not every round
                self._waiting_for = "recovering"
                log.info("leadership of %s waits for instances to recover: %s",
                         self.role, exc)
            return False
        except DLMError as exc:
            self._waiting_for = "unavailable"
            log.warning("leadership of %s unavailable: %s", self.role, exc)
            return False

    def resign(self) -> None:
        if self._lock is not None:
            try:
                self._lock.release()
            finally:
                self._lock = None
