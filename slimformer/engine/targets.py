"""Which modules a stage touches: ``targets`` / ``ignore`` / ``overrides`` resolved against a
model (real or on ``meta`` — only names and types are read, so this runs before any weight
is loaded and a typo fails before any work).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn as nn

from slimformer.engine.stage import StageConfig, compile_pattern
from slimformer.errors import ConfigError

log = logging.getLogger(__name__)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or Hugging Face's GPT-2 ``Conv1D`` (same math, transposed weight)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_names(model: nn.Module) -> list[str]:
    """Every linear module's full dotted name, in module order."""
    return [n for n, m in model.named_modules() if n and is_linear(m)]


def default_target_names(model: nn.Module, arch) -> list[str]:
    """The projections the ArchSpec lists, in every block: never embeddings or the head."""
    base = arch.block_path(model)
    n_blocks = len(arch.get_blocks(model))
    rels = set(arch.linear_names().values())
    names = set(linear_names(model))
    out = []
    for i in range(n_blocks):
        for rel in arch.linear_names().values():
            full = f"{base}.{i}.{rel}"
            if full in names:
                out.append(full)
    if not out:
        raise ConfigError(f"architecture '{arch.name}': no block linears found ({sorted(rels)})")
    return out


@dataclass(frozen=True)
class StagePlan:
    """One stage resolved on one model: full module name -> effective config."""

    config: StageConfig
    modules: dict[str, StageConfig]

    def in_block(self, block_name: str) -> dict[str, StageConfig]:
        """Targets inside ``block_name`` keyed by their block-relative names."""
        p = block_name + "."
        return {n[len(p):]: c for n, c in self.modules.items() if n.startswith(p)}


def resolve(model: nn.Module, arch, cfg: StageConfig) -> StagePlan:
    """Resolve a stage's targeting on ``model``; unmatched target/override patterns raise."""
    owner = cfg.METHOD
    all_linears = linear_names(model)
    if cfg.targets is None:
        chosen = default_target_names(model, arch)
    else:
        chosen_set: set[str] = set()
        for pat in cfg.targets:
            match = compile_pattern(owner, "targets", pat)
            hits = [n for n in all_linears if match(n)]
            if not hits:
                raise ConfigError(
                    f"{owner}.targets: {pat!r} matches no linear module of this "
                    f"{arch.name} model; allowed: names like {all_linears[0]!r} or 're:<regex>' "
                    f"(full match)")
            chosen_set.update(hits)
        chosen = [n for n in all_linears if n in chosen_set]
    for pat in cfg.ignore:
        match = compile_pattern(owner, "ignore", pat)
        before = len(chosen)
        chosen = [n for n in chosen if not match(n)]
        if len(chosen) == before:
            log.warning("%s.ignore: %r matches none of the targets", owner, pat)
    for pat in cfg.overrides:
        match = compile_pattern(owner, "overrides", pat)
        if not any(match(n) for n in chosen):
            raise ConfigError(f"{owner}.overrides: {pat!r} matches none of the stage's target modules")
    if not chosen:
        raise ConfigError(f"{owner}: targets minus ignore leaves no module to compress")
    return StagePlan(config=cfg, modules={n: cfg.for_module(n) for n in chosen})
