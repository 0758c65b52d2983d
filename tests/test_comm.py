"""The recording communicator on dtypes gloo cannot handle natively."""

from __future__ import annotations

import pytest
import torch

from moe_lab.comm import RecordingComm
from moe_lab.launch import run_ranks


def float8_collectives(ctx) -> dict:
    """Send float8 through every collective on 2 gloo ranks; report what arrived or what was raised."""
    comm = RecordingComm(device=ctx.device)
    x = (torch.tensor([0.5, -1.0, 2.0]) * (ctx.rank + 1)).to(torch.float8_e4m3fn)
    report = {"all_gather": comm.all_gather(x, what="tokens").float().tolist()}
    report["all_to_all"] = comm.all_to_all_single(x[:2], [1, 1], [1, 1]).float().tolist()
    for op, call in (("all_reduce", lambda: comm.all_reduce(x.clone())), ("reduce_scatter", lambda: comm.reduce_scatter(x[:2]))):
        try:
            call()
        except TypeError as err:
            report[op] = str(err)
    return report


@pytest.fixture(scope="module")
def float8_reports():
    return run_ranks(float8_collectives, world_size=2, backend="gloo", timeout_s=30)


def test_float8_sent_as_raw_bytes(float8_reports):
    rank0, rank1 = float8_reports
    assert rank0["all_gather"] == [0.5, -1.0, 2.0, 1.0, -2.0, 4.0]
    assert rank1["all_gather"] == rank0["all_gather"]
    assert rank0["all_to_all"] == [0.5, 1.0]
    assert rank1["all_to_all"] == [-1.0, -2.0]


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
def test_float8_sum_rejected(float8_reports, op):
    for report in float8_reports:
        assert report[op].startswith(f"{op} cannot sum float8_e4m3fn tensors on gloo, which has no float8 kernels")
        assert "raw bytes only where nothing is summed" in report[op]
