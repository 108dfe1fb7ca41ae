"""``slimformer.compress``: model + recipe -> compressed model (and, optionally, a folder).

The pipeline is deliberately short: validate everything cheap (recipe fields, output folder,
calibration settings), load the model (on ``meta`` when streaming), resolve the recipe's
targets (a typo fails here, before any weight is touched), draw the calibration samples the
protocol prescribes, run the engine, and save through :mod:`slimformer.formats` into a
temporary sibling folder that is renamed into place only when complete — an interrupted run
never leaves a folder that looks finished.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from slimformer.engine.runner import EngineOptions, needs_calibration, plan_stages, run
from slimformer.engine.stage import check_bool, check_int_range
from slimformer.errors import ConfigError, SlimformerError
from slimformer.quant.head import has_lm_head, quantize_head
from slimformer.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

TMP_MARK = ".slimformer-tmp-"


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data and how it is fed (protocol defaults: 128 x 512 WikiText-2 valid
    tokens drawn with seed 0). ``offload`` keeps inter-block activations on disk."""

    samples: int = 128
    seq_len: int = 512
    source: str = "wikitext2"
    seed: int = 0
    batch_size: int = 8
    offload: bool = False

    def __post_init__(self) -> None:
        from slimformer.data import CALIBRATION_SOURCES

        check_int_range("calibration", "samples", self.samples, 1)
        check_int_range("calibration", "seq_len", self.seq_len, 1)
        check_int_range("calibration", "seed", self.seed, 0)
        check_int_range("calibration", "batch_size", self.batch_size, 1)
        check_bool("calibration", "offload", self.offload)
        if self.source not in CALIBRATION_SOURCES:
            raise ConfigError(f"calibration.source: invalid value {self.source!r}; allowed: "
                              + ", ".join(CALIBRATION_SOURCES))


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output (before any work) unless ``overwrite``."""
    if out_dir.exists() and not overwrite:
        raise SlimformerError(f"output folder '{out_dir}' already exists; pass --overwrite "
                              "(overwrite=True) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise SlimformerError(f"output path '{out_dir}' exists and is not a folder")
    parent = out_dir.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)


def _load_model(model: Any, stream: bool):
    """A LoadedModel from a name/path/LoadedModel; ``stream``: blocks on meta + a source."""
    from slimformer.models.loading import LoadedModel, load

    if isinstance(model, LoadedModel):
        return model, None
    if stream:
        from slimformer.engine.streaming import build_meta_model

        p = Path(str(model)).expanduser()
        if not (p.is_dir() and (p / "config.json").exists()):
            raise SlimformerError(f"streaming needs a Hugging Face folder with safetensors, got '{model}'")
        return build_meta_model(p)
    return load(model), None


def calibration_inputs(lm, cal: CalibrationConfig) -> torch.Tensor:
    """[n, seq_len] token ids per the protocol (vision models are not calibrated here)."""
    from slimformer.data import calibration_samples

    if lm.tokenizer is None:
        raise SlimformerError(f"model '{lm.name}' has no tokenizer: cannot draw calibration text")
    ids = calibration_samples(lm.tokenizer, n=cal.samples, seq_len=cal.seq_len, source=cal.source, seed=cal.seed)
    limit = _max_positions(lm.model.config)
    if limit is not None and cal.seq_len > limit:
        raise ConfigError(f"calibration.seq_len: {cal.seq_len} exceeds the model's {limit} positions")
    return ids


def _max_positions(config) -> Optional[int]:
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(config, attr, None)
        if isinstance(v, int):
            return v
    return None


def compress(model: Any, recipe: Any, out_dir: Optional[str | os.PathLike] = None,
             calibration: Optional[CalibrationConfig | dict] = None, overwrite: bool = False,
             stream: bool = False, progress: bool = True, reload: bool = True):
    """Compress ``model`` (bundled name, HF folder, .gguf, or a LoadedModel — modified in
    place) with ``recipe`` (a named recipe, YAML path/text, Recipe or stage config).

    With ``out_dir`` the result is also saved (refusing an existing folder unless
    ``overwrite``). ``stream=True`` builds the model on ``meta`` from an HF folder and reads
    each block's weights from safetensors when it is processed, and — with ``out_dir`` —
    writes each compressed block out and drops it, so peak memory is about one block.
    Returns the compressed :class:`~slimformer.models.LoadedModel`; a streamed run with
    ``out_dir`` has dropped its blocks, so it returns the folder reloaded — or ``None`` with
    ``reload=False`` (the result is on disk; e.g. to measure compression memory alone).
    """
    t0 = time.perf_counter()
    rec: Recipe = load_recipe(recipe)
    cal = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig(**(calibration or {}))
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    if out is not None:
        check_output_dir(out, overwrite)
    lm, source = _load_model(model, stream)
    head = rec.head
    if head is not None and not has_lm_head(lm):
        # one recipe serves decoders and encoders alike (w8a8 on MiniLM): nothing to do here
        log.info("recipe.head: %s applies to causal LMs; '%s' is a %s model, skipped",
                 head, lm.name, lm.arch.kind)
        head = None
    planned = plan_stages(lm, rec.stages)  # every target resolves, before any weight work
    needs_data = any(needs_calibration(p, m) for p, m in planned)  # per module: overrides count
    samples = calibration_inputs(lm, cal) if needs_data else None
    options = EngineOptions(batch_size=cal.batch_size, progress=progress, seed=cal.seed)
    meta = {"recipe": rec.to_dict(), "calibration": asdict(cal) if samples is not None else None,
            "base_model": lm.name}

    tmp = _temp_dir(out) if out is not None else None
    offload_root: Optional[Path] = None
    try:
        writer = None
        if source is not None and tmp is not None:
            writer = _block_writer(tmp, len(lm.arch.get_blocks(lm.model)))
        if cal.offload:
            # beside the output (same disk the user chose for big files), never inside it
            base = out.parent if out is not None else Path(tempfile.gettempdir())
            offload_root = base / f"{TMP_MARK}acts-{os.getpid()}"
            options.offload_dir = offload_root
        result = run(lm, rec.stages, samples, options, source=source,
                     on_block_done=writer.add if writer is not None else None)
        lm.meta = {**lm.meta, **meta, "engine_seconds": round(result.seconds, 3)}
        if source is None:
            from slimformer.formats.fused import fuse_int8_mlps, fuse_int8_siblings

            fuse_int8_siblings(lm.model, lm.arch)  # same-input int8 linears: one GEMM, same bits
            fuse_int8_mlps(lm.model, lm.arch)  # a W8A8 gated MLP: one kernel call
        if head is not None:  # outside the blocks: after the engine, before saving
            quantize_head(lm, head)
        if out is None:
            return lm
        if writer is not None:
            writer.finish(lm, meta)
        else:
            from slimformer.formats import save_compressed

            save_compressed(lm, tmp, meta)
        _commit(tmp, out, overwrite)
        tmp = None
    finally:
        if tmp is not None:  # failed or interrupted: remove the partial folder
            shutil.rmtree(tmp, ignore_errors=True)
        if offload_root is not None:
            shutil.rmtree(offload_root, ignore_errors=True)
        if source is not None:
            source.close()
    log.info("compressed %s with %s in %.1fs -> %s", lm.name, rec.name or "recipe", time.perf_counter() - t0, out)
    if source is not None and out is not None:
        if not reload:
            return None
        from slimformer.models import load

        return load(out)
    return lm


def _temp_dir(out: Path) -> Path:
    """A fresh sibling of ``out`` (same file system, so the final rename is atomic)."""
    tmp = out.parent / f"{TMP_MARK}{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an old folder is replaced only now."""
    if out.exists():
        if not overwrite:  # appeared while we worked
            raise SlimformerError(f"output folder '{out}' appeared during compression; not replacing it")
        old = out.parent / f"{TMP_MARK}old-{out.name}-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _block_writer(tmp: Path, n_blocks: int):
    """For streamed runs: writes each compressed block into ``tmp`` as soon as it is done and
    releases it (``add(i, name, block)``), then the rest (``finish(lm, meta)``). The formats
    package's ``StreamingWriter`` when it has one, else the engine's shard writer."""
    try:
        from slimformer.formats import StreamingWriter

        return StreamingWriter(tmp, n_blocks)
    except ImportError:
        from slimformer.engine.writer import BlockShardWriter

        return BlockShardWriter(tmp, n_blocks)
