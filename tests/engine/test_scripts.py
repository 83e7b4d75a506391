"""How scripts reach an instance (redlockdlm/engine/scripts.py): the Functions library, the
"Function not found" contract every caller follows, and the self-contained EVAL fallback."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import redis
from redis._parsers import Encoder
from redis.connection import PythonRespSerializer
from redis.exceptions import ResponseError

from redlockdlm.engine import codec, scripts
from redlockdlm.engine.instance import Engine, call_script
from redlockdlm.engine.keys import EPOCH_KEY
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.errors import BadArgument, InvalidArgument, InvalidType, MissingKeys, NotOwner
from redlockdlm.wire import Round

NS = "sc"
LEASE = 30_000


def _libraries(c: redis.Redis) -> list[bytes]:
    return [lib[b"library_name"] for lib in c.execute_command("FUNCTION", "LIST")]


def _request_cmd(e: Engine, fn, lid: str, mode: Mode = Mode.EX) -> tuple:
    k = e.key("res")
    return fn("request", [EPOCH_KEY, e.wkey, k, k], codec.request_args(
        30_000, e.chan, "o1", lid, mode, 0, 1, LEASE, "", b"res"))


def test_library_is_one_per_version_and_names_its_functions() -> None:
    lib = scripts.library()
    assert lib.source.startswith(f"#!lua name={lib.name}\n".encode())
    assert set(lib.functions) == set(scripts.SCRIPT_NAMES)
    digest = lib.name.removeprefix("redlockdlm_")
    for name, fn in lib.functions.items():
        assert fn == f"dlm_{digest}_{name}".encode()
    assert scripts.command("yield", [b"k"], [b"a"]) == ("FCALL", lib.functions["yield"], 1,
                                                      b"k", b"a")
    assert scripts.load_command() == ("FUNCTION", "LOAD", "REPLACE", lib.source)


def test_empty_instance_gets_the_library_on_first_call(redis_server) -> None:
    c = redis_server.client()
    assert _libraries(c) == []
    e = Engine(c, NS)
    e.init_fresh()
    assert _libraries(c) == [scripts.library().name.encode()]
    assert e.request(e.key("res"), "o1", "a", Mode.EX, ticket=1,
                     lease_ms=LEASE).status == Status.GRANTED
    c.execute_command("FUNCTION", "FLUSH")  # as after a restart with an empty data set
    assert e.release(e.key("res"), "o1", "a").status == Status.RELEASED
    assert _libraries(c) == [scripts.library().name.encode()]


def test_is_missing(redis_server) -> None:
    c = redis_server.client()
    e = Engine(c, NS)
    with pytest.raises(ResponseError) as info:
        c.execute_command(*_request_cmd(e, scripts.command, "a"))
    assert scripts.is_missing(info.value)
    assert scripts.is_missing("ERR Function not found")
    assert scripts.is_missing(b"ERR Function not found")
    assert scripts.is_missing("Function not found")
    assert not scripts.is_missing("DLM_BADARG mode must be an integer 0..5")
    assert not scripts.is_missing(ResponseError("NOSCRIPT No matching script"))
    # a pipelined caller: load, then the same command, in one round trip
    p = c.pipeline(transaction=False)
    p.execute_command(*scripts.load_command())
    p.execute_command(*_request_cmd(e, scripts.command, "a"))
    loaded, raw = p.execute()
    assert loaded == scripts.library().name.encode()
    assert codec.parse_lock_reply(raw).status == Status.RECOVERING  # new epoch (E1)


def test_fallback_needs_nothing_loaded_and_answers_alike(redis_server) -> None:
    c = redis_server.client()
    e = Engine(c, NS, rejoin_ms=0)
    c.execute_command(*scripts.fallback("init", [EPOCH_KEY], [b"fresh"]))
    c.execute_command(*scripts.fallback("init", [EPOCH_KEY], [b"clock", b"1000000", b"0"]))
    a = codec.parse_lock_reply(c.execute_command(*_request_cmd(e, scripts.fallback, "a")))
    assert _libraries(c) == []
    assert (a.status, a.mode) == (Status.GRANTED, Mode.EX)
    b = codec.parse_lock_reply(c.execute_command(*_request_cmd(e, scripts.fallback, "b")))
    assert (b.status, b.position, b.blockers) == (Status.QUEUED, 0,
                                                  (codec.Blocker("o1", "a", Mode.EX),))
    # the library sees the same state, and answers a repeated request alike (G12)
    b2 = codec.parse_lock_reply(call_script(c, "request", *_request_cmd(e, _split, "b")))
    assert b2 == b
    with pytest.raises(ResponseError, match="^DLM_BADARG"):
        c.execute_command(*scripts.fallback("init", [EPOCH_KEY], [b"nonsense"]))


def _split(name: str, keys: list[bytes], args: list[bytes]) -> tuple:
    return keys, args


def test_call_script_uses_the_fallback_where_functions_are_refused(redis_server) -> None:
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "nofn", "on", ">pw", "~*", "&*", "+@all",
                          "-function")
    c = redis.Redis(host=admin.connection_pool.connection_kwargs["host"],
                    port=admin.connection_pool.connection_kwargs["port"],
                    username="nofn", password="pw")
    e = Engine(c, NS)
    assert e.init_fresh().recovering_ms == 0
    assert e.request(e.key("res"), "o1", "a", Mode.PR, ticket=1,
                     lease_ms=LEASE).status == Status.GRANTED
    assert _libraries(admin) == []
    with pytest.raises(BadArgument):
        e.request(e.key("res"), "o1", "b", Mode.PR, ticket=1, lease_ms=0)
    c.close()


def test_state_does_not_leak_between_calls(w_engine) -> None:
    """A Functions library keeps its upvalues between calls: a call that fails half way
    (after loading resources) must not leave anything for the next one."""
    c, e = w_engine
    k = e.key("res")
    assert e.request(k, "o1", "a", Mode.EX, ticket=1, lease_ms=LEASE).status == Status.GRANTED
    with pytest.raises(NotOwner):  # fails after loading the resource
        e.release(k, "o2", "a")
    before = e.inspect([k])
    rep = e.request(e.key("other"), "o2", "b", Mode.EX, ticket=2, lease_ms=LEASE)
    assert rep.status == Status.GRANTED
    assert e.inspect([k])[1] == before[1]
    assert e.release(k, "o1", "a").status == Status.RELEASED


@pytest.fixture
def w_engine(r: redis.Redis):
    e = Engine(r, NS)
    e.init_fresh()
    e.set_clock(frozen_ms=1_000_000)
    return r, e


def test_a_resource_changed_behind_the_library_is_read_anew(w_engine) -> None:
    """core.lua keeps the tables it last wrote, to skip decoding the same bytes again: a
    value written by anyone else, or a key deleted, must be read as it is."""
    c, e = w_engine
    k, other = e.key("res"), e.key("other")
    assert e.request(k, "o1", "a", Mode.EX, ticket=1, lease_ms=LEASE).status == Status.GRANTED
    assert e.request(other, "o2", "b", Mode.PR, ticket=2, lease_ms=LEASE).status == Status.GRANTED
    assert e.request(k, "o3", "x", Mode.NL, ticket=3, lease_ms=LEASE).status == Status.GRANTED
    c.set(k, c.get(other))  # `res` now holds what `other` holds: b, no a, no x
    assert e.release(k, "o1", "a").status == Status.NOTFOUND
    assert [lk.lock_id for lk in e.inspect([k])[1][0].locks] == ["b"]
    assert e.request(k, "o3", "y", Mode.CR, ticket=4, lease_ms=LEASE).status == Status.GRANTED
    c.delete(k)
    assert e.release(k, "o3", "y").status == Status.NOTFOUND
    assert e.inspect([k])[1] == [None]


def test_packed_command_is_what_redis_py_would_send() -> None:
    ser = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    cases = [([EPOCH_KEY], []), ([b"k", b""], [b"v" * 70_000, b"", b"1\r\n"]), ([], [b"a"] * 40),
             ([b"k"], ["s\u00e9", 12, bytearray(b"x"), 1.5])]
    for keys, args in cases:
        for name in ("request", "init"):
            want = b"".join(ser.pack(*scripts.command(name, keys, args)))
            assert scripts.packed_command(name, keys, args) == want


def test_engine_keeps_one_pooled_connection_and_gives_it_back(r: redis.Redis) -> None:
    e = Engine(r, NS)
    e.init_fresh()
    pool = r.connection_pool
    k = e.key("res")
    assert e.request(k, "o1", "a", Mode.EX, ticket=1, lease_ms=LEASE).status == Status.GRANTED
    assert len(pool._in_use_connections) == 1  # the Engine's, between calls
    assert e.release(k, "o1", "a").status == Status.RELEASED
    assert len(pool._in_use_connections) == 1
    with pytest.raises(NotOwner):  # an error reply keeps the connection usable
        e.request(k, "o1", "b", Mode.EX, ticket=2, lease_ms=LEASE) and e.release(k, "o2", "b")
    assert len(pool._in_use_connections) == 1
    e.close()
    assert len(pool._in_use_connections) == 0
    assert e.release(k, "o1", "b").status == Status.RELEASED  # usable after close()
    del e
    gc.collect()
    assert len(pool._in_use_connections) == 0  # given back when collected


def test_engine_reconnects_when_the_server_closed_its_idle_connection(redis_server) -> None:
    """As the pool checks a connection it hands out: one closed by the server meanwhile is
    replaced before the command is sent, even without retries."""
    c = redis_server.client()  # (the harness: no retries)
    e = Engine(c, NS)
    e.init_fresh()
    k = e.key("res")
    assert e.request(k, "o1", "a", Mode.EX, ticket=1, lease_ms=LEASE).status == Status.GRANTED
    admin = redis_server.client()
    assert admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") >= 1
    assert e.release(k, "o1", "a").status == Status.RELEASED
    c.close()
    admin.close()


def test_engine_threads_never_share_a_connection(r: redis.Redis) -> None:
    e = Engine(r, NS)
    e.init_fresh()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            k = e.key(f"res{t}")
            for i in range(200):
                lid = f"t{t}-{i}"
                rep = e.request(k, "o1", lid, Mode.EX, ticket=i, lease_ms=LEASE)
                assert rep.status == Status.GRANTED, rep
                assert e.release(k, "o1", lid).status == Status.RELEASED
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


class _Str(str):
    pass


class _Int(int):
    pass


class _Bytes(bytes):
    pass


def test_argument_builders_fast_and_checked_paths_agree() -> None:
    """request_args/convert_args/release_args take a fast path when every argument has its
    exact usual type; subclasses take the checked path. Both must build the same ARGV."""
    for owner, lid, pid, ticket in (("o1", "a", "", 0), ("o-2", "x.y:z", "p", 2**53 - 1)):
        fast = codec.request_args(30_000, b"ch", owner, lid, Mode.PW, 16, ticket, LEASE, pid,
                                  b"n\x00m", -7)
        assert fast == codec.request_args(_Int(30_000), _Bytes(b"ch"), _Str(owner), _Str(lid),
                                          _Int(4), _Int(16), _Int(ticket), _Int(LEASE),
                                          _Str(pid), _Bytes(b"n\x00m"), _Int(-7))
        assert fast[10] == b"-7"
        assert fast[4] == b"4"
        fast = codec.convert_args(30_000, b"ch", owner, lid, Mode.NL, 4, ticket, LEASE, None,
                                  7, 64, ticket, 3)
        assert fast == codec.convert_args(_Int(30_000), b"ch", _Str(owner), _Str(lid), _Int(0),
                                          _Int(4), _Int(ticket), _Int(LEASE), None, _Int(7),
                                          _Int(64), _Int(ticket), _Int(3))
        fast = codec.release_args(30_000, b"ch", owner, lid, 32, None, 7, 64, ticket)
        assert fast == codec.release_args(_Int(30_000), b"ch", _Str(owner), _Str(lid), _Int(32),
                                          None, _Int(7), _Int(64), _Int(ticket))
    for bad in (True, 1.0, "1"):
        with pytest.raises(InvalidType):
            codec.request_args(30_000, b"ch", "o", "a", Mode.EX, 0, bad, LEASE, "", b"")
        with pytest.raises(InvalidType):
            codec.release_args(30_000, b"ch", "o", "a", 0, None, 0, 64, bad)
    with pytest.raises(InvalidArgument):
        codec.request_args(30_000, b"ch", "\udc80", "a", Mode.EX, 0, 1, LEASE, "", b"")


def test_remembered_valid_arguments_never_let_an_invalid_one_through(w_engine) -> None:
    """core.lua remembers the last string found valid for each argument between calls;
    ranges are still checked on every call, and a different string is checked anew."""
    c, e = w_engine
    k = e.key("res")
    args = codec.request_args(30_000, e.chan, "o1", "a", Mode.EX, 0, 1, LEASE, "", b"res")
    keys = [EPOCH_KEY, e.wkey, k, k]
    assert codec.parse_lock_reply(call_script(c, "request", keys, args)).status == Status.GRANTED
    for i, bad in ((7, b"1x"), (7, b""), (2, b"o 1"), (3, b"a" * 65), (0, b"-1")):
        with pytest.raises(BadArgument):
            call_script(c, "request", keys, args[:i] + [bad] + args[i + 1:])
    for _ in range(2):  # '0' is digits (remembered) but out of range for lease_ms, each time
        with pytest.raises(BadArgument):
            call_script(c, "request", keys, args[:7] + [b"0"] + args[8:])
    for _ in range(2):  # a priority out of range, after a valid one
        with pytest.raises(BadArgument):
            call_script(c, "request", keys, args[:10] + [b"2147483648"])
    with pytest.raises(MissingKeys):  # KEYS[4] differs from KEYS[3]: checked on its own
        call_script(c, "request", keys[:3] + [b"dlm:{other:x"], args)
    assert codec.parse_lock_reply(call_script(c, "request", keys, args)).status == Status.GRANTED


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_uses_the_parents_kept_connection(r: redis.Redis) -> None:
    e = Engine(r, NS)
    e.init_fresh()
    k = e.key("res")
    assert e.request(k, "o1", "a", Mode.EX, ticket=1, lease_ms=LEASE).status == Status.GRANTED
    parent_conn = e._link.spare[0]
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if it used a connection of its own
        code = 1
        try:
            if not e._link.spare:
                rep = e.request(e.key("child"), "o2", "c", Mode.EX, ticket=2, lease_ms=LEASE)
                if rep.status == Status.GRANTED and e._link.spare[0] is not parent_conn:
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert e._link.spare == [parent_conn]
    assert e.release(k, "o1", "a").status == Status.RELEASED  # the parent's is intact


def test_round_resends_only_the_calls_that_met_a_missing_library() -> None:
    """The contract as one decision (`wire.Round`): calls whose reply says the library is
    missing did nothing and are sent again after one load, as FCALL if the load worked and
    as the EVAL form if it was refused; the other replies stand, and a call still missing
    after the load is not sent a third time."""
    calls = [("init", [EPOCH_KEY], [b"status"]), ("scan", [EPOCH_KEY], []),
             ("inspect", [EPOCH_KEY], [])]
    gone = ResponseError("Function not found")
    for load_reply, form in ((b"OK", scripts.command),
                             (ResponseError("NOPERM no FUNCTION"), scripts.fallback)):
        rnd = Round(calls)
        assert rnd.feed([gone, b"kept", gone]) == [scripts.load_command()]
        assert rnd.feed([load_reply]) == [form(*calls[0]), form(*calls[2])]
        assert rnd.feed([b"first", gone]) is None
        assert rnd.raws == [b"first", b"kept", gone]
    done = Round(calls)
    assert done.feed([b"a", ResponseError("DLM_BADARG x"), b"c"]) is None  # nothing to resend


def test_the_common_outcomes_answer_a_short_lock_reply(w_engine) -> None:
    """docs/protocol.md, "Lock reply": a grant without a value block to report answers 4
    fields, a grant with one 7, a release or NOTFOUND 3; each parses to what the 11-field
    layout with the omitted fields at their defaults parses to."""
    c, e = w_engine
    k = e.key("short")
    keys = [EPOCH_KEY, e.wkey, k, k]

    def call(name: str, args: list) -> list:
        return call_script(c, name, keys, args)

    def full(raw: list, status: int, mode: int, token: int, pos: int, value, version: int,
             invalid: int, extra: int) -> None:
        assert codec.parse_lock_reply(raw) == codec.parse_lock_reply(
            [status, raw[1], mode, token, pos, value, version, invalid, -1, extra, 0])

    g = call("request", codec.request_args(30_000, e.chan, "o1", "a", Mode.PW, 0, 1, LEASE,
                                           "", b"short"))
    assert len(g) == 4 and g[0] == Status.GRANTED  # (the fast path: a lone lock)
    full(g, Status.GRANTED, Mode.PW, g[3], 0, None, 0, 0, 0)
    rel = call("release", codec.release_args(30_000, e.chan, "o1", "a", 0, b"v0", 2, 64, 0))
    assert len(rel) == 3
    full(rel, Status.RELEASED, -1, 0, -1, None, 0, 0, 1)
    keep = call("request", codec.request_args(30_000, e.chan, "o1", "k", Mode.NL, 0, 2, LEASE,
                                              "", b"short"))
    assert len(keep) == 4
    full(keep, Status.GRANTED, Mode.NL, keep[3], 0, None, 0, 0, 0)
    g = call("request", codec.request_args(30_000, e.chan, "o1", "a", Mode.PW, 0, 3, LEASE,
                                           "", b"short"))
    assert len(g) == 7  # (the full path: no value block, the version of the one that went)
    full(g, Status.GRANTED, Mode.PW, g[3], 0, None, 2, 0, 0)
    rel = call("release", codec.release_args(30_000, e.chan, "o1", "a", 0, b"v1", 3, 64, 0))
    assert len(rel) == 3
    full(rel, Status.RELEASED, -1, 0, -1, None, 0, 0, 1)
    g = call("request", codec.request_args(30_000, e.chan, "o1", "b", Mode.PR, 0, 4, LEASE,
                                           "", b"short"))
    assert len(g) == 7 and g[4] == b"v1"
    full(g, Status.GRANTED, Mode.PR, g[3], 0, b"v1", 3, 0, 0)
    _, entries = e.renew("o1", LEASE, [(k, "b", 0)])  # (renew reads the grant's short form)
    assert (entries[0].status, entries[0].position, entries[0].wait_ms) == (Status.GRANTED, 0, -1)
    nf = call("release", codec.release_args(30_000, e.chan, "o1", "zz", 0, None, 0, 64, 0))
    assert len(nf) == 3
    full(nf, Status.NOTFOUND, -1, 0, -1, None, 0, 0, 0)
    with pytest.raises(Exception, match="unexpected lock reply"):
        codec.parse_lock_reply([0, b"e", 1, 2, 3])
