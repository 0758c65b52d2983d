"""One run's inputs: the MoE shape, the tokens each rank holds, and their routing.

A `WorkloadSpec` is small and picklable; `build_workload` turns it into tensors the same way in
every process, so each rank and the reference see identical inputs without shipping them.

Routing file format (JSON object), the same as the kit's test cases:
    world_size, hidden, moe_intermediate, n_experts, top_k, n_shared_experts: the MoE shape;
    placement: "contiguous" or "round_robin"; dtype: "float32", "bfloat16" or "float16";
    ids_dtype: "int64" (default) or "int32"; seed: draws the hidden states and weights;
    tokens_per_rank: [T_0, T_1, ...];
    topk_ids[r][t], topk_weights[r][t]: the top_k experts of token t on rank r and their weights.
The file sets the shape, world size, placement, dtype and seed of the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, MoEConfig, resolve_config
from .moe import STREAM_HIDDEN, init_gate_weight, make_generator
from .routing import (
    ROUTINGS,
    Placement,
    Routing,
    RoutingError,
    gate_routing,
    synthetic_routing,
    validate_routing,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IDS_DTYPES = {"int64": torch.int64, "int32": torch.int32}
ROUTING_FILE_KEYS = (
    "world_size", "hidden", "moe_intermediate", "n_experts", "top_k", "n_shared_experts",
    "placement", "dtype", "seed", "tokens_per_rank", "topk_ids", "topk_weights",
)


@dataclass(frozen=True)
class WorkloadSpec:
    preset: str = "deepseek-v2-lite"  # preset name or path to a Hugging Face config.json
    world_size: int = 2
    tokens: int | tuple[int, ...] = 64  # tokens per rank, or one count per rank
    routing: str = "gate"
    locality: float = 1.0  # for routing="local": share of each token's experts on its own rank
    zipf_exponent: float = 1.2  # for routing="skewed"
    placement: str = "contiguous"
    dtype: str = "float32"
    seed: int = 0
    routing_file: str | None = None  # explicit routing; sets shape, ranks, placement, dtype, seed
    top_k: int | None = None  # experts per token, replacing the preset's; None keeps it


@dataclass
class Workload:
    cfg: MoEConfig
    placement: Placement
    dtype: torch.dtype
    seed: int
    tokens_per_rank: list[int]
    hidden: list[torch.Tensor]  # per rank: (T_r, H)
    routing: Routing
    source: str = ""  # where the routing came from, for tables and metadata
    extra: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return len(self.tokens_per_rank)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_per_rank)

    def token_offset(self, rank: int) -> int:
        return sum(self.tokens_per_rank[:rank])


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(
            f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)} (fp8 is a dispatch format, "
            f"not a layer dtype)"
        )
    return DTYPES[name]


def tokens_per_rank_of(tokens: int | tuple[int, ...] | list[int], world_size: int) -> list[int]:
    if isinstance(tokens, int):
        counts = [tokens] * world_size
    else:
        counts = list(tokens)
        if len(counts) != world_size:
            raise ConfigError(
                f"{len(counts)} token counts given for {world_size} ranks; give one count or one per rank"
            )
    for count in counts:
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"token counts must be integers >= 0, got {count!r}")
    return counts


def draw_hidden(cfg: MoEConfig, tokens_per_rank: list[int], seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        torch.randn(tokens, cfg.hidden, generator=make_generator(seed, STREAM_HIDDEN, rank)).to(dtype)
        for rank, tokens in enumerate(tokens_per_rank)
    ]


def build_workload(spec: WorkloadSpec) -> Workload:
    """Turn a spec into tensors; the same spec gives the same tensors in every process."""
    if spec.routing_file is not None:
        return load_routing_file(spec.routing_file)
    if not isinstance(spec.world_size, int) or spec.world_size < 1:
        raise ConfigError(f"world_size must be an integer >= 1, got {spec.world_size!r}")
    if spec.routing not in ROUTINGS:
        raise RoutingError(f"unknown routing {spec.routing!r}; choose one of {', '.join(ROUTINGS)}")
    cfg = resolve_config(spec.preset)
    if spec.top_k is not None and spec.top_k != cfg.top_k:
        cfg = cfg.replace(top_k=spec.top_k)
    placement = Placement(spec.placement, cfg.n_experts, spec.world_size)
    dtype = parse_dtype(spec.dtype)
    tokens_per_rank = tokens_per_rank_of(spec.tokens, spec.world_size)
    hidden = draw_hidden(cfg, tokens_per_rank, spec.seed, dtype)

    if spec.routing == "gate":
        routing = gate_routing(hidden, init_gate_weight(cfg, spec.seed), cfg)
        source = "gate"
    else:
        routing = synthetic_routing(
            spec.routing, cfg, placement, tokens_per_rank, spec.seed, spec.locality, spec.zipf_exponent
        )
        source = spec.routing
        if spec.routing == "local":
            source += f" p={spec.locality:g}"
        elif spec.routing == "skewed":
            source += f" s={spec.zipf_exponent:g}"
    return Workload(cfg, placement, dtype, spec.seed, tokens_per_rank, hidden, routing, source)


def _require(data: dict, key: str, path: str):
    if key not in data:
        raise RoutingError(f"routing file {path!r} is missing key {key!r}; required keys: {', '.join(ROUTING_FILE_KEYS)}")
    return data[key]


def load_routing_file(path: str | Path) -> Workload:
    """Load explicit routing, with the shape it sets, from a JSON file (format in the module docstring)."""
    path = str(path)
    if not Path(path).is_file():
        raise RoutingError(f"routing file {path!r} not found")
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise RoutingError(f"routing file {path!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RoutingError(f"routing file {path!r} must hold a JSON object")
    for key in ROUTING_FILE_KEYS:
        _require(data, key, path)

    cfg = MoEConfig(
        hidden=data["hidden"],
        moe_intermediate=data["moe_intermediate"],
        n_experts=data["n_experts"],
        top_k=data["top_k"],
        n_shared_experts=data["n_shared_experts"],
        name=data.get("name", Path(path).stem),
    )
    world_size = data["world_size"]
    placement = Placement(data["placement"], cfg.n_experts, world_size)
    dtype = parse_dtype(data["dtype"])
    ids_dtype_name = data.get("ids_dtype", "int64")
    if ids_dtype_name not in IDS_DTYPES:
        raise RoutingError(f"routing file {path!r}: ids_dtype {ids_dtype_name!r} is not one of {', '.join(IDS_DTYPES)}")
    tokens_per_rank = tokens_per_rank_of(data["tokens_per_rank"], world_size)

    ids_per_rank, weights_per_rank = [], []
    for rank, tokens in enumerate(tokens_per_rank):
        try:
            ids = torch.tensor(data["topk_ids"][rank], dtype=IDS_DTYPES[ids_dtype_name]).reshape(-1, cfg.top_k) if tokens else torch.empty(0, cfg.top_k, dtype=IDS_DTYPES[ids_dtype_name])
            weights = torch.tensor(data["topk_weights"][rank], dtype=torch.float32).reshape(-1, cfg.top_k) if tokens else torch.empty(0, cfg.top_k)
        except (IndexError, ValueError, TypeError, RuntimeError) as err:
            raise RoutingError(
                f"routing file {path!r}: rank {rank}'s topk_ids/topk_weights do not form a "
                f"({tokens}, {cfg.top_k}) table: {err}"
            ) from None
        ids_per_rank.append(ids)
        weights_per_rank.append(weights)
    routing = Routing(ids_per_rank, weights_per_rank)
    validate_routing(routing, cfg, tokens_per_rank, source=f"routing file {path!r}")

    hidden = draw_hidden(cfg, tokens_per_rank, data["seed"], dtype)
    return Workload(
        cfg, placement, dtype, data["seed"], tokens_per_rank, hidden, routing,
        source=f"file {Path(path).name}", extra={"routing_file": path},
    )
