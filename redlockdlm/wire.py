"""The wire contract of the server scripts, decided once for every transport.

`redlockdlm.engine.scripts` states the contract: call the Functions library (FCALL); a
reply "Function not found" (the instance restarted empty, FUNCTION FLUSH) means the call
did nothing, so load the library (FUNCTION LOAD) and send it again; where FUNCTION LOAD is
refused (an ACL without +function) send the self-contained EVAL form instead. `Round` is
that decision with no I/O in it: each transport (the sync and asyncio quorum clients, the
Engine, the detector's pipelined scan) writes the commands it is given and feeds the
replies back, and `settle` / `script_reply` say what each final reply means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, ResponseError

from .engine import codec
from .engine.scripts import command, fallback, is_missing, load_command
from .errors import DLMError, ProtocolError, from_script_error

if TYPE_CHECKING:
    from .protocol import Call

_LOCK_REPLY_SCRIPTS = {"request", "convert", "release", "cancel", "yield", "break"}


def missing(raw: Any) -> bool:
    """True if the reply `raw` (an error reply as its exception) says the call did nothing
    because the instance lacks the library (or, for EVALSHA, the script)."""
    return isinstance(raw, ResponseError) and (isinstance(raw, NoScriptError)
                                               or is_missing(raw))


class Round:
    """One round of script calls on one instance, as a state machine without I/O.

    The transport writes `calls` (as `command(...)` or `packed_command(...)`) and reads one
    reply per call, an error reply as its `ResponseError` (a network error is the
    transport's: the round is then over). `feed(replies)` answers the commands to write
    next and whose replies to feed back in the same way, or None when the round is done;
    `raws` then holds one final reply per call. The steps: the replies of the calls; if
    any met a missing library, `[load_command()]`; after its reply, those calls again
    (FCALL if the load succeeded, the EVAL form if it was refused), whose replies replace
    theirs. At most one load per round: a call still missing after it stays missing
    (`settle` reports it), so an instance restarting in a loop is not retried forever."""

    __slots__ = ("calls", "raws", "_again", "_step")

    def __init__(self, calls: Sequence[tuple[str, list[bytes], list[bytes]]]) -> None:
        self.calls = calls
        self.raws: list[Any] = []
        self._again: list[int] = []
        self._step = 0

    def feed(self, replies: Sequence[Any]) -> list[tuple] | None:
        """Take the replies of what was last written; the commands to write next, or None."""
        step = self._step
        self._step += 1
        if step == 0:
            self.raws = raws = list(replies)
            for k, r in enumerate(raws):
                if missing(r):
                    self._again = [k for k, r in enumerate(raws) if missing(r)]
                    return [load_command()]
            return None
        if step == 1:
            form = fallback if isinstance(replies[0], ResponseError) else command
            return [form(*self.calls[k]) for k in self._again]
        if step == 2:
            for k, raw in zip(self._again, replies):
                self.raws[k] = raw
            return None
        raise RuntimeError("Round.feed after the round is done")

    def drive(self, replies: Sequence[Any],
              roundtrip: Callable[[list[tuple]], Sequence[Any]]) -> list[Any]:
        """For a blocking transport: feed the first `replies`, then write what the round
        asks with `roundtrip(commands)` (which answers their replies, error replies as
        values) until it is done. The final replies."""
        cmds = self.feed(replies)
        while cmds:
            cmds = self.feed(roundtrip(cmds))
        return self.raws

    @property
    def reloaded(self) -> bool:
        """True if some calls were sent again after a load (their first reply replaced)."""
        return self._step > 2


def parse(call: Call, raw: Any) -> Any:
    """Parse the reply of `call` by its script name."""
    if call.name in _LOCK_REPLY_SCRIPTS:
        return codec.parse_lock_reply(raw)
    if call.name == "renew":
        return codec.parse_renew_reply(raw)
    return raw


def settle(call: Call, raw: Any, url: str) -> Any:
    """What one final reply of a `Round` of the quorum clients means: the parsed reply, or
    the exception to record for that instance (a `DLM_*` script error typed, anything else
    from Redis a `ProtocolError`, a call still missing its library after the load a
    `ProtocolError`, a network error or unparsable reply as it is)."""
    if isinstance(raw, BaseException):  # (one test for the common case, a reply)
        if missing(raw):
            return ProtocolError("script missing after a load", instance=url)
        if isinstance(raw, ResponseError):
            msg = str(raw)
            return (from_script_error(msg, instance=url) if msg.startswith("DLM_")
                    else ProtocolError(msg, instance=url))
        return raw
    try:
        return parse(call, raw)
    except DLMError as exc:
        return exc


def script_reply(raw: Any) -> Any:
    """A final reply of a `Round` for a caller that raises (the Engine, first contact):
    the reply itself; a `DLM_*` error reply raised typed; any other error raised as is."""
    if isinstance(raw, ResponseError):
        msg = str(raw)
        if msg.startswith("DLM_"):
            raise from_script_error(msg) from None
        raise raw
    if isinstance(raw, BaseException):
        raise raw
    return raw
