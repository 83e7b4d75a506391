"""The observer catches what it is meant to catch: fed made-up histories (no Redis, no
workers), each kind of violation is reported, and a clean history reports none. Without
this, a fault test that finds "0 violations" would prove nothing."""

from __future__ import annotations

import pytest

from .workload import Observer

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(30)]

CR, PR, PW, EX = 1, 3, 4, 5
MS = 1_000_000


def begin(o: Observer, sid: str, lock: str, mode: int, token: int, t0: int, t1: int,
          read: tuple | None = None, res: str = "r", origin: str = "new") -> bool:
    """A section confirmed held from t0 to t1 (ms)."""
    ok = o.handle(("begin", sid, f"w-{lock}", lock, res, mode, token, origin, t0 * MS - 1,
                   t0 * MS, t0 * MS, read))
    o.handle(("valid", sid, t1 * MS))
    o.handle(("end", sid, True))
    return ok


@pytest.fixture
def obs():
    o = Observer()
    yield o
    o.close()


def test_clean_history(obs: Observer) -> None:
    begin(obs, "a", "L1", EX, 10, 0, 10, read=(None, True, 0))
    obs.handle(("lvb", "a", b"1:a", 10 * MS))
    obs.handle(("lvb_done", "a", 11 * MS, True))
    begin(obs, "b", "L2", PR, 20, 12, 20, read=(b"1:a", True, 1))
    begin(obs, "c", "L3", CR, 15, 14, 30, read=(b"1:a", True, 1))  # CR/PR compatible
    rep = obs.check()
    assert rep["violations"] == []
    assert rep["sections"] == 3 and rep["lvb_reads_checked"] == 3


def test_overlap(obs: Observer) -> None:
    begin(obs, "a", "L1", PW, 10, 0, 10)
    begin(obs, "b", "L2", PR, 20, 5, 15)
    v = obs.check()["violations"]
    assert any(x.startswith("overlap") for x in v), v


def test_token_backwards(obs: Observer) -> None:
    begin(obs, "a", "L1", EX, 30, 0, 10)
    begin(obs, "b", "L2", EX, 20, 12, 20)  # later holder, smaller token
    v = obs.check()["violations"]
    assert any(x.startswith("token") for x in v), v
    assert obs.refused == 1  # and the storage refused it


def test_stale_write_refused_and_reported_if_still_valid(obs: Observer) -> None:
    begin(obs, "a", "L1", EX, 10, 0, 5)
    begin(obs, "b", "L2", EX, 20, 10, 12)
    assert obs.handle(("write", "a", b"x", False)) is False  # the paused holder: refused
    assert obs.check()["violations"] == []
    obs.handle(("valid", "a", 13 * MS))  # ... but it still believed it held the lock
    v = obs.check()["violations"]
    assert any(x.startswith("fencing") for x in v), v


def test_stale_write_accepted_counts_as_held(obs: Observer) -> None:
    begin(obs, "b", "L2", EX, 20, 10, 1_000_000_000)  # still held at the write
    begin(obs, "a", "L1", EX, 30, 0, 5)  # a newer token in a stale holder (nonsense)
    obs.handle(("write", "a", b"x", False))
    v = obs.check()["violations"]
    assert any(x.startswith("overlap") for x in v), v


def test_stale_value_read(obs: Observer) -> None:
    begin(obs, "a", "L1", EX, 10, 0, 10)
    obs.handle(("lvb", "a", b"1:a", 10 * MS))
    obs.handle(("lvb_done", "a", 11 * MS, True))
    begin(obs, "b", "L2", EX, 20, 12, 20, read=(b"1:a", True, 1))
    obs.handle(("lvb", "b", b"2:b", 20 * MS))
    obs.handle(("lvb_done", "b", 21 * MS, True))
    begin(obs, "c", "L3", PR, 30, 25, 30, read=(b"1:a", True, 1))  # lost b's write
    begin(obs, "d", "L4", PR, 31, 26, 30, read=(b"1:a", False, 1))  # said so: fine
    v = obs.check()["violations"]
    assert len(v) == 1 and v[0].startswith("value"), v


def test_empty_value_block_only_if_the_resource_may_have_vanished(obs: Observer) -> None:
    begin(obs, "a", "L1", EX, 10, 0, 10)
    obs.handle(("lvb", "a", b"1:a", 10 * MS))
    obs.handle(("lvb_done", "a", 11 * MS, True))
    begin(obs, "b", "L2", PR, 20, 30, 40, read=(None, True, 0))
    assert obs.check()["violations"] == []  # no NL keeper held it meanwhile: G9 may apply
    obs.handle(("keeper", "r", "K1", 5 * MS, "wk"))
    obs.handle(("keeper", "r", "K1", 50 * MS, "wk"))
    v = obs.check()["violations"]
    assert len(v) == 1 and v[0].startswith("value"), v


def test_keeper_must_cover_until_the_read_itself(obs: Observer) -> None:
    """The reader asked while a keeper held the resource, then waited; the keeper went
    (its process stopped) before the grant: the resource may have vanished meanwhile."""
    begin(obs, "a", "L1", EX, 10, 0, 10)
    obs.handle(("lvb", "a", b"1:a", 10 * MS))
    obs.handle(("lvb_done", "a", 11 * MS, True))
    obs.handle(("keeper", "r", "K1", 5 * MS, "wk"))
    obs.handle(("keeper", "r", "K1", 31 * MS, "wk"))
    ok = obs.handle(("begin", "b", "w-L2", "L2", "r", PR, 20, "new", 30 * MS, 40 * MS,
                     40 * MS, (None, True, 0)))
    assert ok and obs.check()["violations"] == []
