"""The decision core with a cluster member, without I/O: commands in the member's per-slot
layout, epochs per (member, slot) (R2 touches only the slot whose epoch changed), one
renewal call per slot, duplicate clusters refused."""

from __future__ import annotations

import pytest

from redlockdlm.engine.codec import LockReply, RenewEntry
from redlockdlm.engine.keys import (
    check_namespace,
    epoch_key,
    key_slot,
    resource_key,
    slot_channel_prefix,
    slot_waiters_key,
)
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.errors import DuplicateInstance
from redlockdlm.protocol import Phase, Session, Vote

NS = "ps"


def granted(epoch: str, token: int = 1) -> LockReply:
    return LockReply(status=Status.GRANTED, epoch=epoch, mode=Mode.EX, token=token, position=0,
                     value=None, version=0, valid=True, wait_ms=-1, extra=0, blockers_count=0,
                     blockers=())


def two_slots() -> tuple[str, str]:
    ns = check_namespace(NS)
    a = "a"
    s = key_slot(resource_key(ns, (a.encode(),)))
    j = 0
    while key_slot(resource_key(ns, (f"b{j}".encode(),))) == s:
        j += 1
    return a, f"b{j}"


def held(core: Session, name: str, epochs: list[str]):
    lk = core.new_lock(name, Mode.EX)
    for i, e in enumerate(epochs):
        core.on_reply(lk, i, granted(e), 0.0, 0.0)
    assert core.try_grant(lk, 0.0) and lk.phase is Phase.HELD
    return lk


def test_commands_take_the_members_layout() -> None:
    core = Session(3, NS)
    assert core.note_cluster(1, ["n1", "n2", "n3"]) is None
    lk = core.new_lock("x", Mode.EX)
    cmd = core.request_cmd(lk)
    assert core.member_call(0, cmd) == cmd  # standalone: unchanged
    name, keys, args = core.member_call(1, cmd)
    s = key_slot(lk.key)
    assert name == "request" and keys[0] == epoch_key(s)
    assert keys[1] == slot_waiters_key(core.ns, s) and keys[2:] == cmd[1][2:]
    assert args[1] == slot_channel_prefix(core.ns, s) and args[2:] == cmd[2][2:]
    assert core.slot_channel(s) == slot_channel_prefix(core.ns, s) + core.owner.encode()


def test_renewal_one_call_per_slot_on_a_cluster_member() -> None:
    core = Session(3, NS)
    core.note_cluster(2, ["n1"])
    a, b = two_slots()
    held(core, a, ["e0", "e1", "c2"])
    held(core, b, ["e0", "e1", "c2"])
    per = {}
    for i, _, lks in core.renew_cmds(1.0):
        per.setdefault(i, []).append(lks)
    assert len(per[0]) == 1 and len(per[1]) == 1  # standalone: one call for both
    assert sorted(len(x) for x in per[2]) == [1, 1]  # cluster: one call per slot


def test_a_new_epoch_of_one_slot_rejoins_only_that_slots_locks() -> None:
    core = Session(3, NS)
    core.distinct_epochs = True
    core.note_cluster(0, ["n1", "n2"])
    a, b = two_slots()
    la = held(core, a, ["sa", "e1", "e2"])
    lb = held(core, b, ["sb", "e1", "e2"])  # other slot, other epoch: not a duplicate
    assert 0 not in core.refused
    absent = RenewEntry(Status.NOTFOUND, None, 0, -1, -1)
    core.on_renew_reply(0, [la], ("sa2", [absent]), 1.0, 1.0)  # a's slot restarted empty
    assert la.votes[0].rejoin and la.votes[0].vote is Vote.ABSENT
    # b's slot kept its epoch: b's vote there is untouched and owes no rejoin
    ok = RenewEntry(Status.GRANTED, Mode.EX, 1, 0, -1)
    core.on_renew_reply(0, [lb], ("sb", [ok]), 1.0, 1.0)
    assert not lb.votes[0].rejoin and lb.votes[0].vote is Vote.GRANTED
    assert core.slot_epochs[0] == {la.slot: "sa2", lb.slot: "sb"}


def test_the_same_cluster_twice_is_refused() -> None:
    core = Session(3, NS)
    assert core.note_cluster(0, ["n1", "n2", "n3"]) is None
    assert core.note_cluster(1, ["m1", "m2"]) is None
    err = core.note_cluster(2, ["n3", "x"])
    assert isinstance(err, DuplicateInstance) and 2 in core.refused


def test_one_slot_epoch_on_two_members_is_refused() -> None:
    core = Session(3, NS)
    core.distinct_epochs = True
    core.note_cluster(0, ["n1"])
    core.note_cluster(1, ["m1"])
    lk = core.new_lock("x", Mode.EX)
    core.on_reply(lk, 0, granted("same"), 0.0, 0.0)
    core.on_reply(lk, 1, granted("same"), 0.0, 0.0)
    assert isinstance(core.refused.get(1), DuplicateInstance)
    assert lk.votes[1].vote is Vote.ERROR


@pytest.mark.parametrize("n", [1, 3])
def test_standalone_epochs_unchanged(n: int) -> None:
    core = Session(n, NS)
    lk = held(core, "s", ["e"] * n)
    assert core.epochs == ["e"] * n and all(not d for d in core.slot_epochs)
    assert lk.phase is Phase.HELD
