"""Entry point of the ``dlm`` command (docs/cli.md).

Each command: parse arguments, call the library (`redlockdlm.admin`, `.detector`,
`.devcluster`), hand the result to `output`, and raise `Failed` when the operation did not
succeed. `DlmGroup.main` turns every exception into one stderr line and an `ExitCode`
through `common.exit_for`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

import click

from redlockdlm import DLM, admin, metrics
from redlockdlm.detector import Detector, choose_victim, find_cycles, scan, wait_for_graph
from redlockdlm.devcluster import DevCluster
from redlockdlm.engine.keys import check_id, check_name
from redlockdlm.errors import NotFresh
from redlockdlm.leader import Leadership

from . import output
from .aclcmd import acl
from .common import ExitCode, Failed, Settings, connection_options, exit_for
from .lockcmds import demo, run


def _version() -> str:
    try:
        return _dist_version("redlockdlm")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


class DlmGroup(click.Group):
    """A click group whose every failure ends as one stderr line and an ExitCode."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = ExitCode(rv) if isinstance(rv, int) and rv in ExitCode._value2member_map_ \
                else ExitCode.OK
        except SystemExit:
            raise
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `dlm`: the help, exit 2
            output.help_text(exc.ctx.get_help() if exc.ctx else str(exc))
            code = ExitCode.USAGE
        except BaseException as exc:
            code, message = exit_for(exc)
            argv = list(sys.argv[1:] if args is None else args)
            mine = argv[:argv.index("--")] if "--" in argv else argv  # (not COMMAND's)
            output.error(message, as_json="--json" in mine, code=int(code))
        if not standalone_mode:
            return int(code)
        sys.exit(int(code))


@click.group(cls=DlmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="dlm")
def cli() -> None:
    """Inspect and operate a redlockdlm lock manager.

    Instances come from --redis URL (repeatable) or $DLM_REDIS (comma-separated); the
    namespace from --namespace or $DLM_NAMESPACE. Exit status: 0 OK, 1 the operation
    failed (e.g. fewer than a quorum of instances answered), 2 bad usage; `dlm run` has its
    own (see `dlm run --help`).
    """


# ----------------------------------------------------------------- helpers


def _report(outcomes: Sequence[admin.InstanceResult], show: Callable[[], None]) -> None:
    """Print the result unless no instance answered; then warn about each instance that
    did not answer, and fail (exit 1) if fewer than a quorum did."""
    failed = [o for o in outcomes if not o.ok]
    n, q = len(outcomes), admin.quorum(len(outcomes))
    ok = n - len(failed)
    detail = "; ".join(f"{o.label} {o.error}" for o in failed)
    if ok == 0:
        raise Failed(f"no instance answered: {detail}")
    show()
    if ok < q:
        raise Failed(f"only {ok} of {n} instances answered (quorum {q}): {detail}")
    for o in failed:
        output.warn(f"{o.label} {o.error}")


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` instead of killing the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------- commands


@cli.command()
@connection_options
def status(s: Settings) -> None:
    """Health of every instance: reachability, latency, Redis version, epoch, recovery
    time left, rejoin wait, eviction policy, live locks and waiter-index entries. Exit 1
    when no grant is possible now (fewer than a quorum reachable, or reachable but in
    their rejoin window or without an epoch), or when two URLs reach one server or an
    instance may evict keys."""
    outcomes = admin.health(s.targets())
    problems = admin.config_problems(outcomes)
    waiting = admin.not_granting(outcomes)
    output.status(outcomes, s.namespace, s.as_json, problems, waiting)
    if problems:
        raise Failed("; ".join(problems))
    n, q = len(outcomes), admin.quorum(len(outcomes))
    ok = sum(1 for o in outcomes if o.ok)
    if ok < q:
        raise Failed(f"only {ok} of {n} instances reachable (quorum {q}): "
                     + "; ".join(f"{o.label} {o.error}" for o in outcomes if not o.ok))
    if ok - len(waiting) < q:
        raise Failed(f"no grant possible now: {ok - len(waiting)} of {n} instances can "
                     f"grant (quorum {q}): "
                     + "; ".join(f"{lab} {why}" for lab, why in waiting.items()))


@cli.command("namespaces")
@connection_options
def namespaces_cmd(s: Settings) -> None:
    """The namespaces in use on the instances (those with resource keys: live resources
    or tombstones, by SCAN), with the keys each instance holds. --namespace is ignored."""
    found, outcomes = admin.namespaces(s.targets())
    _report(outcomes, lambda: output.namespaces(found, [o.label for o in outcomes],
                                                s.as_json))


@cli.command("ls")
@click.argument("prefix", nargs=-1)
@connection_options
def ls(s: Settings, prefix: tuple[str, ...]) -> None:
    """List resources with live locks (union over instances): granted, converting and
    waiting locks with their modes.

    PREFIX selects by path, root first: every name but the last must match exactly, the
    last is a prefix (`dlm ls db/` = roots starting with db/; `dlm ls db/orders row:` =
    children of db/orders starting with row:).
    """
    parts = [check_name(p) for p in prefix]
    targets = s.targets()
    found, outcomes = admin.resources(targets, parts)
    _report(outcomes, lambda: output.resources(found, s.namespace, len(targets), s.as_json))


@cli.command()
@click.argument("resource", nargs=-1, required=True)
@connection_options
def show(s: Settings, resource: tuple[str, ...]) -> None:
    """One resource: its Granted, Conversion and Waiting queues (one lock a line,
    `grmode (rqmode)`), value block, fencing sequence per instance, and every divergence
    between instances.

    RESOURCE is the resource's path, root first, one argument per name:
    `dlm show db/orders row:42` is the child row:42 of the root db/orders.
    """
    merged, outcomes = admin.resource(s.targets(), resource)
    if any(o.ok for o in outcomes) and merged.present_on == 0:
        raise Failed(f"no resource {admin.show_name(merged.path)} on any instance that "
                     "answered")
    _report(outcomes, lambda: output.resource(merged, outcomes, s.as_json))


@cli.command("break")
@click.argument("resource", nargs=-1, required=True)
@click.option("--lock", "lock_id", metavar="ID", help="Break this lock.")
@click.option("--owner", metavar="ID", help="Break every lock of this owner on RESOURCE.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@connection_options
def break_(s: Settings, resource: tuple[str, ...], lock_id: str | None, owner: str | None,
           yes: bool) -> None:
    """Break a lock, or an owner's locks, on RESOURCE on every instance, each with every
    lock below it (its child locks, theirs, ...: children first). Each owner is notified
    (its client sees each of those locks lost); a broken PW/EX holder's value block
    becomes invalid. Prints each lock that went (resource, lock, owner, mode, instances).
    Asks for confirmation, listing the locks below too, unless --yes.

    RESOURCE is the resource's path, root first, one argument per name.
    """
    if bool(lock_id) == bool(owner):
        raise click.UsageError("give exactly one of --lock ID or --owner ID",
                               ctx=click.get_current_context())
    if lock_id:
        check_id("lock id", lock_id)
    if owner:
        check_id("owner", owner)
    targets = s.targets()
    merged, outcomes = admin.resource(targets, resource)
    if not any(o.ok for o in outcomes):
        _report(outcomes, lambda: None)
    matches = [m for m in merged.locks
               if (lock_id and m.lock_id == lock_id) or (owner and m.owner == owner)]
    if not matches:
        what = f"lock {lock_id}" if lock_id else f"lock of owner {owner}"
        raise Failed(f"no live {what} on {admin.show_name(merged.path)}")
    if not yes and not output.confirm(output.break_plan(
            merged, matches, admin.descendants(targets, matches))):
        raise Failed("not confirmed: nothing broken")
    result = admin.break_locks(targets, resource, lock_id=lock_id or "", owner=owner or "")
    output.broken(result, s.as_json)
    if result.failed:
        raise Failed("not broken on " + "; ".join(f"{o.label} {o.error}"
                                                 for o in result.failed))


#: What `dlm graph --format svg` says where Graphviz is not installed.
GRAPHVIZ_MISSING = ("--format svg needs Graphviz's `dot` on PATH: install Graphviz (apt "
                    "install graphviz, brew install graphviz), or use --format dot, which "
                    "works without it (dot -Tsvg elsewhere)")


def _graphviz() -> str:
    """The path of Graphviz's `dot` (Failed, saying how to get it, where it is missing)."""
    exe = shutil.which("dot")
    if exe is None:
        raise Failed(GRAPHVIZ_MISSING)
    return exe


def _svg(exe: str, dot_text: str) -> str:
    """SVG drawn from DOT by Graphviz's `dot` at `exe`."""
    try:
        p = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"{exe} -Tsvg did not finish in {exc.timeout:g} s") from exc
    if p.returncode != 0:
        err = " ".join(p.stderr.split()) or f"exit status {p.returncode}"
        raise Failed(f"{exe} -Tsvg failed: {err}")
    return p.stdout


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["text", "dot", "svg"]), default="text",
              show_default=True,
              help="text for people; dot: Graphviz DOT; svg: drawn by Graphviz's dot.")
@connection_options
def graph(s: Settings, fmt: str) -> None:
    """The wait-for graph between owners (from the waiter index of every instance) and
    its cycles, each with the victim the detector would cancel if it persists.

    --format dot prints it in Graphviz DOT (owners as nodes, edges waiter -> holder
    labelled by resource and locks, cycle edges red and bold, each victim's owner a red
    double octagon); --format svg draws that with Graphviz (`dot -Tsvg`), which must be
    installed (exit 1 saying how, otherwise).
    """
    if s.as_json and fmt != "text":
        raise click.UsageError(f"--json and --format {fmt}: give one",
                               ctx=click.get_current_context())
    exe = _graphviz() if fmt == "svg" else ""  # (missing: fail before connecting)
    snap = scan(s.targets())
    g = wait_for_graph(snap)
    cycles = [(c, choose_victim(c, snap)) for c in find_cycles(g)]
    outcomes = [admin.InstanceResult(i.label, None, i.error) for i in snap.instances]
    if fmt == "text":
        _report(outcomes, lambda: output.graph(snap, g, cycles, s.as_json))
        return
    dot_text = output.graph_dot(g, cycles)
    if fmt == "svg" and any(o.ok for o in outcomes):
        drawn = _svg(exe, dot_text)  # (before anything is printed: a failure prints nothing)
        _report(outcomes, lambda: output.text_out(drawn))
        return
    _report(outcomes, lambda: output.text_out(dot_text))


@cli.command()
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=2.0,
              show_default=True, metavar="SECONDS", help="Time between refreshes.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              metavar="N", help="Show the N busiest resources.")
@click.option("--once", is_flag=True,
              help="Print one frame and exit (scripts; --json implies it).")
@connection_options
def top(s: Settings, interval_s: float, limit: int, once: bool) -> None:
    """The busiest resources, refreshed in place: the first view for a stuck lock.

    Rows, busiest first (most requests not granted, then the longest wait, then most
    holders): resource path, granted locks (owner:mode), converting (owner:old>new),
    waiting (count, owner:mode), the oldest wait (from its ticket, the requester's clock),
    the smallest lease left of a holder, DIVERGENT where instances disagree. Header:
    namespace, time, instances reachable and recovering. Ctrl-C or SIGTERM exit 0.
    --once (or --json) prints one frame; it exits 1 if fewer than a quorum answered.
    """
    targets = s.targets()
    if once or s.as_json:
        snap = admin.top(targets, s.namespace)
        _report(list(snap.instances), lambda: output.top(snap, limit, s.as_json))
        return
    stop = threading.Event()
    with _stop_on_signals(stop), output.top_live(limit) as show:
        while not stop.is_set():
            show(admin.top(targets, s.namespace))
            stop.wait(interval_s)


@cli.command("detector")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.01), default=1.0,
              show_default=True, metavar="SECONDS", help="Time between scans.")
@click.option("--rounds", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop after this many rounds (0: run until SIGTERM/SIGINT).")
@click.option("--reap-every", type=click.IntRange(min=0), default=20, show_default=True,
              help="Reap stale waiter-index entries every N rounds (0: never).")
@click.option("--verbose", "-v", is_flag=True, help="Log every round, not only events.")
@click.option("--lead/--always", "lead", default=True, show_default=True,
              help="Take part in leader election (several detectors may run; the one "
                   "holding __leader__/detector acts) or act unconditionally.")
@click.option("--lease", "lease_ms", type=click.IntRange(100, 86_400_000), default=5_000,
              show_default=True, metavar="MS",
              help="Lease of the leadership lock: a dead leader is replaced within it.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Serve Prometheus metrics at http://ADDR:PORT/metrics (needs "
                   "prometheus-client: pip install 'redlockdlm[metrics]').")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address the metrics server listens on (0.0.0.0: every interface).")
@connection_options
def detector_cmd(s: Settings, interval_s: float, rounds: int, reap_every: int,
                 verbose: bool, lead: bool, lease_ms: int, metrics_port: int | None,
                 metrics_addr: str) -> None:
    """Run the deadlock detector: scan every --interval, confirm each cycle on a second
    scan, cancel one victim per cycle (its client raises Deadlock). Logs one key=value line
    per event to stderr (--json: JSON lines). SIGTERM or SIGINT stop it after the current
    round (exit 0).

    Several detectors may run for one namespace: one leads at a time by holding the lock
    __leader__/detector of this DLM; when it dies another takes over within --lease.

    With --metrics-port, the rounds, cycles, victims, waiting requests and per-instance
    scan latency (and the leadership client's own lock metrics) are served for Prometheus;
    the names are in docs/operations.md ("Metrics").
    """
    output.setup_logging(s.as_json, verbose)
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        if metrics_port is not None:
            stack.callback(metrics.serve(metrics_port, metrics_addr))
            logging.getLogger("redlockdlm.detector").info(
                "event=metrics url=http://%s:%d/metrics", metrics_addr, metrics_port)
        leader = None
        if lead:
            dlm = stack.enter_context(DLM(list(s.urls), s.namespace, lease_ms=lease_ms,
                                          socket_timeout=s.timeout_s,
                                          connect_timeout=s.timeout_s))
            leader = Leadership(dlm)
        stack.enter_context(_stop_on_signals(stop))
        det = stack.enter_context(Detector(s.targets(), s.namespace, interval_s,
                                           timeout_s=s.timeout_s, reap_every=reap_every,
                                           leader=leader))
        det.run_forever(stop, max_rounds=rounds or None)


@cli.command("init")
@click.option("--fresh", is_flag=True, required=True,
              help="Mark brand-new instances safe at once (skip the rejoin delay, E1).")
@click.option("--force", is_flag=True,
              help="Also mark instances that are recovering or were used (DANGEROUS: only "
                   "if no lock was held on them before they restarted).")
@click.option("--rejoin-ms", type=click.IntRange(0, 86_400_000), metavar="MS",
              help="Also store this rejoin wait (E1): at least the longest lease any client "
                   "will use (raised only, as `dlm rejoin-wait`).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
def init_cmd(s: Settings, fresh: bool, force: bool, rejoin_ms: int | None, yes: bool) -> None:
    """Mark brand-new instances safe to grant at once (rule E1).

    A fresh instance cannot tell "new" from "restarted after losing its locks", so it
    grants nothing for the rejoin delay after its first use. Run this once on instances
    you know are new; NEVER on one that may have held locks before a restart. An instance
    already used (its epoch was created by a lock request: it is recovering, or was) is
    refused (exit 1, naming it and why) unless --force; one already marked fresh is left
    as it is. With --rejoin-ms, the rejoin wait is stored at once, so clients with a
    longer lease are refused and a client that re-creates a flushed instance's epoch waits
    at least that long."""
    question = (f"mark {len(s.urls)} instance(s) as brand-new (never used for locks)"
                + (", even those recovering or in use (--force)?" if force else "?"))
    if not yes and not output.confirm(question):
        raise Failed("not confirmed")
    outcomes = admin.fan_out(s.targets(), lambda e: e.init_fresh(rejoin_ms, force=force))
    output.initialized(outcomes, s.as_json)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        refused = any(o.error and o.error.startswith(f"{NotFresh.__name__}:") for o in failed)
        raise Failed("not marked fresh: " + "; ".join(f"{o.label} {o.error}" for o in failed)
                     + (" (--force overrides, only if it never held a lock before its "
                        "restart)" if refused else ""))


@cli.command()
@click.option("-n", "--instances", "n", type=click.IntRange(1, 99), default=3,
              show_default=True, help="How many redis-server processes.")
@click.option("--port-base", type=click.IntRange(1, 65535), metavar="PORT",
              help="Use ports PORT, PORT+1, ... (default: free ports).")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS", help="Stop after this long (default: at Ctrl-C/SIGTERM).")
@click.option("--json", "as_json", is_flag=True, help="Print {urls, pids, env} as JSON.")
def dev(n: int, port_base: int | None, duration_s: float | None, as_json: bool) -> None:
    """Start a local development cluster: N redis-server processes on 127.0.0.1, marked
    safe at once. Prints DLM_REDIS=... for your shell; stops them at Ctrl-C or SIGTERM."""
    stop = threading.Event()
    deadline = None if duration_s is None else time.monotonic() + duration_s
    with _stop_on_signals(stop), DevCluster(n, port_base=port_base) as cluster:
        output.dev_started(cluster, as_json, duration_s)
        while not stop.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            stop.wait(0.5 if left is None else min(0.5, left))
    output.dev_stopped()


cli.add_command(run)
cli.add_command(demo)
@cli.command()
@connection_options
def sweep(s: Settings) -> None:
    """Purge resources whose locks all expired and that no call touched since (their
    holders died). Lock-holding keys have no TTL (an eviction policy cannot take them), so
    run this now and then (cron) where clients die without releasing."""
    outcomes = admin.sweep(s.targets())
    _report(outcomes, lambda: output.swept(outcomes, s.as_json))


@cli.command("rejoin-wait")
@click.argument("rejoin_ms", type=click.IntRange(0, 86_400_000), metavar="MS")
@connection_options
def rejoin_wait(s: Settings, rejoin_ms: int) -> None:
    """Raise every instance's rejoin wait (rule E1) to MS milliseconds: at least the
    longest lease any client of the deployment uses. Never lowers it. Clients refuse a
    lease longer than an instance's wait; run this before starting clients with longer
    leases, and restart clients started before it (they remember the old wait for the
    epochs they re-create after a restart without data)."""
    outcomes = admin.fan_out(s.targets(), lambda e: e.raise_rejoin(rejoin_ms))
    output.initialized(outcomes, s.as_json, what="rejoin-wait")
    if any(not o.ok for o in outcomes):
        raise Failed("some instances could not be updated")


cli.add_command(acl)


if __name__ == "__main__":  # pragma: no cover
    cli(prog_name="dlm")
