"""One MoE layer of a DeepSeek-V2-family checkpoint, read from a local Hugging Face snapshot.

A snapshot is a folder with `config.json` and safetensors weights, either one
`model.safetensors` or shards listed in `model.safetensors.index.json`. The MoE layer N is
stored per expert, as DeepSeek-V2 checkpoints and `transformers`' `save_pretrained` write it:

    model.layers.N.mlp.gate.weight                          (n_experts, hidden) router
    model.layers.N.mlp.experts.E.{gate,up}_proj.weight      (moe_intermediate, hidden)
    model.layers.N.mlp.experts.E.down_proj.weight           (hidden, moe_intermediate)
    model.layers.N.mlp.shared_experts.{gate,up}_proj.weight (n_shared * moe_intermediate, hidden)
    model.layers.N.mlp.shared_experts.down_proj.weight      (hidden, n_shared * moe_intermediate)

Tensors are read through safetensors' `safe_open`, one tensor at a time. A rank that requests
its own experts reads only those, so its memory contains only its share of the layer.
Shapes are checked from the file headers before any weight is read.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, MoEConfig, config_from_hf_dict
from .moe import ExpertWeights, SharedExpertWeights

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = ("deepseek_v2",)
# Values the DeepSeek-V2 modeling code uses for keys that recent config.json exports leave out
# (transformers 5 writes no `scoring_func` and no `moe_layer_freq`, for example).
FAMILY_DEFAULTS = {
    "scoring_func": "softmax",
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<revision>[^/]+)$")


class CheckpointError(ConfigError):
    """A checkpoint folder that is incomplete, inconsistent, or not representable by the kit."""


@dataclass(frozen=True)
class Checkpoint:
    """An opened snapshot: its MoE shape, the file of each tensor, and where it came from."""

    path: Path
    name: str  # for example "deepseek-ai/DeepSeek-V2-Lite", or the folder name
    revision: str | None  # commit hash of the snapshot, when the folder records one
    hf_config: dict
    cfg: MoEConfig
    weight_map: dict[str, str]  # tensor name -> file name inside `path`
    index_name: str  # file that lists the tensors: the index, or the single weights file
    reads: list[str] = field(default_factory=list, compare=False)  # tensor names read so far, in order

    # ---- which layers are MoE layers ----

    @property
    def n_layers(self) -> int:
        return int(self.hf_config.get("num_hidden_layers", 0))

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek-V2's rule: layers from `first_k_dense_replace` on, every `moe_layer_freq`-th one."""
        first_dense = self.hf_config["first_k_dense_replace"]
        frequency = self.hf_config["moe_layer_freq"]
        return layer >= first_dense and layer % frequency == 0

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if self.is_moe_layer(layer)]

    def default_layer(self) -> int:
        if not self.moe_layers:
            raise CheckpointError(f"checkpoint {str(self.path)!r} has no MoE layer (num_hidden_layers={self.n_layers})")
        return self.moe_layers[0]

    # ---- tensor names and shapes ----

    def expected_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Return every tensor name of MoE layer `layer` that the kit reads, with its shape."""
        cfg = self.cfg
        H, I, S = cfg.hidden, cfg.moe_intermediate, cfg.shared_intermediate
        prefix = f"model.layers.{layer}.mlp"
        shapes = {f"{prefix}.gate.weight": (cfg.n_experts, H)}
        for expert in range(cfg.n_experts):
            shapes.update(_swiglu_shapes(f"{prefix}.experts.{expert}", H, I))
        if cfg.n_shared_experts:
            shapes.update(_swiglu_shapes(f"{prefix}.shared_experts", H, S))
        return shapes

    def check_layer(self, layer: int) -> None:
        """Reject a dense or absent layer, and any missing file, missing tensor or wrong shape.

        Reads only the safetensors headers, so it is cheap enough to run in every process.
        """
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise CheckpointError(
                f"layer {layer!r} is outside checkpoint {str(self.path)!r}, which has "
                f"{self.n_layers} layers; its MoE layers are {_layer_list(self.moe_layers)}"
            )
        if not self.is_moe_layer(layer):
            raise CheckpointError(
                f"layer {layer} of checkpoint {str(self.path)!r} is a dense MLP layer "
                f"(first_k_dense_replace={self.hf_config['first_k_dense_replace']}, "
                f"moe_layer_freq={self.hf_config['moe_layer_freq']}); choose an MoE layer: "
                f"{_layer_list(self.moe_layers)}"
            )
        shapes = self.expected_shapes(layer)
        self._check_no_undeclared_shared_experts(layer)
        by_file = self._files_of(list(shapes))
        for file_name, names in by_file.items():
            with _open_safetensors(self.path / file_name) as handle:
                present = set(handle.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(
                            f"tensor {name!r} is missing from {file_name!r} in {str(self.path)!r}, "
                            f"although {self.index_name!r} lists it there; re-download that file"
                        )
                    shape = tuple(handle.get_slice(name).get_shape())
                    if shape != shapes[name]:
                        raise CheckpointError(
                            f"tensor {name!r} in {file_name!r} has shape {list(shape)}, but config.json "
                            f"gives {list(shapes[name])}; the weights do not belong to this config.json"
                        )

    def _check_no_undeclared_shared_experts(self, layer: int) -> None:
        name = f"model.layers.{layer}.mlp.shared_experts.gate_proj.weight"
        if not self.cfg.n_shared_experts and name in self.weight_map:
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} stores {name!r} but config.json sets no "
                f"n_shared_experts; set n_shared_experts in config.json"
            )

    def _files_of(self, names: list[str]) -> dict[str, list[str]]:
        """Group tensor names by the file that contains them. Raise on a missing tensor or shard."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(
                    f"tensor {name!r} is missing from checkpoint {str(self.path)!r}: "
                    f"{self.index_name!r} does not list it"
                )
            by_file[self.weight_map[name]].append(name)
        for file_name, file_names in by_file.items():
            if not (self.path / file_name).is_file():
                raise CheckpointError(
                    f"shard {file_name!r} of checkpoint {str(self.path)!r} is missing; "
                    f"{self.index_name!r} lists it for {len(file_names)} tensors of this layer, "
                    f"such as {file_names[0]!r}; download that shard"
                )
        return by_file

    # ---- reading weights ----

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors, each file opened once; nothing else is loaded."""
        tensors = {}
        for file_name, file_names in self._files_of(names).items():
            with _open_safetensors(self.path / file_name) as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
                    self.reads.append(name)
        log.debug("read %d tensors from %s", len(tensors), self.path)
        return tensors

    def gate_weight(self, layer: int) -> torch.Tensor:
        """Read the router weight (n_experts, hidden) as float32, the dtype DeepSeek-V2 scores in."""
        name = f"model.layers.{layer}.mlp.gate.weight"
        return self.read([name])[name].float()

    def experts(self, layer: int, expert_ids: list[int], dtype: torch.dtype) -> ExpertWeights:
        """Read the routed experts `expert_ids` and stack them in that order. No other expert is read."""
        cfg = self.cfg
        if not expert_ids:
            empty = torch.empty(0, cfg.moe_intermediate, cfg.hidden, dtype=dtype)
            return ExpertWeights([], empty, empty.clone(), torch.empty(0, cfg.hidden, cfg.moe_intermediate, dtype=dtype))
        prefix = f"model.layers.{layer}.mlp.experts"
        names = [f"{prefix}.{expert}.{projection}.weight" for expert in expert_ids for projection in PROJECTIONS]
        tensors = self.read(names)
        stacked = {
            projection: torch.stack([tensors[f"{prefix}.{expert}.{projection}.weight"].to(dtype) for expert in expert_ids])
            for projection in PROJECTIONS
        }
        return ExpertWeights(list(expert_ids), stacked["gate_proj"], stacked["up_proj"], stacked["down_proj"])

    def shared_experts(self, layer: int, dtype: torch.dtype) -> SharedExpertWeights | None:
        """Read the shared experts, stored fused as one SwiGLU of width n_shared * moe_intermediate."""
        if not self.cfg.n_shared_experts:
            return None
        prefix = f"model.layers.{layer}.mlp.shared_experts"
        tensors = self.read([f"{prefix}.{projection}.weight" for projection in PROJECTIONS])
        return SharedExpertWeights(*(tensors[f"{prefix}.{projection}.weight"].to(dtype) for projection in PROJECTIONS))

    def describe(self) -> dict:
        """Name, revision and path, for run metadata."""
        return {"checkpoint": str(self.path), "checkpoint_name": self.name, "checkpoint_revision": self.revision}


def _swiglu_shapes(prefix: str, hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    return {
        f"{prefix}.gate_proj.weight": (intermediate, hidden),
        f"{prefix}.up_proj.weight": (intermediate, hidden),
        f"{prefix}.down_proj.weight": (hidden, intermediate),
    }


def _layer_list(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def _open_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {err}") from None


# ---- opening a snapshot ----


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a local snapshot: read config.json and the tensor index, check the MoE shape is supported."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} not found; pass the folder that contains config.json")
    hf_config = _read_config(path)
    name, revision = snapshot_identity(path)
    cfg = moe_config_of(hf_config, name, path)
    weight_map, index_name = _weight_map(path)
    return Checkpoint(path, name, revision, hf_config, cfg, weight_map, index_name)


def _read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint folder {str(path)!r} has no config.json")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(config_path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(config_path)!r} must hold a JSON object")
    return data


def moe_config_of(hf_config: dict, name: str, path: Path | str = "") -> MoEConfig:
    """Build the MoE shape of a DeepSeek-V2-family config.json, with the family's defaults filled in.

    Fills `hf_config` in place with those defaults. Rejects what the kit cannot represent:
    another model family, a scoring function other than softmax, and group-limited top-k
    that actually drops groups.
    """
    where = f"checkpoint {str(path)!r}"
    model_type = hf_config.get("model_type")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{where} has model_type {model_type!r}; moe_lab reads DeepSeek-V2-family checkpoints "
            f"(model_type {', '.join(map(repr, MODEL_TYPES))})"
        )
    for key, value in FAMILY_DEFAULTS.items():
        if hf_config.get(key) is None:
            hf_config[key] = value

    if hf_config["scoring_func"] != "softmax":
        raise CheckpointError(
            f"{where} scores experts with {hf_config['scoring_func']!r}; moe_lab implements the "
            f"softmax gate of DeepSeek-V2 only"
        )
    if hf_config["topk_method"] == "group_limited_greedy":
        n_group, topk_group = hf_config.get("n_group"), hf_config.get("topk_group")
        # Keeping every group (one group, or topk_group >= n_group) is plain top-k.
        if n_group is not None and (n_group == 1 or (topk_group is not None and topk_group >= n_group)):
            hf_config["topk_method"] = "greedy"
        else:
            raise CheckpointError(
                f"{where} uses group-limited top-k (n_group={n_group}, topk_group={topk_group}), which "
                f"keeps only the best {topk_group} expert groups per token; moe_lab implements plain "
                f"top-k over all experts"
            )
    for key in ("first_k_dense_replace", "moe_layer_freq"):
        value = hf_config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "first_k_dense_replace" else 1):
            raise CheckpointError(f"{where}: config.json key {key}={value!r} is invalid")
    # NOTE: transformers 5.23's DeepseekV2 router ignores norm_topk_prob, while moe_lab's gate
    # renormalises when it is true, so such a checkpoint's traces show it in their gate_check.
    try:
        return config_from_hf_dict(hf_config, name=name)
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _weight_map(path: Path) -> tuple[dict[str, str], str]:
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{str(index_path)!r} is not valid JSON: {err}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{str(index_path)!r} has no 'weight_map' object mapping tensor names to shards")
        return {str(k): str(v) for k, v in weight_map.items()}, INDEX_FILE
    single = path / SINGLE_FILE
    if single.is_file():
        with _open_safetensors(single) as handle:
            return {name: SINGLE_FILE for name in handle.keys()}, SINGLE_FILE
    others = sorted(p.name for p in path.glob("*.bin"))
    hint = f" (found {', '.join(others)}: PyTorch .bin weights are not supported, convert them to safetensors)" if others else ""
    raise CheckpointError(f"checkpoint folder {str(path)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def snapshot_identity(path: Path) -> tuple[str, str | None]:
    """Return (name, revision) of a snapshot folder.

    A Hugging Face cache folder `models--ORG--NAME/snapshots/COMMIT` gives both. Otherwise the
    name is the folder name, and the revision is read from
    the download metadata that `huggingface_hub` writes beside files fetched with `local_dir`
    (`.cache/huggingface/download/config.json.metadata`, whose first line is the commit hash),
    or from a git checkout's HEAD. A folder with none of these has no known revision.
    """
    resolved = path.resolve()
    match = HF_CACHE_SNAPSHOT.search(resolved.as_posix())
    if match:
        return f"{match['org']}/{match['name']}", match["revision"]

    name = resolved.name
    metadata = resolved / ".cache" / "huggingface" / "download" / "config.json.metadata"
    if metadata.is_file():
        first_line = metadata.read_text().splitlines()[:1]
        if first_line and re.fullmatch(r"[0-9a-f]{40}", first_line[0].strip()):
            return name, first_line[0].strip()
    return name, _git_head(resolved)


def _git_head(path: Path) -> str | None:
    head = path / ".git" / "HEAD"
    if not head.is_file():
        return None
    text = head.read_text().strip()
    if text.startswith("ref: "):
        ref = path / ".git" / text[5:]
        return ref.read_text().strip() if ref.is_file() else None
    return text or None


def open_checkpoint_layer(path: str | Path, layer: int | None = None) -> tuple[Checkpoint, int]:
    """Open a snapshot and check MoE layer `layer` (default: the first MoE layer) is complete."""
    checkpoint = open_checkpoint(path)
    if layer is None:
        layer = checkpoint.default_layer()
    checkpoint.check_layer(layer)
    return checkpoint, layer
