"""Block-scaled fp8 (e4m3) for token rows: one float32 scale per token per block of channels.

A row of H channels becomes H bytes of fp8 plus ceil(H / block) float32 scales. With H = 2048
and blocks of 128 that is 2048 + 64 bytes against 4096 in bfloat16: 0.516x.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448 for e4m3
BLOCK = 128  # channels per scale, as DeepSeek-V3's fp8 activations use


def n_blocks(hidden: int, block: int = BLOCK) -> int:
    return math.ceil(hidden / block)


def quantize_blockwise(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (q (N, H) fp8 e4m3, scales (N, ceil(H/block)) float32) with x ~= q * scale per block."""
    rows, hidden = x.shape
    blocks = n_blocks(hidden, block)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * block - hidden)).view(rows, blocks, block)
    scales = padded.abs().amax(dim=2).clamp(min=1e-12) / FP8_MAX  # (N, blocks)
    q = (padded / scales.unsqueeze(2)).to(FP8_DTYPE).view(rows, blocks * block)[:, :hidden]
    return q.contiguous(), scales


def dequantize_blockwise(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, block: int = BLOCK) -> torch.Tensor:
    """Inverse of `quantize_blockwise`, to `dtype`."""
    rows, hidden = q.shape
    blocks = scales.shape[1]
    padded = torch.nn.functional.pad(q.float(), (0, blocks * block - hidden)).view(rows, blocks, block)
    return (padded * scales.unsqueeze(2)).view(rows, blocks * block)[:, :hidden].to(dtype)
