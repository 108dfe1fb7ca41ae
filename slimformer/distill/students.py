"""Students made from the teacher itself: keep a subset of its blocks (DistilBERT / TinyBERT
initialisation), found through the architecture registry — no per-model code.

The student is a normal model of the same class with fewer blocks; it saves as a plain Hugging
Face folder that :func:`slimformer.load` and ``transformers`` both load.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence, Union

import torch.nn as nn

from slimformer.errors import SlimformerError

KEEP_RULES = ("uniform", "every-other", "first")


def keep_indices(n_teacher: int, n_student: int, rule: str = "uniform") -> tuple[int, ...]:
    """Which teacher blocks (0-based) the student keeps.

    ``uniform``: evenly spaced, always the first and the last block (``round(linspace(0, n-1,
    k))``; the first block of a decoder is the one it can least do without). ``every-other``:
    ``2i+1`` — blocks 1, 3, 5, ... (needs ``n_teacher == 2 n_student``; matches
    :func:`~slimformer.distill.losses.layer_map`'s ``every-other``). ``first``: the first ``k``.
    """
    if not 1 <= n_student <= n_teacher:
        raise SlimformerError(f"a layer-drop student keeps 1..{n_teacher} blocks (asked for {n_student})")
    if rule == "uniform":
        if n_student == 1:
            return (n_teacher - 1,)
        return tuple(round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student))
    if rule == "every-other":
        if n_teacher != 2 * n_student:
            raise SlimformerError(f"every-other keeps half the blocks: {n_teacher} -> {n_teacher // 2}, "
                                  f"not {n_student}")
        return tuple(2 * i + 1 for i in range(n_student))
    if rule == "first":
        return tuple(range(n_student))
    raise SlimformerError(f"unknown layer-keep rule {rule!r}; allowed: {', '.join(KEEP_RULES)}")


def drop_layers(model: nn.Module, arch, keep: Sequence[int]) -> nn.Module:
    """A deep copy of ``model`` holding only the blocks ``keep`` (in that order), with the
    config's layer count, per-layer config lists and the blocks' KV-cache ``layer_idx`` renumbered."""
    n = len(arch.get_blocks(model))
    keep = [int(k) for k in keep]
    if not keep or any(not 0 <= k < n for k in keep) or len(set(keep)) != len(keep):
        raise SlimformerError(f"blocks to keep must be distinct indices in 0..{n - 1} (got {keep})")
    student = copy.deepcopy(model)
    from slimformer.models.registry import set_module

    old = arch.get_blocks(student)
    set_module(student, arch.block_path(student), nn.ModuleList([old[k] for k in keep]))
    cfg = getattr(student.config, "text_config", None) or student.config
    setattr(cfg, arch.num_layers_attr, len(keep))
    for attr in ("layer_types",):  # per-layer lists in newer HF configs (sliding / full attention)
        v = getattr(cfg, attr, None)
        if isinstance(v, (list, tuple)) and len(v) == n:
            setattr(cfg, attr, [v[k] for k in keep])
    for i, block in enumerate(arch.get_blocks(student)):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i  # the KV cache is indexed by the new position
    return student


def layer_drop_student(lm, n_layers: Union[int, Sequence[int]], rule: str = "uniform"):
    """A :class:`~slimformer.models.LoadedModel` student keeping ``n_layers`` of the teacher's blocks
    (chosen by ``rule``) or exactly the block indices given, initialised from those blocks."""
    from slimformer.models.loading import LoadedModel

    n = len(lm.arch.get_blocks(lm.model))
    keep = keep_indices(n, n_layers, rule) if isinstance(n_layers, int) else tuple(n_layers)
    model = drop_layers(lm.model, lm.arch, keep)
    return LoadedModel(model=model, tokenizer=lm.tokenizer, arch=lm.arch, name=f"{lm.name}-L{len(keep)}",
                       source=lm.source, meta={"student_of": lm.name, "kept_blocks": list(keep)})


def parse_student(spec: str) -> tuple[Union[int, tuple[int, ...]], str]:
    """CLI student spec: ``layers:15`` (uniform), ``layers:15:every-other``, ``layers:0,2,4``."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != "layers" or not parts[1]:
        raise SlimformerError(f"student spec {spec!r}: expected layers:N[:rule] or layers:i,j,k")
    rule = parts[2] if len(parts) > 2 else "uniform"
    if rule not in KEEP_RULES:
        raise SlimformerError(f"student spec {spec!r}: unknown rule {rule!r}; allowed: {', '.join(KEEP_RULES)}")
    try:
        if "," in parts[1]:
            return tuple(int(x) for x in parts[1].split(",")), rule
        return int(parts[1]), rule
    except ValueError:
        raise SlimformerError(f"student spec {spec!r}: layer count/indices must be integers")


def save_student(lm, out_dir: Union[str, Path]) -> Path:
    """Save as a plain Hugging Face folder (safetensors + config + tokenizer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(str(out))
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(out))
    return out
