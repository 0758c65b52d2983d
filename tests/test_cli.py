"""The command line as a user runs it: `python -m moe_lab compare`, under python and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moe_lab.cli import main

from conftest import CASES_DIR


def run_cli(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_lab", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def test_compare_json_tiny(tmp_path):
    completed = run_cli("compare", "--preset", "tiny", "--json", "--repeats", "2", "--out", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert [p["path"] for p in document["paths"]] == ["allreduce", "broadcast", "allgather_reducescatter", "alltoall", "alltoall_dedup"]
    for path in document["paths"]:
        assert path["passed"] is True
        assert path["rel_error"] <= 1e-5
        assert path["repeats"] == 2
        assert len(path["per_rank"]) == 2
        assert path["sent_total_bytes"] > 0 and path["os_sent_total_bytes"] >= path["sent_total_bytes"]
    metadata = document["metadata"]
    assert metadata["environment"]["torch"] and metadata["environment"]["backend"] == "gloo"
    assert metadata["config"]["name"] == "tiny" and metadata["workload"]["seed"] == 0
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".json"]


def test_compare_table_tiny(tmp_path):
    completed = run_cli("compare", "--preset", "tiny", "--repeats", "1", "--out", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    for name in ("allreduce", "broadcast", "allgather_reducescatter", "alltoall"):
        assert name in completed.stdout
    assert "FAIL" not in completed.stdout


def test_compare_routing_file(tmp_path):
    case = CASES_DIR / "uneven_batches_three_ranks.json"
    completed = run_cli("compare", "--routing-file", str(case), "--json", "--repeats", "1", "--out", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert document["metadata"]["workload"]["tokens_per_rank"] == [7, 1, 4]
    assert all(path["passed"] for path in document["paths"])


def test_compare_under_torchrun(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moe_lab", "compare", "--preset", "tiny", "--json", "--repeats", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)  # only rank 0 prints
    assert document["metadata"]["workload"]["world_size"] == 2
    assert all(path["passed"] for path in document["paths"])


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--paths", "allreduce,teleport"], "unknown path 'teleport'"),
    (["--preset", "tiny", "--routing", "random"], "unknown routing 'random'"),
    (["--preset", "tiny", "--backend", "mpi"], "unknown backend 'mpi'"),
    (["--preset", "tiny", "--placement", "striped"], "unknown placement 'striped'"),
    (["--preset", "tiny", "--dtype", "float64"], "unknown dtype 'float64'"),
    (["--preset", "tiny", "--world-size", "9", "--placement", "round_robin"], "8 experts cannot be spread over 9 ranks"),
    (["--preset", "tiny", "--world-size", "3"], "contiguous placement needs n_experts divisible by world_size"),
    (["--preset", "tiny", "--world-size", "0"], "world_size must be an integer >= 1, got 0"),
    (["--preset", "tiny", "--tokens", "-3"], "token counts must be integers >= 0, got -3"),
    (["--preset", "missing/config.json"], "config file 'missing/config.json' not found"),
    (["--preset", "tiny", "--backend", "nccl"], "backend 'nccl' needs one GPU per rank"),
])
def test_bad_input_message(args, message, capsys, tmp_path):
    code = main(["compare", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_config_file_errors(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["compare", "--preset", str(broken)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"hidden_size": 64, "n_routed_experts": 8}))
    assert main(["compare", "--preset", str(partial)]) == 2
    assert "missing required keys ['moe_intermediate_size', 'num_experts_per_tok']" in capsys.readouterr().err

    too_many = tmp_path / "too_many.json"
    too_many.write_text(json.dumps({"hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 6}))
    assert main(["compare", "--preset", str(too_many)]) == 2
    assert "top_k=6 is larger than n_experts=4" in capsys.readouterr().err


def test_routing_file_conflicting_option(tmp_path, capsys):
    case = str(CASES_DIR / "idle_rank.json")
    assert main(["compare", "--routing-file", case, "--world-size", "4", "--out", str(tmp_path)]) == 2
    assert "--routing-file sets the shape" in capsys.readouterr().err


def test_routing_file_bad_shape(tmp_path, capsys):
    case = json.loads((CASES_DIR / "idle_rank.json").read_text())
    case["topk_ids"][0] = case["topk_ids"][0][:-1]  # one token short
    path = tmp_path / "short.json"
    path.write_text(json.dumps(case))
    assert main(["compare", "--routing-file", str(path), "--out", str(tmp_path)]) == 2
    assert "rank 0: topk_ids has shape (4, 2) but tokens_per_rank[0]=5" in capsys.readouterr().err
