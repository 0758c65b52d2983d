"""The shape of one MoE layer: `MoEConfig`, its presets, and loading a Hugging Face config.json."""

from __future__ import annotations

from .errors import InputError

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# The only gate variants the kit implements: DeepSeek-V2-Lite uses both.
SUPPORTED_SCORING = ("softmax",)
SUPPORTED_TOPK_METHODS = ("greedy",)


class ConfigError(InputError):
    """An invalid MoE shape, preset or config file."""


@dataclass(frozen=True)
class MoEConfig:
    hidden: int  # model width: one token row has this many elements
    moe_intermediate: int  # width of one routed expert's SwiGLU
    n_experts: int  # routed experts
    top_k: int  # routed experts per token
    n_shared_experts: int = 0  # fused into one SwiGLU of width n_shared_experts * moe_intermediate
    scoring_func: str = "softmax"  # gate scores: softmax over all routed experts
    topk_method: str = "greedy"  # plain top-k, no expert groups
    norm_topk_prob: bool = False  # DeepSeek-V2-Lite keeps the raw softmax weights
    routed_scaling_factor: float = 1.0  # multiplies the routed output after optional renormalisation
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for field in ("hidden", "moe_intermediate", "n_experts", "top_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            raise ConfigError(
                f"n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}"
            )
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"top_k={self.top_k} is larger than n_experts={self.n_experts}: "
                f"choose top_k between 1 and {self.n_experts}"
            )
        if self.scoring_func not in SUPPORTED_SCORING:
            raise ConfigError(
                f"scoring_func {self.scoring_func!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_SCORING)}"
            )
        if self.topk_method not in SUPPORTED_TOPK_METHODS:
            raise ConfigError(
                f"topk_method {self.topk_method!r} is not supported (group-limited top-k is not "
                f"implemented); supported: {', '.join(SUPPORTED_TOPK_METHODS)}"
            )
        if not self.routed_scaling_factor > 0:
            raise ConfigError(
                f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}"
            )

    @property
    def shared_intermediate(self) -> int:
        return self.n_shared_experts * self.moe_intermediate

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def flops_per_token(self) -> int:
        """Multiply-add FLOPs of the routed and shared experts for one token (gate excluded)."""
        per_expert = 2 * 3 * self.hidden * self.moe_intermediate
        return self.top_k * per_expert + 2 * 3 * self.hidden * self.shared_intermediate


PRESETS: dict[str, MoEConfig] = {
    # deepseek-ai/DeepSeek-V2-Lite config.json: one MoE layer of the released model.
    "deepseek-v2-lite": MoEConfig(
        hidden=2048,
        moe_intermediate=1408,
        n_experts=64,
        top_k=6,
        n_shared_experts=2,
        name="deepseek-v2-lite",
    ),
    # Small enough that a test launches ranks and runs every path in about a second.
    "tiny": MoEConfig(
        hidden=32,
        moe_intermediate=48,
        n_experts=8,
        top_k=2,
        n_shared_experts=1,
        name="tiny",
    ),
}

# Keys of a Hugging Face DeepSeek-V2 config.json and the MoEConfig field each one sets.
HF_REQUIRED_KEYS = {
    "hidden_size": "hidden",
    "moe_intermediate_size": "moe_intermediate",
    "n_routed_experts": "n_experts",
    "num_experts_per_tok": "top_k",
}
HF_OPTIONAL_KEYS = {
    "n_shared_experts": "n_shared_experts",
    "scoring_func": "scoring_func",
    "topk_method": "topk_method",
    "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "routed_scaling_factor",
}


def config_from_hf_dict(data: dict, name: str = "custom") -> MoEConfig:
    missing = [key for key in HF_REQUIRED_KEYS if data.get(key) is None]
    if missing:
        raise ConfigError(
            f"config {name!r} is missing required keys {missing}; a DeepSeek-V2 MoE config "
            f"needs {sorted(HF_REQUIRED_KEYS)}"
        )
    fields = {field: data[key] for key, field in HF_REQUIRED_KEYS.items()}
    for key, field in HF_OPTIONAL_KEYS.items():
        if data.get(key) is not None:
            fields[field] = data[key]
    if data.get("topk_method") == "group_limited_greedy" and data.get("n_group", 1) == 1:
        # One group makes group-limited top-k the same as greedy top-k.
        fields["topk_method"] = "greedy"
    return MoEConfig(name=name, **fields)


def load_hf_config(path: str | Path) -> MoEConfig:
    """Read the MoE fields of a Hugging Face DeepSeek-V2 `config.json`."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass a preset name or a config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return config_from_hf_dict(data, name=path.parent.name or path.stem)


def resolve_config(preset: str | Path | MoEConfig) -> MoEConfig:
    """Return the preset of that name, load it as a config.json path, or pass a MoEConfig through."""
    if isinstance(preset, MoEConfig):
        return preset
    if str(preset) in PRESETS:
        return PRESETS[str(preset)]
    looks_like_path = str(preset).endswith(".json") or "/" in str(preset) or Path(preset).exists()
    if looks_like_path:
        return load_hf_config(preset)
    raise ConfigError(
        f"unknown preset {str(preset)!r}; choose one of {sorted(PRESETS)} or give a path to a config.json"
    )
