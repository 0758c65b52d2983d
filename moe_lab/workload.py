"""One run's inputs: the MoE shape, the tokens each rank holds, and their routing.

A `WorkloadSpec` is small and picklable. `build_workload` turns it into tensors the same way in
every process, so each rank and the reference see identical inputs without shipping them.

Routing file format (JSON object), the same as the kit's test cases:
    world_size, hidden, moe_intermediate, n_experts, top_k, n_shared_experts: the MoE shape;
    placement: "contiguous" or "round_robin"; dtype: "float32", "bfloat16" or "float16";
    ids_dtype: "int64" (default) or "int32"; seed: draws the hidden states and weights;
    tokens_per_rank: [T_0, T_1, ...];
    topk_ids[r][t], topk_weights[r][t]: the top_k experts of token t on rank r and their weights.
The file sets the shape, world size, placement, dtype and seed of the run.

A routing file can also be a trace recorded from a real model (format in `moe_lab.trace`);
`build_workload` tells the two apart by content. A trace sets only the shape and the routing:
the spec's world size, placement, dtype and seed apply, and its tokens are split over the
ranks in contiguous blocks.

With `checkpoint`, the MoE shape, the gate and the expert weights of one layer come from a
local Hugging Face snapshot (see `moe_lab.checkpoint`); tokens are still drawn from the seed
unless a trace supplies recorded hidden states.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint_layer
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
from .trace import TraceError, is_trace_file, open_trace, split_tokens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IDS_DTYPES = {"int64": torch.int64, "int32": torch.int32}
ROUTING_FILE_KEYS = (
    "world_size", "hidden", "moe_intermediate", "n_experts", "top_k", "n_shared_experts",
    "placement", "dtype", "seed", "tokens_per_rank", "topk_ids", "topk_weights",
)


@dataclass(frozen=True)
class WorkloadSpec:
    preset: str | MoEConfig = "deepseek-v2-lite"  # preset name, path to a Hugging Face config.json, or a MoEConfig
    world_size: int = 2
    tokens: int | tuple[int, ...] | None = 64  # tokens per rank, or one count per rank; None: a whole trace
    routing: str = "gate"
    locality: float = 1.0  # for routing="local": share of each token's experts on its own rank
    zipf_exponent: float = 1.2  # for routing="skewed"
    placement: str = "contiguous"
    dtype: str = "float32"
    seed: int = 0
    routing_file: str | None = None  # explicit routing (sets shape, ranks, placement, dtype, seed) or a trace
    checkpoint: str | None = None  # local snapshot folder: shape, gate and expert weights of one layer
    layer: int | None = None  # model layer of the checkpoint or trace; default: the first MoE layer
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
    checkpoint: str | None = None  # snapshot folder the expert weights come from; None: seeded weights
    layer: int | None = None  # model layer of `checkpoint` (or of the replayed trace)

    @property
    def world_size(self) -> int:
        return len(self.tokens_per_rank)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_per_rank)

    def token_offset(self, rank: int) -> int:
        return sum(self.tokens_per_rank[:rank])


def parse_dtype(name: str) -> torch.dtype:
    if name in DTYPES:
        return DTYPES[name]
    if isinstance(name, str) and name.startswith("float8"):
        # torch 2.13 gloo has no kernel for any float8 collective (checked on its CPU build).
        raise ConfigError(
            f"dtype {name!r} cannot be the layer dtype: the experts do not compute in float8, and gloo "
            f"cannot send or sum float8 tensors. The kit sends float8 as raw bytes where nothing is "
            f"summed (broadcast, all_gather, all_to_all), but the all-reduce paths sum tokens in the "
            f"layer dtype. Choose one of {', '.join(DTYPES)}"
        )
    raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")


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
        if is_trace_file(spec.routing_file):
            return load_trace_workload(spec)
        if spec.checkpoint is not None or spec.layer is not None:
            raise RoutingError(
                f"routing file {spec.routing_file!r} is a JSON routing file, which sets its own shape "
                f"and seeded weights; a checkpoint or layer goes with a recorded trace or with no routing file"
            )
        return load_routing_file(spec.routing_file)
    if not isinstance(spec.world_size, int) or spec.world_size < 1:
        raise ConfigError(f"world_size must be an integer >= 1, got {spec.world_size!r}")
    if spec.routing not in ROUTINGS:
        raise RoutingError(f"unknown routing {spec.routing!r}; choose one of {', '.join(ROUTINGS)}")
    if not _is_number(spec.locality) or not 0.0 <= spec.locality <= 1.0:
        raise RoutingError(f"locality must be a number from 0 to 1, got {spec.locality!r}")
    if not _is_number(spec.zipf_exponent) or not (math.isfinite(spec.zipf_exponent) and spec.zipf_exponent >= 0):
        raise RoutingError(f"zipf_exponent must be a finite number >= 0, got {spec.zipf_exponent!r}")
    _check_seed(spec.seed, "seed")
    checkpoint, layer = None, None
    if spec.checkpoint is not None:
        checkpoint, layer = open_checkpoint_layer(spec.checkpoint, spec.layer)
        cfg = checkpoint.cfg
    elif spec.layer is not None:
        raise ConfigError(f"layer={spec.layer} needs a checkpoint or a trace to choose the layer from")
    else:
        cfg = resolve_config(spec.preset)
    if spec.top_k is not None and spec.top_k != cfg.top_k:
        cfg = cfg.replace(top_k=spec.top_k)
    placement = Placement(spec.placement, cfg.n_experts, spec.world_size)
    dtype = parse_dtype(spec.dtype)
    if spec.tokens is None:
        raise ConfigError("tokens=None (the whole trace) needs a trace as routing file; give a token count")
    tokens_per_rank = tokens_per_rank_of(spec.tokens, spec.world_size)
    hidden = draw_hidden(cfg, tokens_per_rank, spec.seed, dtype)

    if spec.routing == "gate":
        gate_weight = init_gate_weight(cfg, spec.seed) if checkpoint is None else checkpoint.gate_weight(layer)
        routing = gate_routing(hidden, gate_weight, cfg)
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
    if checkpoint is None:
        return Workload(cfg, placement, dtype, spec.seed, tokens_per_rank, hidden, routing, source)
    source = f"gate of {checkpoint.name} layer {layer}" if spec.routing == "gate" else f"{source}, weights of {checkpoint.name} layer {layer}"
    return Workload(
        cfg, placement, dtype, spec.seed, tokens_per_rank, hidden, routing, source,
        extra={**checkpoint.describe(), "layer": layer}, checkpoint=str(checkpoint.path), layer=layer,
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_seed(seed, where: str) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where} must be an integer, got {seed!r}")


def _require(data: dict, key: str, path: str):
    if key not in data:
        raise RoutingError(f"routing file {path!r} is missing key {key!r}; required keys: {', '.join(ROUTING_FILE_KEYS)}")
    return data[key]


def _table(rows, key: str, rank: int, tokens: int, top_k: int, dtype: torch.dtype, source: str) -> torch.Tensor:
    """Rank `rank`'s (tokens, top_k) table `key` from nested JSON lists; the shape must match, never reshaped."""
    where = f"{source}: rank {rank}"
    expected = f"a list of {tokens} lists of {top_k} numbers"
    if not isinstance(rows, list):
        raise RoutingError(f"{where}: {key} must be {expected}, got {type(rows).__name__}")
    if tokens == 0 and rows == []:
        return torch.empty(0, top_k, dtype=dtype)
    try:
        table = torch.tensor(rows)
    except (ValueError, TypeError, RuntimeError) as err:
        raise RoutingError(f"{where}: {key} must be {expected}: {err}") from None
    if tuple(table.shape) != (tokens, top_k):
        raise RoutingError(
            f"{where}: {key} has shape {tuple(table.shape)} but tokens_per_rank[{rank}]={tokens} "
            f"and top_k={top_k} need ({tokens}, {top_k})"
        )
    if dtype.is_floating_point and table.dtype == torch.bool:
        raise RoutingError(f"{where}: {key} must hold numbers, got true/false")
    if not dtype.is_floating_point and table.dtype not in (torch.int64, torch.int32):
        raise RoutingError(f"{where}: {key} must hold integer expert ids, got {str(table.dtype).removeprefix('torch.')} values")
    return table.to(dtype)


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

    for key in ("topk_ids", "topk_weights"):
        if not isinstance(data[key], list) or len(data[key]) != world_size:
            found = len(data[key]) if isinstance(data[key], list) else type(data[key]).__name__
            raise RoutingError(
                f"routing file {path!r}: {key} must hold one table per rank, {world_size} in all, got {found}"
            )
    _check_seed(data["seed"], f"routing file {path!r}: seed")

    ids_per_rank, weights_per_rank = [], []
    for rank, tokens in enumerate(tokens_per_rank):
        source = f"routing file {path!r}"
        ids = _table(data["topk_ids"][rank], "topk_ids", rank, tokens, cfg.top_k, torch.int64, source)
        weights = _table(data["topk_weights"][rank], "topk_weights", rank, tokens, cfg.top_k, torch.float32, source)
        ids_per_rank.append(ids)
        weights_per_rank.append(weights)
    # Validate as int64 first, so an id outside int32 is reported instead of wrapping around.
    validate_routing(Routing(ids_per_rank, weights_per_rank), cfg, tokens_per_rank, source=f"routing file {path!r}")
    ids_dtype = IDS_DTYPES[ids_dtype_name]
    routing = Routing([ids.to(ids_dtype) for ids in ids_per_rank], weights_per_rank)

    hidden = draw_hidden(cfg, tokens_per_rank, data["seed"], dtype)
    return Workload(
        cfg, placement, dtype, data["seed"], tokens_per_rank, hidden, routing,
        source=f"file {Path(path).name}", extra={"routing_file": path},
    )


def load_trace_workload(spec: WorkloadSpec) -> Workload:
    """Replay one layer of a recorded trace, split over `spec.world_size` ranks (format in `moe_lab.trace`)."""
    trace = open_trace(spec.routing_file)
    layer = trace.default_layer() if spec.layer is None else spec.layer
    trace.check_layer(layer)
    cfg = trace.cfg
    checkpoint: Checkpoint | None = None
    if spec.checkpoint is not None:
        checkpoint, layer = open_checkpoint_layer(spec.checkpoint, layer)
        _check_same_shape(trace.cfg, checkpoint.cfg, spec)
        cfg = checkpoint.cfg
    if not isinstance(spec.world_size, int) or spec.world_size < 1:
        raise ConfigError(f"world_size must be an integer >= 1, got {spec.world_size!r}")
    placement = Placement(spec.placement, cfg.n_experts, spec.world_size)
    dtype = parse_dtype(spec.dtype)

    # Contiguous token blocks per rank, as a serving engine splits a batch.
    if spec.tokens is None:
        tokens_per_rank = split_tokens(trace.n_tokens, spec.world_size)
    else:
        tokens_per_rank = tokens_per_rank_of(spec.tokens, spec.world_size)
        if sum(tokens_per_rank) > trace.n_tokens:
            raise TraceError(
                f"{sum(tokens_per_rank)} tokens requested ({tokens_per_rank} per rank) but trace "
                f"{spec.routing_file!r} holds {trace.n_tokens}; ask for fewer, or leave tokens unset to replay all"
            )
    n_tokens = sum(tokens_per_rank)
    ids, weights = trace.routing(layer)
    ids_per_rank = list(ids[:n_tokens].split(tokens_per_rank))
    weights_per_rank = list(weights[:n_tokens].split(tokens_per_rank))
    routing = Routing(ids_per_rank, weights_per_rank)
    validate_routing(routing, cfg, tokens_per_rank, source=f"trace {spec.routing_file!r} layer {layer}")

    recorded = trace.hidden_states(layer)
    if recorded is not None:
        hidden = list(recorded[:n_tokens].to(dtype).split(tokens_per_rank))
    else:
        hidden = draw_hidden(cfg, tokens_per_rank, spec.seed, dtype)

    source = f"trace {trace.label} layer {layer}" + (", recorded hidden states" if recorded is not None else "")
    extra = {
        "routing_file": spec.routing_file,
        "layer": layer,
        "trace_checkpoint": trace.metadata.get("checkpoint", {}),
        "trace_tokens": trace.n_tokens,
        "recorded_hidden_states": recorded is not None,
    }
    if checkpoint is not None:
        extra.update(checkpoint.describe())
    return Workload(
        cfg, placement, dtype, spec.seed, tokens_per_rank, hidden, routing, source, extra=extra,
        checkpoint=None if checkpoint is None else str(checkpoint.path), layer=layer,
    )


def _check_same_shape(traced: MoEConfig, loaded: MoEConfig, spec: WorkloadSpec) -> None:
    for name in ("hidden", "moe_intermediate", "n_experts", "top_k", "n_shared_experts"):
        if getattr(traced, name) != getattr(loaded, name):
            raise TraceError(
                f"trace {spec.routing_file!r} has {name}={getattr(traced, name)} but checkpoint "
                f"{spec.checkpoint!r} has {name}={getattr(loaded, name)}; replay the trace with the "
                f"checkpoint that recorded it"
            )
