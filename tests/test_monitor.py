"""Fault specs, the progress board, and the choice of the failing rank, without launching ranks."""

from __future__ import annotations

import pytest
import torch.multiprocessing as torch_mp

from moe_lab.faults import FaultSpec, FaultSpecError, check_fault_rank, parse_fault
from moe_lab.monitor import (
    ERROR,
    EXITED,
    OK,
    SILENT,
    ProgressBoard,
    RankMonitor,
    RankProgress,
    RankState,
    find_failure,
)


def test_fault_parses_all_keys():
    fault = parse_fault(" rank=1, phase=dispatch ,kind=hang,path=alltoall,seconds=2.5")
    assert fault == FaultSpec(rank=1, phase="dispatch", kind="hang", path="alltoall", seconds=2.5)
    assert parse_fault("") is None
    assert parse_fault(None) is None


@pytest.mark.parametrize("text,message", [
    ("rank=1,phase=dispatch", "is missing kind"),
    ("rank=1,phase=dispatch,kind=explode", "unknown kind 'explode'; choose one of raise, kill, hang"),
    ("rank=1,phase=gate,kind=raise", "unknown phase 'gate'; choose one of setup, metadata"),
    ("rank=one,phase=dispatch,kind=raise", "rank must be an integer >= 0, got 'one'"),
    ("rank=-1,phase=dispatch,kind=raise", "rank must be an integer >= 0, got -1"),
    ("rank=1,phase=dispatch,kind=raise,when=now", "invalid item 'when=now'"),
    ("rank=1;phase=dispatch", "is missing phase, kind"),
    ("rank=1,phase=dispatch,kind=raise,seconds=3", "seconds='3' is invalid; it sets how long kind=hang sleeps"),
    ("rank=1,phase=dispatch,kind=hang,seconds=-1", "must be a number >= 0"),
])
def test_fault_rejected(text, message):
    with pytest.raises(FaultSpecError, match=message):
        parse_fault(text)


def test_fault_rank_outside_run():
    with pytest.raises(FaultSpecError, match="rank=2 does not exist in a run of 2 ranks; choose a rank from 0 to 1"):
        check_fault_rank(parse_fault("rank=2,phase=dispatch,kind=raise"), 2)
    check_fault_rank(parse_fault("rank=1,phase=dispatch,kind=raise"), 2)


def test_monitor_fires_once_on_match():
    monitor = RankMonitor(1, fault=parse_fault("rank=1,phase=combine,kind=raise,path=alltoall"))
    monitor.set_path("allreduce")
    monitor.enter_phase("combine")  # another path: no fault
    monitor.exit_phase()
    monitor.set_path("alltoall")
    with pytest.raises(RuntimeError, match="injected fault rank=1,phase=combine,kind=raise,path=alltoall at alltoall/combine"):
        monitor.enter_phase("combine")
    monitor.enter_phase("combine")  # fired already


def test_monitor_ignores_other_rank_fault():
    monitor = RankMonitor(0, fault=parse_fault("rank=1,phase=dispatch,kind=raise"))
    monitor.enter_phase("dispatch")
    assert monitor.label == "dispatch"


def test_board_round_trip():
    board = ProgressBoard(torch_mp.get_context("spawn"), 3)
    monitor = RankMonitor(2, board)
    monitor.set_path("alltoall")
    monitor.enter_phase("dispatch")
    monitor.enter_collective("all_to_all_single of tokens")
    progress = board.read(2)
    assert progress.collectives == 1
    assert progress.label == "alltoall/dispatch"
    assert progress.collective == "all_to_all_single of tokens"
    assert board.read(0).collectives == 0
    assert board.read(0).label == "setup"


def _state(rank, status, collectives, order=0, in_collective=None, text="", last_seen=100.0):
    progress = RankProgress(collectives, f"alltoall/dispatch-{rank}", "all_to_all_single of tokens", last_seen)
    return RankState(
        rank, status, progress, phase=f"phase-{rank}", text=text, in_collective=in_collective,
        reported_at=200.0 + order, order=order,
    )


def test_failure_error_outside_collective_wins():
    states = [
        _state(0, ERROR, 5, order=1, in_collective="barrier", text="RuntimeError: connection closed"),
        _state(1, ERROR, 4, order=2, text="ValueError: bad split"),
    ]
    failure = find_failure(states, timeout_s=5, now=300.0)
    assert failure.rank == 1
    assert failure.phase == "phase-1"
    assert failure.message == "ValueError: bad split"
    assert not failure.silent


def test_failure_silent_rank_behind():
    states = [
        _state(0, ERROR, 7, order=1, in_collective="all_reduce of tokens", text="RuntimeError: Timed out waiting 5000ms"),
        _state(1, SILENT, 6, last_seen=293.0),
    ]
    failure = find_failure(states, timeout_s=5, now=300.0)
    assert failure.rank == 1
    assert failure.silent
    assert failure.phase == "alltoall/dispatch-1"
    assert failure.failed_at == 293.0
    assert "stopped responding: no progress for 7.0 s, after entering collective #6" in failure.message
    assert "raise the collective timeout (now 5 s)" in failure.message
    assert "Rank 0 waited for it in collective #7 (all_reduce of tokens) and failed: RuntimeError: Timed out" in failure.message


def test_failure_dead_rank_beats_echo():
    states = [
        _state(0, ERROR, 3, order=1, in_collective="barrier", text="RuntimeError: Connection reset by peer"),
        _state(1, EXITED, 3, order=2, text="killed by signal SIGKILL"),
        _state(2, OK, 9),
    ]
    failure = find_failure(states, timeout_s=5, now=300.0)
    assert failure.rank == 1
    assert failure.message.startswith("killed by signal SIGKILL. Rank 0 waited for it")


def test_failure_dead_beats_silent_at_same_progress():
    states = [_state(0, SILENT, 2), _state(1, EXITED, 2, order=1, text="exited with code 1 without a result")]
    assert find_failure(states, timeout_s=5, now=300.0).rank == 1


def test_failure_all_ranks_in_same_collective():
    states = [
        _state(0, ERROR, 4, order=2, in_collective="all_reduce of tokens", text="RuntimeError: timeout"),
        _state(1, ERROR, 4, order=1, in_collective="all_reduce of tokens", text="RuntimeError: timeout"),
    ]
    gloo = find_failure(states, timeout_s=5, now=300.0, backend="gloo")
    assert gloo.rank == 1  # reported first
    assert "no rank was behind: the collective itself failed or hung" in gloo.message
    assert "NCCL_P2P_DISABLE" not in gloo.message
    nccl = find_failure(states, timeout_s=5, now=300.0, backend="nccl")
    assert "NCCL_P2P_DISABLE=1 (compare --no-p2p)" in nccl.message


def test_read_while_rank_mid_write():
    """A rank paused between the two sequence increments must not break the parent's read."""
    board = ProgressBoard(torch_mp.get_context("spawn"), 2)
    board.write(1, 3, "alltoall/dispatch", "all_to_all_single of tokens")
    board.slots[1].seq += 1  # as if the rank stopped halfway through its next write
    progress = board.read(1)
    assert progress.collectives == 3
    assert progress.label == "alltoall/dispatch"
