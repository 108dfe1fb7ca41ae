"""Structured pruning that physically shrinks the model (survey §4.1; LLM-Pruner, Sheared-LLaMA).

Three kinds of structure, found through the architecture registry (never by module names):

* **attention heads** — query head ``h`` = rows ``h·d .. (h+1)·d`` of ``q`` + the same columns of
  ``o`` (``d`` = head dim). Under grouped-query attention the query heads are pruned *evenly
  within every KV group*: each KV head keeps serving the same number of query heads, so no
  K/V row is touched, the KV cache keeps its shape, and the block stays a regular GQA block
  (``num_key_value_groups`` = kept heads per group). Needs an architecture whose head dim is a
  config field (``AttentionSpec.head_dim_attr``: the llama family), so that a block with fewer
  heads than ``hidden / head_dim`` is expressible;
* **FFN channels** — channel ``j`` = row ``j`` of ``gate`` and ``up`` + column ``j`` of ``down``
  (``fc1`` row + ``fc2`` column without a gate);
* **blocks** (depth) — removed and the rest renumbered (KV-cache slot attributes and per-layer
  config lists follow, from ``ArchSpec.layer_index_attrs`` / ``per_layer_config_attrs``).

The kept rows/columns are copied into *new, smaller* ``nn.Linear`` modules. With the same
width in every block (``allocation: uniform``, Sheared-LLaMA's target shape "heads / intermediate
/ layers = X") the HF config is updated and the saved folder is also a plain Hugging Face
folder. With ``allocation: global`` the widths differ per block (the globally least important
structures go first); the config then keeps the original widths and
:func:`slimformer.formats.save_compressed` records every module shape the config cannot
express, which :func:`slimformer.load` rebuilds before assigning weights.

Importance (pure functions in :mod:`slimformer.prune.importance`) is computed once on the
dense model: ``magnitude`` (no data), ``activation`` (input channel norms of ``o`` / ``down``
from the engine's observer pass, block influence for depth) or ``taylor`` (``|W ⊙ ∂L/∂W|``
from the LM loss on the first ``samples`` calibration sequences).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from slimformer.engine.stage import (ModelContext, StageConfig, StageMethod, check_choice, check_int_range,
                                     register_stage)
from slimformer.errors import ConfigError
from slimformer.models.registry import ArchSpec, get_module, set_module
from slimformer.prune import importance as imp

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class StructuredPruneConfig(StageConfig):
    """Prune to a target shape (Sheared-LLaMA style): ``heads`` query heads per block (a
    multiple of the KV heads), ``intermediate`` FFN channels per block, ``layers`` blocks; a
    field left null is not pruned. ``allocation``: ``uniform`` (every block gets exactly the
    target) or ``global`` (the targets are per-block averages; each block keeps what its
    importance earns, FFN widths in steps of ``multiple_of``). ``importance``: ``magnitude``,
    ``activation`` or ``taylor``; the data-driven ones use the first ``samples`` calibration
    sequences. Model-level stage: ``targets``/``ignore``/``overrides`` are not used."""

    METHOD: ClassVar[str] = "prune-structured"
    VERSION: ClassVar[int] = 1

    importance: str = "taylor"
    heads: Optional[int] = None
    intermediate: Optional[int] = None
    layers: Optional[int] = None
    allocation: str = "uniform"
    multiple_of: int = 1
    samples: int = 8

    def validate(self) -> None:
        o = self.METHOD
        check_choice(o, "importance", self.importance, imp.IMPORTANCE)
        check_choice(o, "allocation", self.allocation, ALLOCATIONS)
        for f in ("heads", "intermediate", "layers"):
            check_int_range(o, f, getattr(self, f), 1, allow_none=True)
        if self.heads is None and self.intermediate is None and self.layers is None:
            raise ConfigError(f"{o}.heads: nothing to prune; set at least one of heads, intermediate, layers")
        check_int_range(o, "multiple_of", self.multiple_of, 1)
        check_int_range(o, "samples", self.samples, 1)
        if self.targets is not None or self.ignore or self.overrides:
            raise ConfigError(f"{o}.targets: a structured-pruning stage works on whole coupled groups; "
                              "allowed: targets null, ignore [], overrides {}")


# ---------------------------------------------------------------------------------------------
# coupled groups from the registry


def head_parts(arch: ArchSpec) -> tuple[imp.Part, ...]:
    return (imp.Part(arch.attention.q, 0), imp.Part(arch.attention.o, 1))


def ffn_parts(arch: ArchSpec) -> tuple[imp.Part, ...]:
    m = arch.mlp
    rows = ((imp.Part(m.gate, 0),) if m.gate else ()) + (imp.Part(m.up, 0),)
    return rows + (imp.Part(m.down, 1),)


def check_supported(arch: ArchSpec, cfg: StructuredPruneConfig) -> None:
    o = cfg.METHOD
    if arch.linear_type != "linear":
        raise ConfigError(f"{o}: architecture '{arch.name}' stores projections as {arch.linear_type}; "
                          "allowed: architectures with nn.Linear projections (llama, opt, bert, vit)")
    if cfg.heads is not None and (arch.attention.head_dim_attr is None or arch.attention.q is None):
        raise ConfigError(f"{o}.heads: head pruning needs separate q/o projections and a head dim "
                          f"stored in the config (llama family); '{arch.name}' has neither; allowed: null")
    if cfg.intermediate is not None and arch.intermediate_size_attr is None:
        raise ConfigError(f"{o}.intermediate: '{arch.name}' has no intermediate-size config field; allowed: null")


# ---------------------------------------------------------------------------------------------
# physical shrinking (new, smaller modules)


def shrink_linear(linear: nn.Linear, keep: torch.Tensor, axis: int) -> nn.Linear:
    """A new ``nn.Linear`` holding only rows (``axis`` 0: outputs, with their bias) or columns
    (``axis`` 1: inputs) ``keep`` of ``linear``."""
    w = linear.weight.detach()
    w = w.index_select(axis, keep)
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if axis == 1 else linear.bias.detach().index_select(0, keep))
    out.train(linear.training)
    return out


def _expand(keep: torch.Tensor, unit: int) -> torch.Tensor:
    """Structure indices -> the row/column indices they cover (``unit`` each, contiguous)."""
    return (keep[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)


def _shrink_parts(block: nn.Module, parts: Sequence[imp.Part], keep: torch.Tensor, unit: int) -> None:
    idx = _expand(keep, unit)
    for p in parts:
        set_module(block, p.role, shrink_linear(get_module(block, p.role), idx, p.axis))


def heads_of(block: nn.Module, arch: ArchSpec, head_dim: int) -> int:
    return get_module(block, arch.attention.q).out_features // head_dim


def prune_heads(block: nn.Module, arch: ArchSpec, head_dim: int, num_kv_heads: int, keep: torch.Tensor) -> None:
    """Keep query heads ``keep`` (indices into the block's heads; the same count in every KV
    group, see :func:`~slimformer.prune.importance.keep_heads_in_groups`)."""
    if keep.numel() % num_kv_heads:
        raise ValueError(f"{keep.numel()} heads do not split evenly over {num_kv_heads} KV heads")
    _shrink_parts(block, head_parts(arch), keep, head_dim)
    a = arch.attention
    if a.kv_groups_module_attr:
        attn = get_module(block, a.o.rpartition(".")[0])
        setattr(attn, a.kv_groups_module_attr, keep.numel() // num_kv_heads)


def prune_ffn(block: nn.Module, arch: ArchSpec, keep: torch.Tensor) -> None:
    """Keep FFN channels ``keep`` (gate/up rows, down columns)."""
    _shrink_parts(block, ffn_parts(arch), keep, 1)
    mlp = get_module(block, arch.mlp.up.rpartition(".")[0])
    attr = arch.intermediate_size_attr
    if mlp is not block and attr and isinstance(getattr(mlp, attr, None), int):
        setattr(mlp, attr, keep.numel())  # the module's own record of its width (e.g. LlamaMLP)


def drop_blocks(model: nn.Module, arch: ArchSpec, keep: Sequence[int]) -> None:
    """Keep blocks ``keep`` (in order), renumber their layer-index attributes and update the
    config's layer count and per-layer lists."""
    blocks = arch.get_blocks(model)
    n = len(blocks)
    keep = sorted(keep)
    new = nn.ModuleList([blocks[i] for i in keep])
    for j, b in enumerate(new):
        for path in arch.layer_index_attrs:
            mod_path, _, attr = path.rpartition(".")
            try:
                mod = get_module(b, mod_path)
            except AttributeError:
                continue
            if hasattr(mod, attr):
                setattr(mod, attr, j)
    set_module(model, arch.block_path(model), new)
    cfg = model.config
    setattr(cfg, arch.num_layers_attr, len(keep))
    for attr in arch.per_layer_config_attrs:
        v = getattr(cfg, attr, None)
        if isinstance(v, (list, tuple)) and len(v) == n:
            setattr(cfg, attr, [v[i] for i in keep])


def block_widths(model: nn.Module, arch: ArchSpec) -> list[dict[str, int]]:
    """Per block: query heads (when the head dim is known) and FFN channels."""
    out = []
    hd = arch.head_layout(model.config)["head_dim"] if arch.attention.q else None
    for b in arch.get_blocks(model):
        w = {"intermediate": get_module(b, arch.mlp.up).out_features}
        if hd:
            w["heads"] = heads_of(b, arch, hd)
        out.append(w)
    return out


def sync_config(model: nn.Module, arch: ArchSpec) -> list[dict[str, int]]:
    """Write every width that is the same in all blocks into the HF config (then a plain HF
    load builds exactly these shapes); non-uniform widths leave the config as it was."""
    cfg = model.config
    widths = block_widths(model, arch)
    heads = {w.get("heads") for w in widths}
    inter = {w["intermediate"] for w in widths}
    a = arch.attention
    if len(heads) == 1 and None not in heads and a.head_dim_attr:
        hd = arch.head_layout(cfg)["head_dim"]
        setattr(cfg, a.head_dim_attr, hd)  # explicit: heads · head_dim may now differ from hidden
        setattr(cfg, a.num_heads_attr, heads.pop())
    if len(inter) == 1 and arch.intermediate_size_attr:
        setattr(cfg, arch.intermediate_size_attr, inter.pop())
    return widths


# ---------------------------------------------------------------------------------------------
# importance on the dense model


@dataclass
class StructureScores:
    heads: list[torch.Tensor]  # per block: [num_heads]
    ffn: list[torch.Tensor]  # per block: [intermediate]
    blocks: list[float]  # per block


def lm_loss_gradients(model: nn.Module, samples: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``∂L/∂W`` of the named parameters, ``L`` = mean next-token loss over ``samples``
    ([n, seq] token ids, one sequence per backward to bound memory); the model is unchanged."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads: dict[str, torch.Tensor] = {}
    try:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        for n in names:
            params[n].requires_grad_(True)
        with torch.enable_grad():
            for i in range(samples.shape[0]):
                x = samples[i:i + 1]
                loss = model(input_ids=x, labels=x, use_cache=False).loss / samples.shape[0]
                loss.backward()
        grads = {n: params[n].grad.detach().clone() for n in names}
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
    return grads


def score_structures(lm, cfg: StructuredPruneConfig, samples: Optional[torch.Tensor], options=None) -> StructureScores:
    """Head, FFN-channel and block importance of the dense model (see the module docstring)."""
    from slimformer.engine.runner import collect_statistics

    model, arch = lm.model, lm.arch
    blocks = arch.get_blocks(model)
    path = arch.block_path(model)
    hd = arch.head_layout(model.config)["head_dim"]
    a, m = arch.attention, arch.mlp
    rels = list(arch.linear_names().values())  # every projection of a block (block scores use all)
    grads: dict[str, torch.Tensor] = {}
    stats = None
    if cfg.importance == "taylor":
        names = [f"{path}.{i}.{r}.weight" for i in range(len(blocks)) for r in rels]
        grads = lm_loss_gradients(model, samples, names)
    elif cfg.importance == "activation":
        stats = collect_statistics(lm, {a.o: ("channel_norm",), m.down: ("channel_norm",)}, samples, options)

    def elem(i: int, rel: str) -> Optional[torch.Tensor]:
        w = get_module(blocks[i], rel).weight
        if cfg.importance == "magnitude":
            return imp.magnitude_scores(w)
        if cfg.importance == "taylor":
            return imp.taylor_scores(w, grads[f"{path}.{i}.{rel}.weight"])
        if rel in (a.o, m.down):  # activation: defined on the consumer of each group
            return imp.activation_scores(w, stats.stats[f"{path}.{i}.{rel}"]["channel_norm"])
        return None

    out = StructureScores(heads=[], ffn=[], blocks=[])
    for i in range(len(blocks)):
        cache = {r: elem(i, r) for r in rels}
        if cfg.heads is not None:
            out.heads.append(imp.group_scores([(cache[p.role], p.axis) for p in head_parts(arch)
                                               if cache[p.role] is not None], hd))
        if cfg.intermediate is not None:
            out.ffn.append(imp.group_scores([(cache[p.role], p.axis) for p in ffn_parts(arch)
                                             if cache[p.role] is not None], 1))
        if cfg.importance == "activation":
            out.blocks.append(stats.influence[i])
        else:
            out.blocks.append(imp.block_scores_from([s for s in cache.values() if s is not None]))
    return out


# ---------------------------------------------------------------------------------------------
# the stage


def _check_targets(cfg: StructuredPruneConfig, n_blocks: int, heads: list[int], inter: list[int],
                   kv: int) -> None:
    o = cfg.METHOD
    if cfg.layers is not None and cfg.layers > n_blocks:
        raise ConfigError(f"{o}.layers: invalid value {cfg.layers}; allowed: integers 1..{n_blocks} "
                          "(the model's blocks)")
    if cfg.heads is not None and (cfg.heads % kv or cfg.heads > min(heads)):
        raise ConfigError(f"{o}.heads: invalid value {cfg.heads}; allowed: multiples of the {kv} KV heads "
                          f"from {kv} to {min(heads)} (query heads are pruned evenly within KV groups)")
    if cfg.intermediate is not None:
        lo = cfg.multiple_of if cfg.allocation == "global" else 1  # global: every block keeps one step
        if not lo <= cfg.intermediate <= min(inter):
            raise ConfigError(f"{o}.intermediate: invalid value {cfg.intermediate}; allowed: integers "
                              f"{lo}..{min(inter)}")


def plan_pruning(cfg: StructuredPruneConfig, scores: StructureScores, heads: list[int], inter: list[int],
                 kv: int) -> tuple[list[int], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Pure: (blocks kept, per kept block the query heads kept, per kept block the FFN
    channels kept) from the scores and the current widths (indices of the dense model)."""
    n = len(heads)
    kept = list(range(n))
    if cfg.layers is not None:
        kept = imp.keep_top(torch.tensor(scores.blocks, dtype=torch.float64), cfg.layers).tolist()
    keep_h: dict[int, torch.Tensor] = {}
    keep_f: dict[int, torch.Tensor] = {}
    if cfg.heads is not None:
        if cfg.allocation == "uniform":
            per_group = {i: cfg.heads // kv for i in kept}
        else:
            costs = [imp.head_removal_steps(scores.heads[i], kv) for i in kept]
            total = sum(heads[i] // kv - cfg.heads // kv for i in kept)
            counts = imp.global_removal(costs, total, [heads[i] // kv - 1 for i in kept])
            per_group = {i: heads[i] // kv - c for i, c in zip(kept, counts)}
        keep_h = {i: imp.keep_heads_in_groups(scores.heads[i], kv, g) for i, g in per_group.items()}
    if cfg.intermediate is not None:
        if cfg.allocation == "uniform":
            width = {i: cfg.intermediate for i in kept}
        else:
            step = cfg.multiple_of
            costs = [imp.removal_steps(scores.ffn[i], step) for i in kept]
            total = sum(inter[i] - cfg.intermediate for i in kept) // step
            counts = imp.global_removal(costs, total, [inter[i] // step - 1 for i in kept])
            width = {i: inter[i] - c * step for i, c in zip(kept, counts)}
        keep_f = {i: imp.keep_top(scores.ffn[i], w) for i, w in width.items()}
    return kept, keep_h, keep_f


def apply_structured(mctx: ModelContext, cfg: StructuredPruneConfig) -> None:
    lm = mctx.lm
    model, arch = lm.model, lm.arch
    check_supported(arch, cfg)
    blocks = arch.get_blocks(model)
    layout = arch.head_layout(model.config)
    hd, kv = layout["head_dim"], layout["num_kv_heads"]
    widths = block_widths(model, arch)
    heads = [w.get("heads", layout["num_heads"]) for w in widths]
    inter = [w["intermediate"] for w in widths]
    _check_targets(cfg, len(blocks), heads, inter, kv)
    samples = None
    if needs_samples(cfg):
        samples = mctx.samples[:cfg.samples]
    before = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    scores = score_structures(lm, cfg, samples, mctx.options)
    kept, keep_h, keep_f = plan_pruning(cfg, scores, heads, inter, kv)
    for i, k in keep_h.items():
        prune_heads(blocks[i], arch, hd, kv, k)
    for i, k in keep_f.items():
        prune_ffn(blocks[i], arch, k)
    if len(kept) < len(blocks):
        drop_blocks(model, arch, kept)
    widths = sync_config(model, arch)
    model.train(was_training)
    after = sum(p.numel() for p in model.parameters())
    lm.meta = {**lm.meta, "structure": {"blocks_kept": kept, "widths": widths,
                                        "parameters_before": before, "parameters_after": after}}
    log.info("structured pruning (%s, %s): %d -> %d parameters (%.1f%% removed), %d blocks",
             cfg.importance, cfg.allocation, before, after, 100 * (1 - after / before), len(kept))


def needs_samples(cfg: StructuredPruneConfig) -> bool:
    return cfg.importance in ("activation", "taylor")


register_stage(StageMethod(
    name=StructuredPruneConfig.METHOD, config_cls=StructuredPruneConfig, apply=lambda ctx, cfg: None,
    apply_model=apply_structured, needs_samples=needs_samples,
    about="structured pruning to a target shape (heads / FFN channels / blocks); really smaller matrices"))


__all__ = ["StructuredPruneConfig", "StructureScores", "apply_structured", "block_widths", "drop_blocks",
           "ffn_parts", "head_parts", "lm_loss_gradients", "plan_pruning", "prune_ffn", "prune_heads",
           "score_structures", "shrink_linear", "sync_config"]
