"""Which global ranks load data and which train the model, validated once at start."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, TopologyConfig


@dataclass(frozen=True)
class Topology:
    """Loader ranks feed model ranks. ``model_ranks`` is sorted; a model rank's index in it is its data shard."""

    world_size: int
    loader_to_model: dict[int, tuple[int, ...]]
    model_ranks: tuple[int, ...]

    @property
    def loader_ranks(self) -> tuple[int, ...]:
        return tuple(sorted(self.loader_to_model))

    @property
    def has_loaders(self) -> bool:
        return bool(self.loader_to_model)

    def is_loader(self, rank: int) -> bool:
        return rank in self.loader_to_model

    def model_index(self, rank: int) -> int:
        """Position of a model rank among all model ranks (which slice of each global batch it trains on)."""
        return self.model_ranks.index(rank)

    def loader_of(self, model_rank: int) -> int | None:
        for loader, models in self.loader_to_model.items():
            if model_rank in models:
                return loader
        return None


def build_topology(cfg: TopologyConfig, world_size: int, local_world_size: int) -> Topology:
    """Resolve ``topology.loader_to_model`` or ``topology.loaders_per_node`` and check it covers every rank."""
    if cfg.loaders_per_node:
        mapping = _per_node_rule(cfg.loaders_per_node, world_size, local_world_size)
    else:
        mapping = {int(k): tuple(int(r) for r in v) for k, v in cfg.loader_to_model.items()}
    _validate(mapping, world_size)
    loaders = set(mapping)
    model_ranks = tuple(r for r in range(world_size) if r not in loaders)
    return Topology(world_size, mapping, model_ranks)


def _per_node_rule(k: int, world_size: int, local_world_size: int) -> dict[int, tuple[int, ...]]:
    """First k local ranks of each node load; the node's model ranks are dealt out to them in contiguous runs."""
    if local_world_size <= k:
        raise ConfigError(
            f"topology.loaders_per_node={k} leaves no model rank on a node of {local_world_size} ranks; "
            "lower it or start more processes per node"
        )
    if world_size % local_world_size:
        raise ConfigError(f"world size {world_size} is not a multiple of the {local_world_size} ranks per node")
    mapping = {}
    for node_start in range(0, world_size, local_world_size):
        models = list(range(node_start + k, node_start + local_world_size))
        share = -(-len(models) // k)
        for j in range(k):
            mapping[node_start + j] = tuple(models[j * share : (j + 1) * share])
    return mapping


def _validate(mapping: dict[int, tuple[int, ...]], world_size: int) -> None:
    seen: dict[int, int] = {}
    for loader, models in mapping.items():
        if not 0 <= loader < world_size:
            raise ConfigError(f"topology.loader_to_model: loader rank {loader} is outside the world of {world_size}")
        if not models:
            raise ConfigError(f"topology.loader_to_model: loader rank {loader} has no model ranks")
        for r in models:
            if not 0 <= r < world_size:
                raise ConfigError(f"topology.loader_to_model: model rank {r} is outside the world of {world_size}")
            if r in mapping:
                raise ConfigError(f"topology.loader_to_model: rank {r} is listed both as a loader and a model rank")
            if r in seen:
                raise ConfigError(f"topology.loader_to_model: model rank {r} is fed by loaders {seen[r]} and {loader}")
            seen[r] = loader
    if mapping:
        orphans = [r for r in range(world_size) if r not in mapping and r not in seen]
        if orphans:
            raise ConfigError(
                f"topology.loader_to_model: ranks {orphans} are neither loaders nor fed by one; "
                f"every one of the {world_size} ranks needs a role"
            )
    if world_size - len(mapping) < 1:
        raise ConfigError("topology leaves no model rank")
