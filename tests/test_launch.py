"""The launcher: a failing rank stops the others and leaves no process behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from moe_lab.compare import CompareOptions, run_compare
from moe_lab.errors import InputError
from moe_lab.launch import RankError, _sigint_ignored, run_ranks
from moe_lab.workload import WorkloadSpec


def raise_on_rank_one(ctx):
    if ctx.rank == 1:
        raise ValueError("injected failure")
    dist.barrier()  # rank 0 waits here for a rank that will never come
    return ctx.rank


def echo_rank(ctx, offset):
    return ctx.rank + offset


def report_sigint_ignored(results):
    results.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def child_pids() -> list[int]:
    """Live child processes, less multiprocessing's resource tracker (one per parent, by design)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) != os.getpid() or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"resource_tracker" not in f.read():
                    pids.append(int(entry))
    return pids


def test_results_in_rank_order():
    assert run_ranks(echo_rank, (10,), world_size=3, backend="gloo") == [10, 11, 12]


def test_failing_rank_stops_all():
    started = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(raise_on_rank_one, world_size=2, backend="gloo", timeout_s=60)
    elapsed = time.monotonic() - started
    assert info.value.rank == 1
    assert "rank 1 failed" in str(info.value)
    assert "ValueError: injected failure" in str(info.value)
    assert "raise_on_rank_one" in info.value.remote_traceback
    assert elapsed < 30  # far below the 60 s collective timeout: rank 0 is stopped, not waited for
    assert not multiprocessing.active_children()
    assert child_pids() == []


# -- injected faults: the run ends within the collective timeout + 10 s, naming the right rank ---

FAULT_TIMEOUT_S = 4.0  # short collective timeout, so a hang is detected quickly


def run_with_fault(fault: str):
    """Run compare on the tiny preset with MOE_LAB_FAULT set; return the error and seconds from failure to error."""
    options = CompareOptions(
        spec=WorkloadSpec(preset="tiny", tokens=(5, 3)), repeats=1, warmup=0,
        timeout_s=FAULT_TIMEOUT_S, env=(("MOE_LAB_FAULT", fault),),
    )
    with pytest.raises(RankError) as info:
        run_compare(options)
    return info.value, time.time() - info.value.failed_at


@pytest.mark.parametrize("fault,rank,phase,fragments", [
    ("rank=1,phase=dispatch,kind=raise", 1, "allreduce/dispatch",
     ["InjectedFault: injected fault rank=1,phase=dispatch,kind=raise at allreduce/dispatch", "--- traceback of rank 1 ---"]),
    ("rank=1,phase=dispatch,kind=kill", 1, "allreduce/dispatch",
     ["killed by signal SIGKILL", "Rank 0 waited for it in collective #3 (all_reduce of tokens)"]),
    ("rank=1,phase=dispatch,kind=hang", 1, "allreduce/dispatch",
     ["stopped responding", "Rank 0 waited for it in collective #3 (all_reduce of tokens)", "Timed out",
      "--- stack of rank 1 when it was stopped ---", "in inject"]),
    ("rank=1,phase=setup,kind=hang", 1, "setup",
     ["stopped responding", "before joining the process group", "in collective #1 (init_process_group)"]),
    ("rank=1,phase=result,kind=hang", 1, "result", ["stopped responding", "--- stack of rank 1 when it was stopped ---"]),
    ("rank=0,phase=combine,kind=raise,path=alltoall", 0, "alltoall/combine", ["InjectedFault"]),
])
def test_fault_ends_run(fault, rank, phase, fragments):
    err, seconds = run_with_fault(fault)
    assert err.rank == rank
    assert err.phase == phase
    assert f"rank {rank} failed in phase {phase!r}" in str(err)
    for fragment in fragments:
        assert fragment in str(err)
    assert seconds < FAULT_TIMEOUT_S + 10
    assert not multiprocessing.active_children()
    assert child_pids() == []


def test_bad_fault_rejected_before_start():
    options = CompareOptions(spec=WorkloadSpec(preset="tiny"), env=(("MOE_LAB_FAULT", "rank=3,phase=dispatch,kind=raise"),))
    with pytest.raises(InputError, match="rank=3 does not exist in a run of 2 ranks"):
        run_compare(options)


# -- Ctrl-C: every rank stops ---------------------------------------------------------------


def rank_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if ppid == parent and b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
                pids.append(int(entry))
    return pids


def test_ranks_start_ignoring_sigint():
    """Ranks inherit SIG_IGN, so Python never installs its Ctrl-C handler in them, even while importing."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with _sigint_ignored():
        child = context.Process(target=report_sigint_ignored, args=(results,))
        child.start()
    assert results.get(timeout=60) is True
    child.join()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("target,delay_s", [("parent", 1.5), ("process_group", 1.5), ("process_group", 0.0)])
def test_ctrl_c_stops_every_rank(tmp_path, target, delay_s):
    """A notebook interrupt signals the parent only; Ctrl-C in a terminal signals the whole group.

    With no delay the ranks are still importing torch, where a SIGINT of their own would end
    them with a traceback.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "moe_lab", "compare", "--preset", "tiny", "--repeats", "1000000", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(rank_pids(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = rank_pids(process.pid)
        assert len(ranks) == 2
        time.sleep(delay_s)
        if target == "parent":
            os.kill(process.pid, signal.SIGINT)
        else:
            os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert "moe_lab: interrupted; all ranks were stopped" in err
    assert "Traceback" not in err
    for pid in ranks:
        assert not os.path.exists(f"/proc/{pid}"), f"rank process {pid} survived"
