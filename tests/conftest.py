"""Shared launches: each fixture starts ranks once per world size and many tests read the results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lab.compare import CompareOptions, run_compare_many
from moe_lab.workload import WorkloadSpec

CASES_DIR = Path(__file__).parent / "cases"
CASE_FILES = sorted(CASES_DIR.glob("*.json"))

# Ragged token counts per world size, an idle rank included from 3 ranks up.
TOKENS = {1: 6, 2: (5, 3), 3: (4, 0, 2), 4: (3, 1, 0, 5)}
SYNTHETIC = [("gate", {}), ("uniform", {}), ("skewed", {}), ("local", {"locality": 1.0})]


def matrix_specs() -> dict[str, WorkloadSpec]:
    specs = {}
    for world_size, tokens in TOKENS.items():
        placement = "round_robin" if 8 % world_size else "contiguous"  # tiny has 8 experts
        for routing, extra in SYNTHETIC:
            label = f"{world_size}r-{routing}-{placement}"
            specs[label] = WorkloadSpec(
                preset="tiny", world_size=world_size, tokens=tokens, routing=routing, placement=placement, **extra
            )
    for routing in ("gate", "uniform"):
        specs[f"2r-{routing}-bfloat16"] = WorkloadSpec(preset="tiny", tokens=(6, 4), routing=routing, dtype="bfloat16")
    specs["2r-uniform-round_robin"] = WorkloadSpec(preset="tiny", tokens=(6, 4), routing="uniform", placement="round_robin")
    specs["2r-uniform-same-shape-as-local"] = WorkloadSpec(preset="tiny", tokens=(5, 3), routing="uniform")
    return specs


MATRIX = matrix_specs()


@pytest.fixture(scope="session")
def matrix_results():
    """label -> CompareResult for every workload in MATRIX, one launch per world size."""
    labels = list(MATRIX)
    results = run_compare_many([MATRIX[label] for label in labels], CompareOptions(repeats=1, warmup=0))
    return dict(zip(labels, results))


# Every path with every variant: compressed dispatch and overlap.
ALL_VARIANTS = CompareOptions(repeats=1, warmup=0, dispatch_dtypes=("bfloat16", "fp8"), overlap=True, chunks=3)

VARIANT_SPECS = {
    "2r-uniform": WorkloadSpec(preset="tiny", tokens=(7, 4), routing="uniform"),
    "2r-local": WorkloadSpec(preset="tiny", tokens=(5, 5), routing="local", locality=1.0),
    "3r-idle-round_robin": WorkloadSpec(preset="tiny", world_size=3, tokens=(4, 0, 6), routing="gate", placement="round_robin"),
    "4r-skewed": WorkloadSpec(preset="tiny", world_size=4, tokens=(2, 5, 1, 3), routing="skewed"),
    "2r-bfloat16": WorkloadSpec(preset="tiny", tokens=(6, 6), routing="uniform", dtype="bfloat16"),
}


@pytest.fixture(scope="session")
def variant_results():
    """label -> CompareResult with every variant of every path."""
    labels = list(VARIANT_SPECS)
    results = run_compare_many([VARIANT_SPECS[label] for label in labels], ALL_VARIANTS)
    return dict(zip(labels, results))


@pytest.fixture(scope="session")
def case_results():
    """case name -> CompareResult for every file in tests/cases, every variant included."""
    specs = [WorkloadSpec(routing_file=str(path)) for path in CASE_FILES]
    results = run_compare_many(specs, ALL_VARIANTS)
    return {path.stem: result for path, result in zip(CASE_FILES, results)}


def load_case(name: str) -> dict:
    return json.loads((CASES_DIR / f"{name}.json").read_text())


# ---- a tiny DeepSeek-V2 model from transformers, saved as local snapshots ----

TRACE_TEXT = """the gate scores every expert and keeps the best two
tokens move between ranks over the wire

shared experts see every token of the batch

each rank holds half of the routed experts and an unseen word
"""
FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def tiny_model():
    from moe_lab.tiny_snapshot import build_model

    return build_model(seed=0)


@pytest.fixture(scope="session")
def tiny_snapshots(tiny_model, tmp_path_factory):
    """Three snapshots of one model, each with a tokenizer.

    single: one model.safetensors; sharded: transformers' own shards with an index;
    spread: shards that split each layer's experts over several files.
    """
    from moe_lab.tiny_snapshot import build_tokenizer, save_snapshot, spread_shards

    root = tmp_path_factory.mktemp("snapshots")
    tokenizer = build_tokenizer()
    single = save_snapshot(tiny_model, tokenizer, root / "tiny-deepseek-v2")
    # What huggingface_hub writes beside a file downloaded with local_dir: the commit hash first.
    metadata = single / ".cache" / "huggingface" / "download" / "config.json.metadata"
    metadata.parent.mkdir(parents=True)
    metadata.write_text(f"{FAKE_REVISION}\n\"etag\"\n1700000000.0\n")
    sharded = save_snapshot(tiny_model, tokenizer, root / "tiny-deepseek-v2-sharded", max_shard_size="6KB")
    spread = spread_shards(single, root / "tiny-deepseek-v2-spread")
    return {"single": single, "sharded": sharded, "spread": spread}


@pytest.fixture(scope="session")
def tiny_trace(tiny_snapshots, tmp_path_factory):
    """A trace of the tiny model on TRACE_TEXT, with layer 2's hidden states."""
    from moe_lab.record import record_trace, text_file_info, tokenize_text
    from moe_lab.trace import save_trace

    folder = tmp_path_factory.mktemp("traces")
    text_file = folder / "text.txt"
    text_file.write_text(TRACE_TEXT)
    sequences = tokenize_text(tiny_snapshots["single"], TRACE_TEXT)
    trace = record_trace(tiny_snapshots["single"], sequences, hidden_layers=[2], text_info=text_file_info(text_file, TRACE_TEXT))
    return save_trace(trace, folder / "tiny.safetensors")


def hf_specs(snapshots, trace) -> dict[str, WorkloadSpec]:
    """Workloads on the tiny checkpoint and its trace, all on 2 ranks."""
    single, sharded = str(snapshots["single"]), str(snapshots["sharded"])
    return {
        "gate-layer1-sharded": WorkloadSpec(checkpoint=sharded, layer=1, tokens=(7, 5)),
        "gate-layer2-spread": WorkloadSpec(checkpoint=str(snapshots["spread"]), layer=2, tokens=(6, 5)),
        "gate-layer2-round_robin": WorkloadSpec(checkpoint=single, layer=2, tokens=(4, 6), placement="round_robin"),
        "uniform-layer2": WorkloadSpec(checkpoint=single, layer=2, tokens=(5, 3), routing="uniform"),
        "trace-layer2-checkpoint": WorkloadSpec(routing_file=str(trace), checkpoint=sharded, tokens=None),
        "trace-layer1-seeded": WorkloadSpec(routing_file=str(trace), layer=1, tokens=None, placement="round_robin"),
        "trace-layer2-bfloat16": WorkloadSpec(routing_file=str(trace), checkpoint=single, tokens=None, dtype="bfloat16"),
    }


@pytest.fixture(scope="session")
def hf_results(tiny_snapshots, tiny_trace):
    """label -> CompareResult for every workload of hf_specs, one launch of 2 ranks."""
    specs = hf_specs(tiny_snapshots, tiny_trace)
    results = run_compare_many(list(specs.values()), CompareOptions(repeats=1, warmup=0))
    return dict(zip(specs, results))
