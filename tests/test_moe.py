"""The MoE math, placement and routing sources, in one process."""

from __future__ import annotations

import json

import pytest
import torch

from moe_lab.config import PRESETS, ConfigError, MoEConfig, load_hf_config, resolve_config
from moe_lab.moe import gate, grouped_expert_forward, init_experts, init_gate_weight, swiglu
from moe_lab.routing import Placement, Routing, RoutingError, synthetic_routing, validate_routing
from moe_lab.wire import binomial_children


def test_deepseek_preset_shape():
    cfg = PRESETS["deepseek-v2-lite"]
    assert (cfg.hidden, cfg.moe_intermediate, cfg.n_experts, cfg.top_k, cfg.n_shared_experts) == (2048, 1408, 64, 6, 2)
    assert cfg.scoring_func == "softmax"
    assert cfg.topk_method == "greedy"
    assert cfg.norm_topk_prob is False
    assert cfg.routed_scaling_factor == 1.0


def test_hf_config_loads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 2,
        "num_experts_per_tok": 3, "scoring_func": "softmax", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "topk_method": "greedy",
    }))
    cfg = load_hf_config(path)
    assert (cfg.hidden, cfg.moe_intermediate, cfg.n_experts, cfg.top_k) == (64, 32, 8, 3)
    assert cfg.norm_topk_prob and cfg.routed_scaling_factor == 2.5
    assert resolve_config(str(path)) == cfg


def test_hf_config_group_limited_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "topk_method": "group_limited_greedy", "n_group": 4,
    }))
    with pytest.raises(ConfigError, match="group_limited_greedy"):
        load_hf_config(path)


def test_hf_config_sigmoid_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "scoring_func": "sigmoid",
    }))
    with pytest.raises(ConfigError, match="sigmoid"):
        load_hf_config(path)


def test_top_k_above_experts_rejected():
    with pytest.raises(ConfigError, match="top_k=9 is larger than n_experts=8"):
        MoEConfig(hidden=8, moe_intermediate=8, n_experts=8, top_k=9)


@pytest.mark.parametrize("field", ["hidden", "moe_intermediate", "n_experts", "top_k"])
def test_non_positive_size_rejected(field):
    values = dict(hidden=8, moe_intermediate=8, n_experts=8, top_k=2)
    values[field] = 0
    with pytest.raises(ConfigError, match=f"{field} must be a positive integer, got 0"):
        MoEConfig(**values)


def test_gate_renormalises_and_scales():
    cfg = MoEConfig(hidden=16, moe_intermediate=8, n_experts=8, top_k=3, norm_topk_prob=True, routed_scaling_factor=2.0)
    hidden = torch.randn(5, 16)
    weight = init_gate_weight(cfg, seed=1)
    ids, weights = gate(hidden, weight, cfg)
    scores = torch.softmax(hidden @ weight.T, dim=-1)
    assert torch.equal(ids.sort(dim=1).values, scores.topk(3).indices.sort(dim=1).values)
    torch.testing.assert_close(weights.sum(dim=1), torch.full((5,), 2.0))


def test_gate_without_renormalisation_keeps_softmax():
    cfg = PRESETS["tiny"]
    hidden = torch.randn(4, cfg.hidden)
    weight = init_gate_weight(cfg, seed=0)
    ids, weights = gate(hidden, weight, cfg)
    scores = torch.softmax(hidden @ weight.T, dim=-1)
    torch.testing.assert_close(weights, scores.gather(1, ids))


def test_grouped_forward_matches_row_loop():
    cfg = PRESETS["tiny"]
    experts = init_experts(cfg, list(range(cfg.n_experts)), seed=3, dtype=torch.float32)
    x = torch.randn(20, cfg.hidden)
    expert_of_row = torch.tensor([5, 0, 0, 7, 5, 1, 1, 1, 2, 3, 3, 4, 0, 6, 6, 5, 2, 2, 7, 0])
    out = grouped_expert_forward(x, expert_of_row, experts)
    for row, expert in enumerate(expert_of_row.tolist()):
        expected = swiglu(x[row : row + 1], experts.w_gate[expert], experts.w_up[expert], experts.w_down[expert])
        torch.testing.assert_close(out[row : row + 1], expected)


def test_expert_weights_independent_of_subset():
    cfg = PRESETS["tiny"]
    everything = init_experts(cfg, list(range(8)), seed=5, dtype=torch.float32)
    some = init_experts(cfg, [6, 2], seed=5, dtype=torch.float32)
    assert torch.equal(some.w_up[0], everything.w_up[6])
    assert torch.equal(some.w_down[1], everything.w_down[2])


@pytest.mark.parametrize("kind", ["contiguous", "round_robin"])
def test_placement_covers_every_expert(kind):
    placement = Placement(kind, n_experts=12, world_size=3)
    ids = torch.arange(12)
    for rank in range(3):
        local = placement.local_experts(rank)
        assert placement.owner(torch.tensor(local)).tolist() == [rank] * len(local)
        assert placement.local_index(torch.tensor(local)).tolist() == list(range(len(local)))
    assert sorted(sum((placement.local_experts(r) for r in range(3)), [])) == ids.tolist()


def test_contiguous_needs_divisible_experts():
    with pytest.raises(RoutingError, match="contiguous placement needs n_experts divisible by world_size, got 8 experts on 3 ranks"):
        Placement("contiguous", 8, 3)


def test_fewer_experts_than_ranks_rejected():
    with pytest.raises(RoutingError, match="8 experts cannot be spread over 9 ranks"):
        Placement("round_robin", 8, 9)


def test_local_routing_full_locality():
    cfg = PRESETS["deepseek-v2-lite"]
    placement = Placement("contiguous", 64, 2)
    routing = synthetic_routing("local", cfg, placement, [50, 50], seed=0, locality=1.0)
    for rank, ids in enumerate(routing.topk_ids):
        assert (placement.owner(ids) == rank).all()
    validate_routing(routing, cfg, [50, 50])


def test_local_routing_partial_locality():
    cfg = PRESETS["deepseek-v2-lite"]
    placement = Placement("contiguous", 64, 2)
    routing = synthetic_routing("local", cfg, placement, [2000, 2000], seed=0, locality=0.25)
    share = float((placement.owner(routing.topk_ids[0]) == 0).float().mean())
    assert abs(share - 0.25) < 0.02


def test_skewed_routing_is_skewed():
    cfg = PRESETS["deepseek-v2-lite"]
    placement = Placement("contiguous", 64, 2)
    skewed = synthetic_routing("skewed", cfg, placement, [1000, 1000], seed=0, zipf_exponent=1.2)
    uniform = synthetic_routing("uniform", cfg, placement, [1000, 1000], seed=0)
    validate_routing(skewed, cfg, [1000, 1000])
    validate_routing(uniform, cfg, [1000, 1000])
    top = lambda routing: torch.bincount(torch.cat(routing.topk_ids).flatten(), minlength=64).max().item()
    assert top(skewed) > 3 * top(uniform)


def _routing(ids, weights):
    return Routing([torch.tensor(ids)], [torch.tensor(weights, dtype=torch.float32)])


@pytest.mark.parametrize("ids,weights,message", [
    ([[-1, 2]], [[0.5, 0.5]], "expert id -1, outside 0..7"),
    ([[8, 2]], [[0.5, 0.5]], "expert id 8, outside 0..7"),
    ([[3, 3]], [[0.5, 0.5]], "picks the same expert twice"),
    ([[1, 3]], [[float("nan"), 0.5]], "non-finite weights"),
    ([[1, 3]], [[-0.1, 0.5]], "negative weights"),
    ([[1, 3, 4]], [[0.1, 0.2, 0.7]], r"topk_ids has shape \(1, 3\)"),
])
def test_explicit_routing_rejected(ids, weights, message):
    with pytest.raises(RoutingError, match=message):
        validate_routing(_routing(ids, weights), PRESETS["tiny"], [1])


def test_token_count_mismatch_rejected():
    with pytest.raises(RoutingError, match=r"has shape \(1, 2\) but tokens_per_rank\[0\]=2"):
        validate_routing(_routing([[1, 2]], [[0.5, 0.5]]), PRESETS["tiny"], [2])


@pytest.mark.parametrize("world_size,root,expected", [
    (2, 0, [1, 0]), (3, 0, [2, 0, 0]), (4, 0, [2, 1, 0, 0]), (6, 0, [3, 2, 0, 0, 0, 0]), (4, 2, [0, 0, 2, 1]),
])
def test_gloo_broadcast_tree(world_size, root, expected):
    assert [binomial_children(rank, root, world_size) for rank in range(world_size)] == expected
