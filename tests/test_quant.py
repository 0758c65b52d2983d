"""Block-scaled fp8 rows."""

from __future__ import annotations

import torch

from moe_lab.bytes_model import dispatch_row_bytes
from moe_lab.paths.base import PathOptions
from moe_lab.quant import BLOCK, FP8_DTYPE, dequantize_blockwise, quantize_blockwise
from moe_lab.workload import WorkloadSpec, build_workload


def test_round_trip_within_fp8_rounding():
    x = torch.randn(5, 300) * torch.logspace(-3, 3, 300)  # channels of very different sizes
    q, scales = quantize_blockwise(x)
    assert q.dtype == FP8_DTYPE
    assert q.shape == (5, 300)
    assert scales.shape == (5, 3)  # ceil(300 / 128)
    back = dequantize_blockwise(q, scales, torch.float32)
    block_max = torch.nn.functional.pad(x.abs(), (0, 84)).view(5, 3, BLOCK).amax(dim=2).repeat_interleave(BLOCK, dim=1)[:, :300]
    assert ((back - x).abs() <= block_max / 16 + 1e-30).all()  # 3 mantissa bits: half a step is 1/16


def test_zero_rows():
    q, scales = quantize_blockwise(torch.empty(0, 64))
    assert q.shape == (0, 64)
    assert scales.shape == (0, 1)
    assert dequantize_blockwise(q, scales, torch.bfloat16).shape == (0, 64)


def test_fp8_row_bytes_deepseek():
    workload = build_workload(WorkloadSpec(tokens=1))
    fp8 = dispatch_row_bytes(workload, PathOptions(dispatch_dtype="fp8"))
    bf16 = dispatch_row_bytes(workload, PathOptions(dispatch_dtype="bfloat16"))
    assert (fp8, bf16) == (2048 + 16 * 4, 4096)
    assert fp8 / bf16 <= 0.53
