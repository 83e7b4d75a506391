"""`dlm run` and `dlm demo`: the commands that take locks through the quorum client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import click

from redlockdlm import DLM, Mode
from redlockdlm.devcluster import DevCluster
from redlockdlm.errors import DLMError, InvalidArgument, InvalidType

from . import output
from .common import ExitCode, Failed, LockFailed, Settings, connection_options

NOT_FOUND, NOT_EXECUTABLE = int(ExitCode.NOT_FOUND), int(ExitCode.NOT_EXECUTABLE)

MODES = [m.name for m in Mode]


@click.command(context_settings={"ignore_unknown_options": True})
@connection_options
@click.argument("resource")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--mode", type=click.Choice(MODES, case_sensitive=False), default="EX",
              show_default=True, help="Lock mode.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=None,
              metavar="SECONDS", help="Give up if not granted within this long "
                                      "(default: wait as long as it takes).")
@click.option("--noqueue", is_flag=True, help="Fail at once if the lock is not free.")
@click.option("--lease", "lease_ms", type=click.IntRange(100, 86_400_000), default=10_000,
              show_default=True, metavar="MS", help="Lease, renewed while the command runs.")
def run(s: Settings, resource: str, command: tuple[str, ...], mode: str,
        wait_s: float | None, noqueue: bool, lease_ms: int) -> None:
    """Run COMMAND while holding RESOURCE (like flock(1) or `consul lock`).

    The lease is renewed while COMMAND runs. COMMAND's environment has DLM_FENCING_TOKEN
    (pass it to what you write to), DLM_LOCK_ID, DLM_RESOURCE and DLM_MODE. The lock is
    released when COMMAND ends or is interrupted (signals are forwarded); if the lock is
    lost meanwhile, COMMAND gets SIGTERM. Write `dlm run RES -- cmd --its-options`.

    Exit status: COMMAND's when it ran (128+N if a signal N killed it); 75 when the lock
    was not granted (timeout, --noqueue, a deadlock, no quorum) or was lost while COMMAND
    ran and COMMAND succeeded; 126/127 when COMMAND cannot be executed / is not found; 2
    bad usage. With --json, a summary line (resource, mode, lock_id, token, lost,
    exit_code) goes to stderr at the end; stdout is COMMAND's."""
    child: list[subprocess.Popen[bytes]] = []
    lost = threading.Event()

    def on_lost(_lock: object) -> None:
        lost.set()
        if child and child[0].poll() is None:
            child[0].terminate()

    with DLM(list(s.urls), s.namespace, lease_ms=lease_ms, socket_timeout=s.timeout_s,
             connect_timeout=s.timeout_s) as dlm:
        try:
            lock = dlm.lock(resource, Mode[mode.upper()], timeout=wait_s, noqueue=noqueue,
                            on_lost=on_lost)
        except (InvalidArgument, InvalidType):
            raise  # (bad usage: exit 2)
        except DLMError as exc:
            raise LockFailed(f"lock on {resource!r} not granted: "
                             f"{type(exc).__name__}: {exc}") from exc
        env = dict(os.environ, DLM_FENCING_TOKEN=str(lock.token), DLM_LOCK_ID=lock.id,
                   DLM_RESOURCE=resource, DLM_MODE=mode.upper())
        previous = {}

        def forward(signum: int, _frame: object) -> None:
            if child and child[0].poll() is None:
                child[0].send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, forward)
        try:
            try:
                child.append(subprocess.Popen(list(command), env=env))
            except OSError as exc:
                output.error(f"cannot run {command[0]!r}: {exc.strerror or exc}", s.as_json,
                             NOT_FOUND if isinstance(exc, FileNotFoundError)
                             else NOT_EXECUTABLE)
                code = -256 if isinstance(exc, FileNotFoundError) else -257
            else:
                code = child[0].wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            try:
                lock.release()
            except DLMError as exc:
                output.warn(f"release of {resource!r} failed: {exc}")
    if code == -256:
        code = NOT_FOUND
    elif code == -257:
        code = NOT_EXECUTABLE
    elif code < 0:  # killed by a signal: the shell convention
        code = 128 - code
    if lost.is_set():
        output.warn(f"the lock on {resource!r} was lost while the command ran")
        if code == 0:
            code = ExitCode.LOCK
    if s.as_json:
        click.echo(json.dumps({"resource": resource, "mode": mode.upper(), "lock_id": lock.id,
                               "token": lock.token, "lost": lost.is_set(),
                               "exit_code": int(code)}), err=True)
    sys.exit(int(code))


@click.command()
@click.option("--redis", "redis_urls", multiple=True, metavar="URL",
              help="Use these instances (default: $DLM_REDIS, else start a local cluster).")
@click.option("--workers", type=click.IntRange(2, 64), default=4, show_default=True,
              help="Worker processes.")
@click.option("--seconds", type=click.FloatRange(min=1), default=6.0, show_default=True,
              help="How long the workers run.")
@click.option("--detector/--no-detector", default=True, show_default=True,
              help="Run a deadlock detector in this process (use --no-detector when a "
                   "`dlm detector` already serves the namespace 'demo').")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo(redis_urls: tuple[str, ...], workers: int, seconds: float, detector: bool,
         as_json: bool) -> None:
    """The tour: workers share a small hierarchical database (tables and rows), with
    intent locks, value blocks as row versions and a deliberate deadlock that the detector
    resolves. Starts a local 3-instance cluster when no instances are given."""
    from redlockdlm.demo import run_demo

    urls = [u.strip() for v in redis_urls for u in v.split(",") if u.strip()] or [
        u.strip() for u in os.environ.get("DLM_REDIS", "").split(",") if u.strip()]
    progress = output.progress_line(as_json)
    t0 = time.monotonic()
    if urls:
        output.demo_intro(urls, started=False, as_json=as_json)
        res = run_demo(urls, workers=workers, seconds=seconds, detector=detector,
                       report=progress)
    else:
        with DevCluster(3) as cluster:
            output.demo_intro(list(cluster.urls), started=True, as_json=as_json)
            res = run_demo(list(cluster.urls), workers=workers, seconds=seconds,
                           detector=detector, report=progress)
    output.demo_result(res, time.monotonic() - t0, as_json)
    if not res.consistent:
        raise Failed("row versions disagree with the committed updates")
