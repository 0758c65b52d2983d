"""Routing traces of the tiny DeepSeek-V2 model: recording, replay on every path, and expert-load statistics."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from moe_lab.cli import main
from moe_lab.expert_load import format_trace_stats, plot_trace_stats, total_sent_bytes, trace_stats
from moe_lab.moe import gate
from moe_lab.paths import PATHS
from moe_lab.record import routing_of_gate_output, split_paragraphs
from moe_lab.trace import TraceError, is_trace_file, open_trace, save_trace, split_tokens
from moe_lab.workload import WorkloadSpec, build_workload

from conftest import FAKE_REVISION, TRACE_TEXT
from moe_lab.tiny_snapshot import build_tokenizer

TRACE_TOKENS = 37  # TRACE_TEXT's three paragraphs: 17 + 8 + 12 words


def captured_moe_blocks(model, sequences):
    """Input and output of every MoE block (model.layers.L.mlp), from hooks on the blocks, not the gates."""
    captured = {1: ([], []), 2: ([], [])}
    handles = []

    def hook_for(inputs, outputs):
        def hook(module, args, output):
            inputs.append(args[0][0])  # (S, H) of the batch's one sequence
            outputs.append(output[0])

        return hook

    for layer, (inputs, outputs) in captured.items():
        handles.append(model.model.layers[layer].mlp.register_forward_hook(hook_for(inputs, outputs)))
    try:
        with torch.no_grad():
            for sequence in sequences:
                model(input_ids=torch.tensor([sequence]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (torch.cat(inputs), torch.cat(outputs)) for layer, (inputs, outputs) in captured.items()}


def test_split_tokens():
    assert split_tokens(37, 2) == [19, 18]
    assert split_tokens(5, 3) == [2, 2, 1]
    assert split_tokens(2, 4) == [1, 1, 0, 0]
    assert split_tokens(0, 2) == [0, 0]


def test_split_paragraphs():
    assert split_paragraphs("a b\nc\n\n \n\nd\n\n") == ["a b\nc", "d"]


# ---- recording ----


def test_trace_metadata(tiny_trace):
    trace = open_trace(tiny_trace)
    assert is_trace_file(tiny_trace)
    assert trace.moe_layers == [1, 2]
    assert trace.hidden_state_layers == [2]
    assert trace.n_tokens == TRACE_TOKENS
    assert trace.metadata["sequence_lengths"] == [17, 8, 12]
    assert trace.metadata["checkpoint"]["name"] == "tiny-deepseek-v2"
    assert trace.metadata["checkpoint"]["revision"] == FAKE_REVISION
    assert trace.metadata["text"]["sha256"] == hashlib.sha256(TRACE_TEXT.encode()).hexdigest()
    assert trace.metadata["model_dtype"] == "float32"
    assert trace.cfg.top_k == 2
    assert trace.cfg.routed_scaling_factor == 1.5


def test_trace_tokens_from_snapshot_tokenizer(tiny_trace):
    tokenizer = build_tokenizer()
    expected = [token for paragraph in split_paragraphs(TRACE_TEXT) for token in tokenizer(paragraph)["input_ids"]]
    assert open_trace(tiny_trace).load().input_ids.tolist() == expected


def test_trace_routing_is_transformers_routing(tiny_trace, tiny_model):
    trace = open_trace(tiny_trace).load()
    lengths = trace.metadata["sequence_lengths"]
    sequences = [part.tolist() for part in trace.input_ids.split(lengths)]
    blocks = captured_moe_blocks(tiny_model, sequences)
    for layer in (1, 2):
        block_input, _ = blocks[layer]
        with torch.no_grad():
            _, weights, ids = tiny_model.model.layers[layer].mlp.gate(block_input)
        assert torch.equal(trace.topk_ids[layer], ids)
        assert torch.equal(trace.topk_weights[layer], weights)


def test_trace_hidden_states_are_block_input(tiny_trace, tiny_model):
    trace = open_trace(tiny_trace).load()
    sequences = [part.tolist() for part in trace.input_ids.split(trace.metadata["sequence_lengths"])]
    block_input, block_output = captured_moe_blocks(tiny_model, sequences)[2]
    assert torch.equal(trace.hidden_states[2], block_input)
    with torch.no_grad():
        replayed = tiny_model.model.layers[2].mlp(trace.hidden_states[2].unsqueeze(0)).squeeze(0)
    # One batch of all tokens against one forward per sequence: equal up to float32 rounding.
    assert float((replayed - block_output).abs().max()) <= 1e-6 * float(block_output.abs().max())


def test_kit_gate_reproduces_trace(tiny_trace, tiny_model):
    trace = open_trace(tiny_trace)
    assert all(check["mismatched_tokens"] == 0 for check in trace.metadata["gate_check"].values())
    ids, weights = trace.routing(2)
    kit_ids, kit_weights = gate(trace.hidden_states(2), tiny_model.model.layers[2].mlp.gate.weight.detach(), trace.cfg)
    sorted_ids, order = ids.sort(dim=1)
    kit_sorted, kit_order = kit_ids.sort(dim=1)
    assert torch.equal(sorted_ids, kit_sorted)
    assert torch.allclose(weights.gather(1, order), kit_weights.gather(1, kit_order), rtol=0, atol=1e-6)


def test_gate_output_layouts():
    ids = torch.tensor([[3, 1], [0, 2]])
    weights = torch.tensor([[0.6, 0.3], [0.5, 0.4]])
    logits = torch.randn(2, 4)
    for output in ((logits, weights, ids), (ids, weights, None)):  # transformers 5, DeepSeek's own code
        got_ids, got_weights = routing_of_gate_output(output, top_k=2)
        assert torch.equal(got_ids, ids)
        assert torch.equal(got_weights, weights)
    with pytest.raises(TraceError, match="expected an integer and a float tensor"):
        routing_of_gate_output((logits,), top_k=2)


# ---- replay ----


def test_replay_splits_contiguous_blocks(hf_results, tiny_trace):
    trace = open_trace(tiny_trace)
    workload = hf_results["trace-layer2-checkpoint"].workload
    assert workload.layer == 2
    assert workload.tokens_per_rank == [19, 18]
    ids, weights = workload.routing.concat()
    assert torch.equal(ids, trace.routing(2)[0])
    assert torch.equal(weights, trace.routing(2)[1])
    assert torch.equal(torch.cat(workload.hidden), trace.hidden_states(2))
    assert workload.source == "trace tiny-deepseek-v2 layer 2, recorded hidden states"
    assert workload.extra["trace_checkpoint"]["revision"] == FAKE_REVISION


def test_replay_without_hidden_states_draws_tokens(hf_results, tiny_trace):
    workload = hf_results["trace-layer1-seeded"].workload
    assert workload.checkpoint is None
    assert workload.placement.kind == "round_robin"
    assert workload.tokens_per_rank == [19, 18]
    assert torch.equal(workload.routing.concat()[0], open_trace(tiny_trace).routing(1)[0])


def test_replay_token_counts(tiny_trace):
    workload = build_workload(WorkloadSpec(routing_file=str(tiny_trace), tokens=(5, 4), layer=1))
    assert workload.tokens_per_rank == [5, 4]
    assert torch.equal(workload.routing.concat()[0], open_trace(tiny_trace).routing(1)[0][:9])
    with pytest.raises(TraceError, match="40 tokens requested"):
        build_workload(WorkloadSpec(routing_file=str(tiny_trace), tokens=20))


def test_replay_rejects_other_shape(tiny_trace, tiny_snapshots, tmp_path):
    trace = open_trace(tiny_trace).load()
    trace.metadata["moe_config"] = {**trace.metadata["moe_config"], "n_experts": 16}
    other = save_trace(trace, tmp_path / "other.safetensors")
    spec = WorkloadSpec(routing_file=str(other), checkpoint=str(tiny_snapshots["single"]), tokens=None)
    with pytest.raises(TraceError, match="has n_experts=16 but checkpoint"):
        build_workload(spec)


def test_safetensors_without_trace_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(TraceError, match="not a moe_lab trace"):
        build_workload(WorkloadSpec(routing_file=str(path), tokens=None))


# ---- expert-load statistics ----


def test_stats_counts(tiny_trace):
    stats = trace_stats(tiny_trace, world_size=2, backend="gloo", dtype="float32")
    trace = open_trace(tiny_trace)
    assert stats["layers"] == [1, 2]
    assert stats["tokens_per_rank"] == [19, 18]
    for layer in (1, 2):
        ids, _ = trace.routing(layer)
        assert sum(stats["tokens_per_expert"][layer]) == TRACE_TOKENS * 2
        assert stats["tokens_per_expert"][layer] == torch.bincount(ids.reshape(-1), minlength=8).tolist()
        rank_of_token = torch.tensor([0] * 19 + [1] * 18).unsqueeze(1)
        contiguous = (ids // 4 == rank_of_token).float().mean()
        round_robin = (ids % 2 == rank_of_token).float().mean()
        assert stats["local_share"]["contiguous"][layer] == pytest.approx(float(contiguous))
        assert stats["local_share"]["round_robin"][layer] == pytest.approx(float(round_robin))
        # The naive all-reduce moves the whole batch once (ring, 2 ranks), whatever the routing.
        assert stats["sent_bytes"]["contiguous"]["allreduce"][layer] == TRACE_TOKENS * 32 * 4


@pytest.mark.parametrize("label,placement,layer", [("trace-layer2-checkpoint", "contiguous", 2), ("trace-layer1-seeded", "round_robin", 1)])
def test_stats_bytes_match_measured(hf_results, tiny_trace, label, placement, layer):
    stats = trace_stats(tiny_trace, world_size=2, backend="gloo", dtype="float32", placements=(placement,))
    result = hf_results[label]
    for path_result in result.paths:
        measured = max(sum(path_result.bytes_by_phase(rank).values()) for rank in range(2))
        assert stats["sent_bytes"][placement][path_result.path][layer] == measured, path_result.path


def test_stats_printout_and_json(tiny_trace, tmp_path, capsys):
    stats = trace_stats(tiny_trace)
    text = format_trace_stats(stats)
    assert "37 tokens in 3 sequences, 2 MoE layers, 8 experts, top-2" in text
    assert all(path in text for path in PATHS)
    assert main(["trace-stats", str(tiny_trace), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["tokens_per_expert"]["1"] == stats["tokens_per_expert"][1]
    assert total_sent_bytes(stats)["contiguous"]["alltoall"] == sum(stats["sent_bytes"]["contiguous"]["alltoall"].values())


def test_stats_skip_placement_that_does_not_fit(tiny_trace):
    stats = trace_stats(tiny_trace, world_size=3)
    assert stats["placements"] == ["round_robin"]
    assert "divisible" in stats["skipped_placements"]["contiguous"]


def test_figure_is_deterministic(tiny_trace, tmp_path):
    stats = trace_stats(tiny_trace)
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    plot_trace_stats(stats, first)
    plot_trace_stats(stats, second)
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first.read_bytes() == second.read_bytes()


# ---- the command line ----


def test_trace_command_records_and_replays(tiny_snapshots, tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TRACE_TEXT)
    trace_path = tmp_path / "cli.safetensors"
    completed = subprocess.run(
        [sys.executable, "-m", "moe_lab", "trace", "--checkpoint", str(tiny_snapshots["sharded"]), "--text-file",
         str(text_file), "--hidden-layer", "1", "--max-tokens", "21", "--output", str(trace_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr
    assert "21 tokens in 2 sequences, routing of MoE layers [1, 2], hidden states of layers [1]" in completed.stdout
    assert "picks the model's experts for 42 of 42" in completed.stdout
    trace = open_trace(trace_path)
    assert trace.metadata["sequence_lengths"] == [17, 4]
    assert trace.metadata["checkpoint"]["revision"] is None

    code = main(["compare", "--routing-file", str(trace_path), "--checkpoint", str(tiny_snapshots["sharded"]),
                 "--repeats", "1", "--json", "--out", str(tmp_path / "runs")])
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert document["metadata"]["workload"]["tokens_per_rank"] == [11, 10]
    assert document["metadata"]["workload"]["layer"] == 1
    assert all(path["passed"] for path in document["paths"])


def test_trace_command_default_path(tiny_snapshots, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("tokens move between ranks\n")
    assert main(["trace", "--checkpoint", str(tiny_snapshots["single"]), "--text-file", str(text_file), "--out", str(tmp_path / "traces")]) == 0
    assert [p.name for p in (tmp_path / "traces").iterdir()] == [f"tiny-deepseek-v2-{FAKE_REVISION[:12]}-notes-4t.safetensors"]


@pytest.mark.parametrize("extra,message", [
    (["--text-file", "missing.txt"], "text file 'missing.txt' not found"),
    (["--hidden-layer", "0"], "layer 0 of checkpoint"),
    (["--model-dtype", "float64"], "unknown model dtype 'float64'"),
    (["--max-tokens", "0"], "max_tokens must be >= 1"),
    (["--device", "tpu-ish"], "invalid device 'tpu-ish'"),
])
def test_trace_command_bad_input(tiny_snapshots, tmp_path, capsys, extra, message):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TRACE_TEXT)
    args = ["trace", "--checkpoint", str(tiny_snapshots["single"]), "--text-file", str(text_file), "--output", str(tmp_path / "t.safetensors")]
    code = main(args + extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err


def test_trace_needs_tokenizer(tiny_snapshots, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(tiny_snapshots["single"], tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    text_file = tmp_path / "text.txt"
    text_file.write_text(TRACE_TEXT)
    assert main(["trace", "--checkpoint", str(folder), "--text-file", str(text_file)]) == 2
    assert "cannot load the tokenizer of checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--placements", "striped"], "unknown placement 'striped'"),
    (["--world-size", "0"], "world_size must be an integer >= 1, got 0"),
    (["--backend", "mpi"], "unknown backend 'mpi'"),
    (["--dtype", "float64"], "unknown dtype 'float64'"),
])
def test_trace_stats_bad_input(tiny_trace, capsys, args, message):
    assert main(["trace-stats", str(tiny_trace), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--preset", "tiny"], "a trace sets the shape and the routing; drop --preset"),
    (["--routing", "uniform"], "a trace sets the shape and the routing; drop --routing"),
    (["--layer", "0"], "has no routing for layer 0"),
])
def test_compare_trace_bad_options(tiny_trace, tmp_path, capsys, args, message):
    assert main(["compare", "--routing-file", str(tiny_trace), *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
