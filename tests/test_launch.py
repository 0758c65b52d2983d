"""The launcher: a failing rank stops the others and leaves no process behind."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch.distributed as dist

from moe_lab.launch import RankError, run_ranks


def raise_on_rank_one(ctx):
    if ctx.rank == 1:
        raise ValueError("injected failure")
    dist.barrier()  # rank 0 waits here for a rank that will never come
    return ctx.rank


def echo_rank(ctx, offset):
    return ctx.rank + offset


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
