"""Expert placement on ranks, and the routing sources: the gate, synthetic routing and explicit routing."""

from __future__ import annotations

from .errors import InputError

from dataclasses import dataclass

import torch

from .config import MoEConfig
from .moe import STREAM_ROUTING, gate, make_generator

PLACEMENTS = ("contiguous", "round_robin")
SYNTHETIC_ROUTINGS = ("uniform", "skewed", "local")
ROUTINGS = ("gate",) + SYNTHETIC_ROUTINGS


class RoutingError(InputError):
    """Invalid routing or placement input."""


@dataclass(frozen=True)
class Placement:
    """Which rank holds each routed expert.

    contiguous: rank r holds experts r*E/W .. (r+1)*E/W - 1 (needs E divisible by W).
    round_robin: expert e lives on rank e % W, as local expert e // W.
    """

    kind: str
    n_experts: int
    world_size: int

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENTS:
            raise RoutingError(f"unknown placement {self.kind!r}; choose one of {', '.join(PLACEMENTS)}")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise RoutingError(f"world_size must be an integer >= 1, got {self.world_size!r}")
        if self.n_experts < self.world_size:
            raise RoutingError(
                f"{self.n_experts} experts cannot be spread over {self.world_size} ranks: "
                f"use at most {self.n_experts} ranks so each rank holds at least one expert"
            )
        if self.kind == "contiguous" and self.n_experts % self.world_size:
            raise RoutingError(
                f"contiguous placement needs n_experts divisible by world_size, got "
                f"{self.n_experts} experts on {self.world_size} ranks: use --placement round_robin "
                f"or a world size that divides {self.n_experts}"
            )

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Rank holding each expert id (same shape, int64)."""
        ids = expert_ids.long()
        if self.kind == "contiguous":
            return ids // (self.n_experts // self.world_size)
        return ids % self.world_size

    def local_index(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Index of each expert among its owner's local experts (same shape, int64)."""
        ids = expert_ids.long()
        if self.kind == "contiguous":
            return ids % (self.n_experts // self.world_size)
        return ids // self.world_size

    def owner_table(self) -> torch.Tensor:
        """(n_experts,) int64: owner_table()[e] is the rank holding expert e."""
        return self.owner(torch.arange(self.n_experts))

    def local_experts(self, rank: int) -> list[int]:
        """Global ids of the experts on `rank`, in local order."""
        if self.kind == "contiguous":
            per_rank = self.n_experts // self.world_size
            return list(range(rank * per_rank, (rank + 1) * per_rank))
        return list(range(rank, self.n_experts, self.world_size))


@dataclass
class Routing:
    """Per-rank routing: rank r's token t goes to experts topk_ids[r][t] with topk_weights[r][t]."""

    topk_ids: list[torch.Tensor]  # per rank: (T_r, k), int64 or int32
    topk_weights: list[torch.Tensor]  # per rank: (T_r, k), float32

    def concat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate the ranks' routing in rank order: ((T, k) ids, (T, k) weights)."""
        return torch.cat(self.topk_ids), torch.cat(self.topk_weights)


def validate_routing(
    routing: Routing, cfg: MoEConfig, tokens_per_rank: list[int], source: str = "routing"
) -> None:
    """Reject ids out of range, repeated experts, bad weights and shapes before any collective."""
    if len(routing.topk_ids) != len(tokens_per_rank) or len(routing.topk_weights) != len(tokens_per_rank):
        raise RoutingError(
            f"{source}: routing is given for {len(routing.topk_ids)} ranks but tokens_per_rank has "
            f"{len(tokens_per_rank)} entries; give one list of tokens per rank"
        )
    for rank, (ids, weights, tokens) in enumerate(zip(routing.topk_ids, routing.topk_weights, tokens_per_rank)):
        where = f"{source}: rank {rank}"
        if tuple(ids.shape) != (tokens, cfg.top_k):
            raise RoutingError(
                f"{where}: topk_ids has shape {tuple(ids.shape)} but tokens_per_rank[{rank}]={tokens} "
                f"and top_k={cfg.top_k} need ({tokens}, {cfg.top_k})"
            )
        if tuple(weights.shape) != (tokens, cfg.top_k):
            raise RoutingError(
                f"{where}: topk_weights has shape {tuple(weights.shape)}, expected ({tokens}, {cfg.top_k})"
            )
        if ids.dtype not in (torch.int64, torch.int32):
            raise RoutingError(f"{where}: expert ids must be int64 or int32, got {ids.dtype}")
        if tokens == 0:
            continue
        bad = (ids < 0) | (ids >= cfg.n_experts)
        if bad.any():
            t, j = (int(i) for i in bad.nonzero()[0])
            raise RoutingError(
                f"{where}: token {t} has expert id {int(ids[t, j])}, outside 0..{cfg.n_experts - 1}; "
                f"expert ids must index the {cfg.n_experts} routed experts"
            )
        sorted_ids = ids.sort(dim=1).values
        repeated = (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(dim=1)
        if repeated.any():
            t = int(repeated.nonzero()[0])
            raise RoutingError(
                f"{where}: token {t} picks the same expert twice in {ids[t].tolist()}; "
                f"each token's top-k experts must be distinct"
            )
        if not torch.isfinite(weights).all():
            t = int((~torch.isfinite(weights)).any(dim=1).nonzero()[0])
            raise RoutingError(
                f"{where}: token {t} has non-finite weights {weights[t].tolist()}; weights must be finite numbers >= 0"
            )
        if (weights < 0).any():
            t = int((weights < 0).any(dim=1).nonzero()[0])
            raise RoutingError(
                f"{where}: token {t} has negative weights {weights[t].tolist()}; weights must be >= 0"
            )


def gate_routing(hidden_per_rank: list[torch.Tensor], gate_weight: torch.Tensor, cfg: MoEConfig) -> Routing:
    """Route each rank's tokens with the real gate."""
    pairs = [gate(hidden, gate_weight, cfg) for hidden in hidden_per_rank]
    return Routing([ids for ids, _ in pairs], [weights for _, weights in pairs])


def _random_weights(tokens: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(tokens, k, generator=generator), dim=-1)


def _pick_distinct(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Pick `count` distinct entries of `pool`, uniformly at random."""
    return pool[torch.randperm(len(pool), generator=generator)[:count]]


def synthetic_routing(
    kind: str,
    cfg: MoEConfig,
    placement: Placement,
    tokens_per_rank: list[int],
    seed: int,
    locality: float = 1.0,
    zipf_exponent: float = 1.2,
) -> Routing:
    """Draw routing without a gate.

    uniform: each token picks top_k distinct experts uniformly at random.
    skewed: experts are drawn without replacement with Zipf-like popularity 1/(rank+1)**zipf_exponent,
        the popularity order itself a seeded shuffle of the experts.
    local: each token puts a fraction `locality` of its top_k experts on its own rank (the
        fraction is met in expectation: floor(p*k) local experts, plus one more with the
        remaining probability). locality=1 means no token needs a remote expert. With one rank
        every expert is local.
    Weights are a softmax over random scores of the chosen experts.
    """
    if kind not in SYNTHETIC_ROUTINGS:
        raise RoutingError(f"unknown routing {kind!r}; choose one of {', '.join(ROUTINGS)}")
    if not 0.0 <= locality <= 1.0:
        raise RoutingError(f"locality must be between 0 and 1, got {locality!r}")
    k, E = cfg.top_k, cfg.n_experts
    ids_per_rank, weights_per_rank = [], []

    popularity = None
    if kind == "skewed":
        generator = make_generator(seed, STREAM_ROUTING, 10_000)
        ranks_by_expert = torch.randperm(E, generator=generator).float()
        popularity = (ranks_by_expert + 1.0) ** -zipf_exponent  # (E,)

    for rank, tokens in enumerate(tokens_per_rank):
        generator = make_generator(seed, STREAM_ROUTING, rank)
        ids = torch.empty(tokens, k, dtype=torch.int64)
        if kind == "uniform":
            ids = torch.rand(tokens, E, generator=generator).argsort(dim=1)[:, :k].contiguous()
        elif kind == "skewed":
            if tokens:
                ids = torch.multinomial(popularity.expand(tokens, E), k, replacement=False, generator=generator)
        else:
            ids = _local_ids(cfg, placement, rank, tokens, locality, generator)
        ids_per_rank.append(ids)
        weights_per_rank.append(_random_weights(tokens, k, generator))
    return Routing(ids_per_rank, weights_per_rank)


def _local_ids(
    cfg: MoEConfig, placement: Placement, rank: int, tokens: int, locality: float, generator: torch.Generator
) -> torch.Tensor:
    k = cfg.top_k
    local = torch.tensor(placement.local_experts(rank))
    is_local = torch.zeros(cfg.n_experts, dtype=torch.bool)
    is_local[local] = True
    remote = (~is_local).nonzero().flatten()
    if len(remote) == 0:
        locality = 1.0  # one rank: every expert is local

    base, fraction = divmod(locality * k, 1.0)
    extra = torch.rand(tokens, generator=generator) < fraction
    ids = torch.empty(tokens, k, dtype=torch.int64)
    for t in range(tokens):
        n_local = int(base) + int(extra[t])
        if n_local > len(local) or k - n_local > len(remote):
            raise RoutingError(
                f"locality={locality} needs {n_local} local and {k - n_local} remote experts per "
                f"token, but rank {rank} holds {len(local)} of {cfg.n_experts} experts: lower top_k "
                f"or use fewer ranks"
            )
        chosen = torch.cat([_pick_distinct(local, n_local, generator), _pick_distinct(remote, k - n_local, generator)])
        ids[t] = chosen[torch.randperm(k, generator=generator)]
    return ids
