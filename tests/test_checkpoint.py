"""Real weights: a tiny DeepSeek-V2 checkpoint saved by transformers, read by moe_lab, run on every path.

Every output is compared with transformers' own DeepseekV2 MoE module on the same hidden states.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moe_lab.checkpoint import CheckpointError, open_checkpoint, open_checkpoint_layer, snapshot_identity
from moe_lab.cli import main
from moe_lab.compare import TOLERANCE, local_layer, reference_output
from moe_lab.errors import InputError
from moe_lab.paths import PATHS, get_path
from moe_lab.workload import WorkloadSpec, build_workload

from conftest import CASES_DIR, FAKE_REVISION, hf_specs
from moe_lab.tiny_snapshot import MOE_LAYERS, TINY_CONFIG

FLOAT32_TOLERANCE = 1e-5  # max |moe_lab - transformers| / max |transformers|


def relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return float((output.float() - expected.float()).abs().max() / expected.float().abs().max())


def transformers_moe(model, layer: int, hidden: torch.Tensor, ids=None, weights=None) -> torch.Tensor:
    """transformers' DeepseekV2 MoE block on (T, H) hidden states: its own gate, or the given routing."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        if ids is None:
            return mlp(hidden.float().unsqueeze(0)).squeeze(0)
        routed = mlp.experts(hidden.float(), ids.long(), weights.float())
        return routed + mlp.shared_experts(hidden.float())


def path_output(result, path: str) -> torch.Tensor:
    """The whole batch's output of one path: rank 0's copy, or every rank's rows in rank order."""
    path_result = next(p for p in result.paths if p.path == path)
    if get_path(path).holds_whole_batch:
        return path_result.rank_outputs[0]
    return torch.cat(path_result.rank_outputs)


# ---- the snapshot on disk ----


def test_snapshot_is_per_expert(tiny_snapshots):
    for kind in ("sharded", "spread"):
        index = json.loads((tiny_snapshots[kind] / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(index.values())) > 3
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in index
        assert "model.layers.1.mlp.shared_experts.up_proj.weight" in index
    spread = json.loads((tiny_snapshots["spread"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({spread[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"] for e in range(8)}) > 1


def test_config_defaults_filled(tiny_snapshots):
    raw = json.loads((tiny_snapshots["single"] / "config.json").read_text())
    # transformers 5 leaves these keys out of the config.json it writes.
    assert "scoring_func" not in raw
    assert "moe_layer_freq" not in raw
    checkpoint = open_checkpoint(tiny_snapshots["single"])
    cfg = checkpoint.cfg
    assert (cfg.hidden, cfg.moe_intermediate, cfg.n_experts, cfg.top_k, cfg.n_shared_experts) == (32, 16, 8, 2, 2)
    assert cfg.scoring_func == "softmax"
    assert cfg.topk_method == "greedy"
    assert cfg.routed_scaling_factor == 1.5
    assert checkpoint.moe_layers == list(MOE_LAYERS)


def test_revision_from_download_metadata(tiny_snapshots):
    checkpoint = open_checkpoint(tiny_snapshots["single"])
    assert checkpoint.name == "tiny-deepseek-v2"
    assert checkpoint.revision == FAKE_REVISION
    assert open_checkpoint(tiny_snapshots["sharded"]).revision is None


def test_revision_from_hub_cache_layout(tmp_path):
    folder = tmp_path / "models--deepseek-ai--DeepSeek-V2-Lite" / "snapshots" / "604d5664dddd88a0433dbae533b7fe9472482de0"
    folder.mkdir(parents=True)
    assert snapshot_identity(folder) == ("deepseek-ai/DeepSeek-V2-Lite", "604d5664dddd88a0433dbae533b7fe9472482de0")


def test_weights_equal_transformers(tiny_snapshots, tiny_model):
    I = TINY_CONFIG["moe_intermediate_size"]
    for kind in ("single", "sharded", "spread"):
        checkpoint = open_checkpoint(tiny_snapshots[kind])
        for layer in MOE_LAYERS:
            mlp = tiny_model.model.layers[layer].mlp
            experts = checkpoint.experts(layer, [6, 1], torch.float32)
            assert torch.equal(checkpoint.gate_weight(layer), mlp.gate.weight)
            for position, expert in enumerate([6, 1]):
                assert torch.equal(experts.w_gate[position], mlp.experts.gate_up_proj[expert][:I])
                assert torch.equal(experts.w_up[position], mlp.experts.gate_up_proj[expert][I:])
                assert torch.equal(experts.w_down[position], mlp.experts.down_proj[expert])
            shared = checkpoint.shared_experts(layer, torch.float32)
            assert torch.equal(shared.w_gate, mlp.shared_experts.gate_proj.weight)
            assert torch.equal(shared.w_down, mlp.shared_experts.down_proj.weight)


def test_rank_reads_only_its_experts(tiny_snapshots, monkeypatch):
    from moe_lab.checkpoint import Checkpoint

    reads = []
    original = Checkpoint.read

    def recording_read(self, names):
        reads.extend(names)
        return original(self, names)

    folder = tiny_snapshots["spread"]
    workload = build_workload(WorkloadSpec(checkpoint=str(folder), layer=2, tokens=(3, 3)))
    monkeypatch.setattr(Checkpoint, "read", recording_read)
    layer = local_layer(workload, 1, torch.device("cpu"))
    assert layer.experts.expert_ids == [4, 5, 6, 7]
    experts_read = {name.split(".")[5] for name in reads if ".experts." in name}
    assert experts_read == {"4", "5", "6", "7"}
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({weight_map[name] for name in reads}) > 1  # the rank's share came from several shards
    assert all(name.startswith("model.layers.2.mlp.") for name in reads)
    assert len(reads) == 4 * 3 + 3  # three projections per local expert, plus the shared experts


# ---- moe_lab's reference against transformers ----


@pytest.mark.parametrize("layer", MOE_LAYERS)
def test_reference_matches_transformers(tiny_snapshots, tiny_model, layer):
    workload = build_workload(WorkloadSpec(checkpoint=str(tiny_snapshots["single"]), layer=layer, tokens=(9, 7)))
    hidden = torch.cat(workload.hidden)
    expected = transformers_moe(tiny_model, layer, hidden)
    assert relative_error(reference_output(workload), expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("layer", MOE_LAYERS)
def test_gate_matches_transformers(tiny_snapshots, tiny_model, layer):
    workload = build_workload(WorkloadSpec(checkpoint=str(tiny_snapshots["single"]), layer=layer, tokens=(9, 7)))
    ids, weights = workload.routing.concat()
    with torch.no_grad():
        _, hf_weights, hf_ids = tiny_model.model.layers[layer].mlp.gate(torch.cat(workload.hidden))
    hf_sorted, hf_order = hf_ids.sort(dim=1)
    kit_sorted, kit_order = ids.sort(dim=1)
    assert torch.equal(hf_sorted, kit_sorted)
    assert torch.allclose(hf_weights.gather(1, hf_order), weights.gather(1, kit_order), rtol=0, atol=1e-6)


# ---- every path on 2 ranks against transformers ----

HF_LABELS = ["gate-layer1-sharded", "gate-layer2-spread", "gate-layer2-round_robin", "uniform-layer2", "trace-layer2-checkpoint", "trace-layer1-seeded", "trace-layer2-bfloat16"]


@pytest.mark.parametrize("label", HF_LABELS)
@pytest.mark.parametrize("path", list(PATHS))
def test_path_matches_reference_on_checkpoint(hf_results, label, path):
    result = hf_results[label]
    path_result = next(p for p in result.paths if p.path == path)
    assert path_result.passed, f"{path} on {label}: error {path_result.error:.3g} > {TOLERANCE[result.workload.dtype]}"


@pytest.mark.parametrize("label", ["gate-layer1-sharded", "gate-layer2-spread", "gate-layer2-round_robin", "trace-layer2-checkpoint"])
@pytest.mark.parametrize("path", list(PATHS))
def test_path_matches_transformers_gate(hf_results, tiny_model, label, path):
    """Routing from the checkpoint's gate (live or recorded): the whole transformers MoE block."""
    result = hf_results[label]
    hidden = torch.cat(result.workload.hidden)
    expected = transformers_moe(tiny_model, result.workload.layer, hidden)
    assert relative_error(path_output(result, path), expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("path", list(PATHS))
def test_path_matches_transformers_experts(hf_results, tiny_model, path):
    """Synthetic routing on real weights: transformers' experts and shared experts on the same routing."""
    result = hf_results["uniform-layer2"]
    ids, weights = result.workload.routing.concat()
    expected = transformers_moe(tiny_model, 2, torch.cat(result.workload.hidden), ids, weights)
    assert relative_error(path_output(result, path), expected) <= FLOAT32_TOLERANCE


def test_checkpoint_workload_metadata(hf_results):
    workload = hf_results["gate-layer1-sharded"].workload
    assert workload.layer == 1
    assert workload.checkpoint.endswith("tiny-deepseek-v2-sharded")
    assert workload.source == "gate of tiny-deepseek-v2-sharded layer 1"
    assert workload.extra["checkpoint_name"] == "tiny-deepseek-v2-sharded"


# ---- folders the kit rejects ----


def copy_snapshot(source, tmp_path):
    return shutil.copytree(source, tmp_path / source.name, ignore=shutil.ignore_patterns(".cache"))


def rewrite_tensor(folder, file_name: str, name: str, value: torch.Tensor | None) -> None:
    """Rewrite one safetensors file with tensor `name` replaced, or dropped when value is None."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / file_name
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(path), metadata=metadata)


def shard_of(folder, name: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def rejection(folder, layer: int = 1) -> str:
    with pytest.raises(CheckpointError) as info:
        build_workload(WorkloadSpec(checkpoint=str(folder), layer=layer, tokens=2))
    return str(info.value)


def test_missing_shard_rejected(tiny_snapshots, tmp_path):
    folder = copy_snapshot(tiny_snapshots["sharded"], tmp_path)
    tensor = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = shard_of(folder, tensor)
    (folder / shard).unlink()
    message = rejection(folder)
    assert f"shard {shard!r}" in message
    assert "is missing" in message
    assert "model.layers.1.mlp." in message


def test_tensor_missing_from_index_rejected(tiny_snapshots, tmp_path):
    folder = copy_snapshot(tiny_snapshots["sharded"], tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.5.down_proj.weight"]
    index_path.write_text(json.dumps(index))
    message = rejection(folder)
    assert "tensor 'model.layers.1.mlp.experts.5.down_proj.weight' is missing" in message
    assert "'model.safetensors.index.json' does not list it" in message


def test_tensor_missing_from_shard_rejected(tiny_snapshots, tmp_path):
    folder = copy_snapshot(tiny_snapshots["sharded"], tmp_path)
    tensor = "model.layers.2.mlp.shared_experts.gate_proj.weight"
    shard = shard_of(folder, tensor)
    rewrite_tensor(folder, shard, tensor, None)
    message = rejection(folder, layer=2)
    assert f"tensor {tensor!r} is missing from {shard!r}" in message


def test_tensor_missing_from_single_file_rejected(tiny_snapshots, tmp_path):
    folder = copy_snapshot(tiny_snapshots["single"], tmp_path)
    rewrite_tensor(folder, "model.safetensors", "model.layers.1.mlp.gate.weight", None)
    message = rejection(folder)
    assert "tensor 'model.layers.1.mlp.gate.weight' is missing" in message
    assert "'model.safetensors'" in message


def test_wrong_shape_rejected(tiny_snapshots, tmp_path):
    folder = copy_snapshot(tiny_snapshots["sharded"], tmp_path)
    tensor = "model.layers.1.mlp.experts.7.gate_proj.weight"
    shard = shard_of(folder, tensor)
    rewrite_tensor(folder, shard, tensor, torch.zeros(16, 31))
    message = rejection(folder)
    assert f"tensor {tensor!r} in {shard!r} has shape [16, 31]" in message
    assert "config.json gives [16, 32]" in message


def test_bad_folder_exits_2_via_cli(tiny_snapshots, tmp_path, capsys):
    folder = copy_snapshot(tiny_snapshots["sharded"], tmp_path)
    shard = shard_of(folder, "model.layers.2.mlp.gate.weight")
    (folder / shard).unlink()
    code = main(["compare", "--checkpoint", str(folder), "--layer", "2", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"moe_lab: error: shard {shard!r}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("changes,message", [
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}, "group-limited top-k (n_group=4, topk_group=2)"),
    ({"scoring_func": "sigmoid"}, "scores experts with 'sigmoid'"),
    ({"model_type": "deepseek_v3"}, "model_type 'deepseek_v3'"),
    ({"num_experts_per_tok": 9}, "top_k=9 is larger than n_experts=8"),
    ({"moe_layer_freq": 2}, "layer 1 of checkpoint"),
])
def test_unsupported_config_rejected(tiny_snapshots, tmp_path, changes, message):
    folder = copy_snapshot(tiny_snapshots["single"], tmp_path)
    edit_config(folder, **changes)
    assert message in rejection(folder)


def test_group_limited_keeping_all_groups_accepted(tiny_snapshots, tmp_path):
    folder = copy_snapshot(tiny_snapshots["single"], tmp_path)
    edit_config(folder, topk_method="group_limited_greedy", n_group=4, topk_group=4)
    assert open_checkpoint(folder).cfg.topk_method == "greedy"


@pytest.mark.parametrize("layer,message,hint", [
    (0, "layer 0 of checkpoint", "is a dense MLP layer"),
    (3, "layer 3 is outside checkpoint", "which has 3 layers"),
])
def test_dense_or_absent_layer_rejected(tiny_snapshots, layer, message, hint):
    text = rejection(tiny_snapshots["single"], layer=layer)
    assert message in text
    assert hint in text
    assert "1, 2" in text  # the MoE layers to choose from


def test_moe_layer_freq_respected(tiny_snapshots, tmp_path):
    folder = copy_snapshot(tiny_snapshots["single"], tmp_path)
    edit_config(folder, moe_layer_freq=2)
    checkpoint, layer = open_checkpoint_layer(folder)
    assert checkpoint.moe_layers == [2]
    assert layer == 2


def test_folder_without_weights_rejected(tmp_path, tiny_snapshots):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(tiny_snapshots["single"] / "config.json", folder)
    assert "has neither model.safetensors nor model.safetensors.index.json" in rejection(folder)


def test_json_routing_file_with_checkpoint_rejected(tiny_snapshots):
    spec = WorkloadSpec(routing_file=str(CASES_DIR / "idle_rank.json"), checkpoint=str(tiny_snapshots["single"]))
    with pytest.raises(InputError, match="is a JSON routing file"):
        build_workload(spec)


def test_specs_stay_small(tiny_snapshots, tiny_trace):
    import pickle

    for spec in hf_specs(tiny_snapshots, tiny_trace).values():
        assert len(pickle.dumps(spec)) < 1024
