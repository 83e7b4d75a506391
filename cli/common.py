"""What every `dlm` command shares: exit codes, the one exception-to-exit mapping, and the
decorator that gives each command the same connection options.

Exit codes (also in docs/cli.md):

    0  OK         the command did what it was asked
    1  FAILED     it could not: too few instances answered, nothing matched, a lock could
                  not be broken everywhere, the confirmation was declined, redis-server is
                  missing, ...
    2  USAGE      bad arguments or options (malformed URL, namespace, resource name, ...)
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
import redis

from redlockdlm import admin
from redlockdlm.devcluster import DevClusterError
from redlockdlm.errors import DLMError, InvalidArgument, InvalidType
from redlockdlm.protocol import describe


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    #: `dlm run`: the lock was not granted (timeout, NOQUEUE, deadlock, no quorum), or was
    #: lost while COMMAND ran and COMMAND succeeded; never COMMAND's own status (sysexits'
    #: EX_TEMPFAIL: try again later)
    LOCK = 75
    #: `dlm run`: COMMAND could not be executed / was not found (the shell's codes)
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127


class LockFailed(Exception):
    """`dlm run` could not hold its lock (exit 75); the message is the one line shown."""


class Failed(Exception):
    """The command ran but could not do what it was asked (exit 1); the message is the
    one line the user sees."""


def exit_for(exc: BaseException) -> tuple[ExitCode, str]:
    """THE mapping from an exception to an exit code and a one-line message."""
    if isinstance(exc, click.UsageError):
        hint = ""
        if exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        return ExitCode.USAGE, exc.format_message().replace("\n", " ") + hint
    if isinstance(exc, click.BadParameter):  # raised outside a usage context
        return ExitCode.USAGE, exc.format_message()
    if isinstance(exc, (InvalidArgument, InvalidType)):
        return ExitCode.USAGE, _line(exc)
    if isinstance(exc, click.Abort):
        return ExitCode.FAILED, "aborted"
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.FAILED, "interrupted"
    if isinstance(exc, LockFailed):
        return ExitCode.LOCK, _line(exc)
    if isinstance(exc, (Failed, DevClusterError, click.ClickException)):
        msg = exc.format_message() if isinstance(exc, click.ClickException) else _line(exc)
        return ExitCode.FAILED, msg
    if isinstance(exc, (redis.RedisError, OSError, DLMError)):
        return ExitCode.FAILED, describe(exc)
    return ExitCode.FAILED, f"internal error: {type(exc).__name__}: {_line(exc)}"


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.split("\n")) if text else type(exc).__name__


# ----------------------------------------------------------------- connection options


@dataclass(frozen=True)
class Settings:
    """The options every connected command receives."""

    urls: tuple[str, ...]
    namespace: str
    as_json: bool
    timeout_s: float

    def targets(self) -> list[admin.Target]:
        return admin.connect(list(self.urls), self.namespace, timeout_s=self.timeout_s)


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(u.strip() for v in values for u in v.split(",") if u.strip())


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command --redis (repeatable; env DLM_REDIS, comma-separated), --namespace
    (env DLM_NAMESPACE), --json and --timeout; it receives them as a `Settings` first
    argument."""

    @click.option("--redis", "redis_urls", multiple=True, metavar="URL",
                  help="An instance, redis://[:password@]host:port[/db]; repeat for each "
                       "(or comma-separate). Default: $DLM_REDIS.")
    @click.option("--namespace", envvar="DLM_NAMESPACE", default="default", show_default=True,
                  help="Lock namespace (env DLM_NAMESPACE).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
                  default=2.0, show_default=True, metavar="SECONDS",
                  help="Connect and reply timeout per instance.")
    @functools.wraps(fn)
    def wrapper(*args: Any, redis_urls: tuple[str, ...], namespace: str, as_json: bool,
                timeout_s: float, **kwargs: Any) -> Any:
        urls = _split(redis_urls) or _split((os.environ.get("DLM_REDIS", ""),))
        if not urls:
            raise click.UsageError("no instances: pass --redis URL (repeatable) or set "
                                   "DLM_REDIS=redis://host:port,...",
                                   ctx=click.get_current_context(silent=True))
        return fn(Settings(urls, namespace, as_json, timeout_s), *args, **kwargs)

    return wrapper
