"""Helpers for the notebooks: quick mode, and small pictures of the layer and its placement.

Quick mode (`MOE_LAB_QUICK=1`, set by the test suite) shrinks sizes so every notebook runs in
CI; readers get the full sizes by default.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import torch

from .routing import Placement, Routing


def quick_mode() -> bool:
    """True when MOE_LAB_QUICK=1: notebooks use small sizes."""
    return os.environ.get("MOE_LAB_QUICK", "0") == "1"


def pick(full, quick):
    """`quick` in quick mode, else `full`."""
    return quick if quick_mode() else full


def expert_load(routing: Routing, n_experts: int) -> torch.Tensor:
    """(ranks, n_experts) int64: how many of each rank's tokens picked each expert."""
    return torch.stack([torch.bincount(ids.reshape(-1).long(), minlength=n_experts) for ids in routing.topk_ids])


def plot_expert_load(routing: Routing, placement: Placement, title: str = ""):
    """Bar chart of tokens per expert, stacked by the rank the tokens come from, with the expert
    owners shaded: shows which rank holds which experts and where its work comes from."""
    load = expert_load(routing, placement.n_experts)  # (ranks, E)
    owner = placement.owner_table()
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for rank in range(placement.world_size):
        for expert in placement.local_experts(rank):
            ax.axvspan(expert - 0.5, expert + 0.5, color=colours(rank), alpha=0.15, linewidth=0)
    bottom = torch.zeros(placement.n_experts)
    for rank in range(load.shape[0]):
        ax.bar(range(placement.n_experts), load[rank], bottom=bottom, color=colours(rank), label=f"tokens of rank {rank}")
        bottom += load[rank]
    ax.set_xlabel("expert (background: shaded by the rank that holds it)")
    ax.set_ylabel("tokens routed")
    ax.set_xlim(-0.5, placement.n_experts - 0.5)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or f"Expert load, {placement.kind} placement on {placement.world_size} ranks "
                 f"(experts on rank 0: {owner.eq(0).sum().item()})")
    fig.tight_layout()
    return fig


def local_share(routing: Routing, placement: Placement) -> list[float]:
    """Per rank, the share of its (token, expert) pairs whose expert is on that same rank."""
    shares = []
    for rank, ids in enumerate(routing.topk_ids):
        shares.append(float((placement.owner(ids) == rank).float().mean()) if ids.numel() else float("nan"))
    return shares
