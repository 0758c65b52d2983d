"""The DeepSeek-V2 MoE math: gate, SwiGLU experts, shared experts and the single-process reference.

Nothing here depends on ranks or collectives, so the reference and every communication path
run exactly the same expert code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import MoEConfig

# Independent random streams: a rank that draws only its own experts gets the same values as
# the reference that draws all of them.
STREAM_GATE, STREAM_EXPERT, STREAM_SHARED, STREAM_HIDDEN, STREAM_ROUTING = range(1, 6)


def make_generator(seed: int, stream: int, index: int = 0) -> torch.Generator:
    mixed = (seed * 0x9E3779B1 + stream * 1_000_003 + index * 7919) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


@dataclass
class ExpertWeights:
    """The routed experts one rank holds, stacked in local order."""

    expert_ids: list[int]  # global id of local expert i
    w_gate: torch.Tensor  # (n_local, I, H)
    w_up: torch.Tensor  # (n_local, I, H)
    w_down: torch.Tensor  # (n_local, H, I)

    @property
    def n_local(self) -> int:
        return len(self.expert_ids)


@dataclass
class SharedExpertWeights:
    """The shared experts, fused into one SwiGLU of width n_shared_experts * moe_intermediate."""

    w_gate: torch.Tensor  # (I_shared, H)
    w_up: torch.Tensor  # (I_shared, H)
    w_down: torch.Tensor  # (H, I_shared)


def init_gate_weight(cfg: MoEConfig, seed: int) -> torch.Tensor:
    """Draw the router weight, (n_experts, H) in float32 as DeepSeek-V2 computes its gate."""
    return _normal((cfg.n_experts, cfg.hidden), cfg.hidden**-0.5, make_generator(seed, STREAM_GATE))


def init_experts(cfg: MoEConfig, expert_ids: list[int], seed: int, dtype: torch.dtype) -> ExpertWeights:
    """Draw the weights of the given routed experts; expert e's values do not depend on the others."""
    H, I = cfg.hidden, cfg.moe_intermediate
    gates, ups, downs = [], [], []
    for expert in expert_ids:
        generator = make_generator(seed, STREAM_EXPERT, expert)
        gates.append(_normal((I, H), H**-0.5, generator).to(dtype))
        ups.append(_normal((I, H), H**-0.5, generator).to(dtype))
        downs.append(_normal((H, I), I**-0.5, generator).to(dtype))
    if not expert_ids:
        empty = torch.empty(0, I, H, dtype=dtype)
        return ExpertWeights([], empty, empty.clone(), torch.empty(0, H, I, dtype=dtype))
    return ExpertWeights(list(expert_ids), torch.stack(gates), torch.stack(ups), torch.stack(downs))


def init_shared_experts(cfg: MoEConfig, seed: int, dtype: torch.dtype) -> SharedExpertWeights | None:
    if cfg.n_shared_experts == 0:
        return None
    H, I = cfg.hidden, cfg.shared_intermediate
    generator = make_generator(seed, STREAM_SHARED)
    return SharedExpertWeights(
        _normal((I, H), H**-0.5, generator).to(dtype),
        _normal((I, H), H**-0.5, generator).to(dtype),
        _normal((H, I), I**-0.5, generator).to(dtype),
    )


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x of shape (N, H)."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def shared_expert_forward(x: torch.Tensor, shared: SharedExpertWeights | None) -> torch.Tensor | None:
    if shared is None:
        return None
    return swiglu(x, shared.w_gate, shared.w_up, shared.w_down)


def grouped_expert_forward(
    x: torch.Tensor, local_expert: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """Run each row of x through its local expert, one matmul chain per expert.

    x is (N, H) and local_expert (N,) contains indices into `experts`. Rows are sorted by expert
    so each expert sees one contiguous block; the result comes back in the input's row order.
    An expert with no rows is skipped.
    """
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out

    # Sort rows by expert: expert-major layout [e0 rows | e1 rows | ...].
    order = torch.argsort(local_expert, stable=True)
    counts = torch.bincount(local_expert, minlength=experts.n_local).tolist()  # host sync
    x_sorted = x[order]

    # One SwiGLU per expert on its block of rows.
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        y_sorted[rows] = swiglu(x_sorted[rows], experts.w_gate[e], experts.w_up[e], experts.w_down[e])
        start += count

    out[order] = y_sorted
    return out


def gate(hidden: torch.Tensor, gate_weight: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (topk_ids (T, k) int64, topk_weights (T, k) float32) as DeepSeek-V2's MoEGate does."""
    scores = torch.softmax(hidden.float() @ gate_weight.float().T, dim=-1)  # (T, E)
    topk_weights, topk_ids = torch.topk(scores, k=cfg.top_k, dim=-1, sorted=False)
    if cfg.top_k > 1 and cfg.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, topk_weights * cfg.routed_scaling_factor


def reference_forward(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: ExpertWeights,
    shared: SharedExpertWeights | None,
) -> torch.Tensor:
    """The MoE layer in one process with every expert: the output each path must reproduce.

    hidden (T, H); topk_ids and topk_weights (T, k); `experts` must hold all routed experts in
    global order. Weighted sums accumulate in float32 and the result is cast to hidden's dtype.
    """
    T, k = topk_ids.shape
    token = torch.arange(T).repeat_interleave(k)  # (T*k,)
    expert = topk_ids.reshape(-1).long()
    y = grouped_expert_forward(hidden[token], expert, experts)  # (T*k, H)

    out = torch.zeros(T, hidden.shape[1], dtype=torch.float32)
    out.index_add_(0, token, y.float() * topk_weights.reshape(-1, 1).float())
    shared_out = shared_expert_forward(hidden, shared)
    if shared_out is not None:
        out += shared_out.float()
    return out.to(hidden.dtype)
