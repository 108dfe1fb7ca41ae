"""The sequential engine: one calibration loop for every method.

Shape (learned from llm-compressor's sequential pipeline, without its global session):

1. resolve every stage's targets on the model (names only: typos fail before any work);
2. if any stage needs activations, capture the inputs of block 0 — run the model with a
   forward pre-hook on block 0 that records ``(args, kwargs)`` (hidden states, attention mask,
   position ids / rotary embeddings, ...) and raises, so only the embeddings run;
3. for each block: materialise its weights (streaming), check them for NaN/inf, and for each
   stage in recipe order — attach the observers the stage asks for to its target linears,
   run the calibration batches through the block, detach, and let the stage compress the
   block; then run the *compressed* block on the batches so the next block calibrates on the
   inputs it will really see; finally hand the block to ``on_block_done`` (e.g. to write it
   out and release it).

Stages that need no activations (RTN) skip steps 2 and the forwards entirely.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from slimformer.engine.activations import ActivationCache
from slimformer.engine.stage import BlockContext, StageConfig, StageMethod, method_of
from slimformer.engine.targets import StagePlan, resolve
from slimformer.errors import ConfigError, SlimformerError

log = logging.getLogger(__name__)


@dataclass
class EngineOptions:
    """How calibration runs (not what is computed: results do not depend on these).

    ``batch_size``: calibration sequences per block forward. ``offload_dir``: when set,
    activations between blocks are written there (one file per batch) instead of kept in RAM.
    """

    batch_size: int = 8
    offload_dir: Optional[str | Path] = None
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"engine.batch_size: invalid value {self.batch_size!r}; allowed: integers >= 1")


@dataclass
class EngineResult:
    plans: list[StagePlan]
    blocks: int
    calibrated: bool
    seconds: float
    # hidden states after the last block (only with keep_outputs=True; used by tests)
    outputs: Optional[ActivationCache] = None
    block_seconds: list[float] = field(default_factory=list)


class _Captured(Exception):
    """Raised from block 0's pre-hook to stop the forward once its inputs are recorded."""


def _sanitize(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop KV caches (calibration is one full-sequence forward, never incremental)."""
    from transformers.cache_utils import Cache

    args = tuple(None if isinstance(a, Cache) else a for a in args)
    kwargs = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def model_inputs(lm, batch: torch.Tensor) -> dict:
    """Keyword inputs of the top model for one calibration batch of the model's kind."""
    if batch.is_floating_point():
        return {"pixel_values": batch}
    if lm.arch.kind == "causal-lm":
        return {"input_ids": batch, "use_cache": False}
    return {"input_ids": batch, "attention_mask": torch.ones_like(batch)}


def capture_block_inputs(lm, samples: torch.Tensor, batch_size: int,
                         cache: ActivationCache) -> list[tuple[tuple, dict]]:
    """Run the model up to block 0 for each batch of ``samples``; the hidden states go to
    ``cache`` and the other block arguments are returned (one ``(args[1:], kwargs)`` per
    batch, kept in memory: masks and rotary tables are small next to the hidden states)."""
    model, arch = lm.model, lm.arch
    block0 = arch.get_blocks(model)[0]
    rest: list[tuple[tuple, dict]] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict):
        args, kwargs = _sanitize(args, kwargs)
        if args:
            hidden, args = args[0], args[1:]
        else:
            key = next(iter(kwargs))  # hidden states passed by keyword
            hidden = kwargs.pop(key)
            kwargs = {**kwargs, "_hidden_key": key}
        cache.append(hidden)
        rest.append((args, kwargs))
        raise _Captured

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(**model_inputs(lm, samples[start:start + batch_size]))
            except _Captured:
                continue
            raise SlimformerError(f"block 0 of {arch.name} was never called during the forward")
    finally:
        handle.remove()
    return rest


def block_forward(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Call a block with captured arguments; returns the hidden states (first output)."""
    if "_hidden_key" in kwargs:
        kw = dict(kwargs)
        kw[kw.pop("_hidden_key")] = hidden
        out = block(*args, **kw)
    else:
        out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def check_finite(module: nn.Module, prefix: str) -> None:
    """NaN/inf in a weight would silently poison scales; name the tensor instead."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise SlimformerError(f"tensor '{prefix}{name}' contains NaN or inf values")


def plan_stages(lm, stages: Sequence[StageConfig]) -> list[tuple[StagePlan, StageMethod]]:
    """Resolve every stage on the model (names only) — all validation before any work."""
    out = []
    block_path = lm.arch.block_path(lm.model)
    for cfg in stages:
        method = method_of(cfg)
        plan = resolve(lm.model, lm.arch, cfg)
        outside = [n for n in plan.modules if not n.startswith(block_path + ".")]
        if outside and any(method.needs_calibration(plan.modules[n]) for n in outside):
            raise ConfigError(f"{cfg.METHOD}.targets: {outside[0]!r} is outside the transformer blocks; "
                              "calibrated methods support block linears only")
        out.append((plan, method))
    return out


def run(lm, stages: Sequence[StageConfig], samples: Optional[torch.Tensor] = None,
        options: Optional[EngineOptions] = None, source=None,
        on_block_done: Optional[Callable[[int, str, nn.Module], None]] = None,
        keep_outputs: bool = False) -> EngineResult:
    """Apply ``stages`` to ``lm`` in recipe order (in place): consecutive block-level stages
    share one layer-by-layer pass (:func:`run_blocks`); a model-level stage
    (``StageMethod.apply_model``: structured pruning, distillation) runs alone on the whole
    model between such passes. Arguments as in :func:`run_blocks`.
    """
    options = options or EngineOptions()
    methods = [method_of(c) for c in stages]
    if not any(m.model_level for m in methods):
        return run_blocks(lm, stages, samples, options, source, on_block_done, keep_outputs)
    from slimformer.engine.stage import ModelContext

    if source is not None:
        raise SlimformerError("model-level stages (" + ", ".join(m.name for m in methods if m.model_level)
                              + ") need the whole model in memory; run without streaming")
    plan_stages(lm, [c for c, m in zip(stages, methods) if not m.model_level])  # validate names first
    for c, m in zip(stages, methods):
        if m.model_level and m.needs_samples(c) and samples is None:
            raise SlimformerError(f"stage {m.name} needs calibration samples")
    teacher = None
    if any(m.model_level and m.needs_teacher(c) for c, m in zip(stages, methods)):
        import copy

        teacher = copy.deepcopy(lm.model).eval()
    t0 = time.perf_counter()
    total = EngineResult(plans=[], blocks=len(lm.arch.get_blocks(lm.model)), calibrated=False, seconds=0.0)
    segment: list[StageConfig] = []

    def flush(last: bool) -> None:
        if segment:
            r = run_blocks(lm, list(segment), samples, options, None,
                           on_block_done, keep_outputs and last)
            total.plans += r.plans
            total.calibrated |= r.calibrated
            total.block_seconds += r.block_seconds
            total.outputs = r.outputs
            segment.clear()

    for i, (c, m) in enumerate(zip(stages, methods)):
        if not m.model_level:
            segment.append(c)
            continue
        flush(False)
        log.info("model-level stage %s", m.name)
        m.apply_model(ModelContext(lm=lm, samples=samples, teacher=teacher, options=options), c)
        total.calibrated |= bool(m.needs_samples(c))
    flush(True)
    total.seconds = time.perf_counter() - t0
    return total


def run_blocks(lm, stages: Sequence[StageConfig], samples: Optional[torch.Tensor] = None,
               options: Optional[EngineOptions] = None, source=None,
               on_block_done: Optional[Callable[[int, str, nn.Module], None]] = None,
               keep_outputs: bool = False) -> EngineResult:
    """Apply block-level ``stages`` to ``lm`` block by block (in place).

    ``samples``: calibration inputs ([n, seq] token ids, or images for vision models); needed
    only when a stage observes activations. ``source``: a
    :class:`~slimformer.engine.streaming.SafetensorsSource` when the blocks are on ``meta``
    and must be streamed in. ``on_block_done(i, name, block)`` is called after each block is
    compressed (and its outputs propagated).
    """
    options = options or EngineOptions()
    t0 = time.perf_counter()
    torch.manual_seed(options.seed)
    model, arch = lm.model, lm.arch
    planned = plan_stages(lm, stages)
    calibrate = any(needs_calibration(p, m) for p, m in planned)
    if (calibrate or keep_outputs) and samples is None:
        names = [p.config.METHOD for p, m in planned if needs_calibration(p, m)]
        raise SlimformerError(f"stage(s) {', '.join(names) or 'engine'} need calibration samples")
    blocks = arch.get_blocks(model)
    block_path = arch.block_path(model)
    propagate = calibrate or keep_outputs

    states: Optional[ActivationCache] = None
    rest: list[tuple[tuple, dict]] = []
    result = EngineResult(plans=[p for p, _ in planned], blocks=len(blocks), calibrated=calibrate, seconds=0.0)
    with torch.no_grad():
        if propagate:
            states = ActivationCache(options.offload_dir)
            rest = capture_block_inputs(lm, samples, options.batch_size, states)
            log.info("captured block-0 inputs: %d batches, %.1f MB", len(states), states.nbytes() / 2**20)

        from tqdm.auto import tqdm

        bar = tqdm(range(len(blocks)), desc="compress", unit="block", file=sys.stderr,
                   disable=not options.progress, leave=False)
        for i in bar:
            tb = time.perf_counter()
            name = f"{block_path}.{i}"
            block = blocks[i]
            if source is not None:
                from slimformer.engine.streaming import materialize

                materialize(block, name + ".", source)
            check_finite(block, name + ".")
            need_out = propagate and (i + 1 < len(blocks) or keep_outputs)
            seq = _sequential(lm, i, name, block, planned, states, rest, options, need_out) \
                if states is not None else False
            if seq is not False and need_out:  # compressed and propagated in one staged pass
                states.close()
                states = seq
            for plan, method in (planned if seq is False else ()):
                targets = plan.in_block(name)
                if not targets:
                    continue
                ctx = BlockContext(index=i, name=name, block=block, arch=arch, config=model.config,
                                   targets=targets)
                if states is not None:
                    ctx.forward_inputs = _batches(states, rest)
                kinds = {rel: tuple(method.observers(c)) for rel, c in targets.items()}
                if any(kinds.values()):
                    ctx.stats = _calibrate(block, kinds, states, rest)
                method.apply(ctx, plan.config)
            if seq is False and need_out:  # nothing reads the last block's outputs
                nxt = ActivationCache(options.offload_dir)
                for h, (a, kw) in zip(states, rest):
                    nxt.append(block_forward(block, h, a, kw))
                states.close()
                states = nxt
            if on_block_done is not None:
                on_block_done(i, name, block)
            result.block_seconds.append(time.perf_counter() - tb)
        bar.close()

        # targets outside the blocks (e.g. lm_head asked for by name): no calibration here
        for plan, method in planned:
            outside = {n: c for n, c in plan.modules.items() if not n.startswith(block_path + ".")}
            if outside:
                for n in outside:
                    check_finite(model.get_submodule(n), n + ".")
                ctx = BlockContext(index=-1, name="", block=model, arch=arch, config=model.config,
                                   targets=outside)
                method.apply(ctx, plan.config)

    if keep_outputs:
        result.outputs = states
    elif states is not None:
        states.close()
    result.seconds = time.perf_counter() - t0
    return result


def _sequential(lm, index: int, name: str, block: nn.Module, planned, states: ActivationCache,
                rest: list[tuple[tuple, dict]], options: EngineOptions, need_out: bool):
    """Compress ``block`` in one true-sequential pass (:mod:`slimformer.engine.sequential`)
    when that applies: exactly one stage targets the block, its method and every target's
    config allow it, and the block has a staged form that reproduces its forward. Returns
    False when it does not apply (the generic pass runs), else the next block's inputs (None
    when ``need_out`` is False)."""
    from slimformer.engine.sequential import GROUPS, StagedBlock, run_sequential, staged_matches
    from slimformer.observers import make_observer

    active = [(p, m, t) for p, m in planned if (t := p.in_block(name))]
    if len(active) != 1:
        return False
    plan, method, targets = active[0]
    if not all(method.sequential(c) for c in targets.values()):
        return False
    if any(args or "_hidden_key" in kw for args, kw in rest):
        return False
    kwargs_of = [kw for _, kw in rest]
    staged = StagedBlock.build(block, lm.arch, lm.model.config, kwargs_of[0])
    if staged is None:
        if index == 0:
            log.info("%s: no staged form of this block; %s calibrates with the generic two-forward pass",
                     name, method.name)
        return False
    if set(targets) - {rel for g in GROUPS for rel in staged.members(g)}:
        return False  # a target the staged walk does not reach (a linear outside q..down)
    h0, kw0 = states[0][:1], dict(kwargs_of[0])
    mask = kw0.get("attention_mask")
    if mask is not None and mask.dim() > 0 and mask.shape[0] > 1:
        kw0["attention_mask"] = mask[:1]
    if not staged_matches(staged, lambda h: block_forward(block, h, (), kw0), h0, kw0):
        log.warning("%s: the staged forward does not reproduce the block; %s uses the generic pass",
                    name, method.name)
        return False

    observers: dict[tuple[str, ...], dict] = {}

    def observe(members: tuple[str, ...]):
        mine = [rel for rel in members if rel in targets]
        if not mine:
            return None
        kinds = list(dict.fromkeys(k for rel in mine for k in method.observers(targets[rel])))
        obs = observers[members] = {k: make_observer(k) for k in kinds}
        return lambda x: [o.observe(x) for o in obs.values()]

    def compress_group(members: tuple[str, ...]) -> None:
        group = {rel: targets[rel] for rel in members if rel in targets}
        res = {k: o.result() for k, o in observers.pop(members).items()}
        ctx = BlockContext(index=index, name=name, block=block, arch=lm.arch, config=lm.model.config,
                           targets=group, stats={rel: res for rel in group})
        method.apply(ctx, plan.config)

    return run_sequential(staged, states, kwargs_of, compress_group, observe, options.offload_dir, need_out)


def needs_calibration(plan: StagePlan, method: StageMethod) -> bool:
    """Per module: an override may switch one layer to a calibrated variant."""
    return any(method.needs_calibration(c) for c in plan.modules.values())


def _batches(states: ActivationCache, rest: list[tuple[tuple, dict]]):
    def gen():
        for h, (a, kw) in zip(states, rest):
            if "_hidden_key" in kw:
                kw = dict(kw)
                kw[kw.pop("_hidden_key")] = h
                yield a, kw
            else:
                yield (h, *a), kw

    return gen


def _calibrate(block: nn.Module, kinds: dict[str, tuple[str, ...]], states: ActivationCache,
               rest: list[tuple[tuple, dict]]) -> dict[str, dict]:
    """Run every batch through ``block`` with observers on the target linears (linears fed
    the same tensor, e.g. q/k/v, share one set: one Hessian per distinct input)."""
    from slimformer.observers import attach

    mods = {rel: block.get_submodule(rel) for rel in kinds}
    with attach(mods, kinds, share_inputs=True) as obs:
        for h, (a, kw) in zip(states, rest):
            block_forward(block, h, a, kw)
        return obs.results()


@dataclass
class BlockStatistics:
    """What :func:`collect_statistics` saw on the unmodified model: observer results keyed by
    full module name, and per block the mean ``1 - cos(h_in, h_out)`` over tokens (how much
    the block changes the residual stream: ShortGPT's block influence)."""

    stats: dict[str, dict]
    influence: list[float]


def collect_statistics(lm, observers: dict[str, tuple[str, ...]], samples: torch.Tensor,
                       options: Optional[EngineOptions] = None) -> BlockStatistics:
    """One layer-by-layer calibration pass that changes nothing: the observers named in
    ``observers`` (block-relative linear name -> observer names, e.g. ``{"mlp.down_proj":
    ("channel_norm",)}``) watch every block's linears. For model-level stages (structured
    pruning) that score the whole model before changing it."""
    from slimformer.observers import attach

    options = options or EngineOptions()
    blocks = lm.arch.get_blocks(lm.model)
    path = lm.arch.block_path(lm.model)
    out = BlockStatistics(stats={}, influence=[])
    with torch.no_grad():
        states = ActivationCache(options.offload_dir)
        rest = capture_block_inputs(lm, samples, options.batch_size, states)
        for i, block in enumerate(blocks):
            nxt = ActivationCache(options.offload_dir)
            mods = {rel: block.get_submodule(rel) for rel in observers}
            cos_sum, tokens = 0.0, 0
            with attach(mods, observers) as obs:
                for h, (a, kw) in zip(states, rest):
                    y = block_forward(block, h, a, kw)
                    cos = torch.nn.functional.cosine_similarity(h.float(), y.float(), dim=-1)
                    cos_sum += float(cos.sum())
                    tokens += cos.numel()
                    nxt.append(y)
                out.stats.update({f"{path}.{i}.{rel}": r for rel, r in obs.results().items()})
            out.influence.append(1.0 - cos_sum / max(tokens, 1))
            states.close()
            states = nxt
        states.close()
    return out
