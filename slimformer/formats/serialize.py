"""Compressed folders: save and load.

A folder holds ``model.safetensors`` (packed integer codes + scales/zero points of every
quantized linear in the canonical layout of :mod:`slimformer.primitives.packing`, and the
remaining tensors as they are), the HF ``config.json``, the tokenizer files, and
``slimformer.json``::

    {"format_version": 1, "arch": "llama", "model_class": "LlamaForCausalLM",
     "modules": {"model.layers.0.self_attn.q_proj": {"type": "QuantLinear", "spec": {...},
                 "backend": "int4pack", "in_features": 576, "out_features": 576}, ...},
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"},   # tied tensors, stored once
     "meta": {...the recipe...}}

Saving writes into a hidden temporary sibling folder and renames it at the end, so an
interrupted save never leaves a folder that looks complete; the same model saved twice gives
byte-identical files (sorted keys, no timestamps). Loading builds the model on the ``meta``
device from the config, swaps in the quantized modules built straight from the packed tensors
(quantized weights are never materialised in fp32) and assigns everything else.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimformer.errors import SlimformerError
from slimformer.formats.linear import Int8Linear, QuantLinear
from slimformer.primitives.affine import QuantizedTensor, QuantSpec
from slimformer.primitives.packing import pack_codes, unpack_codes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "slimformer.json"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# the registry of packed module formats
# ---------------------------------------------------------------------------------------------
# Every compressed module class (packed int4, int8 GEMM, sparse, outlier-split, ...) registers
# how it turns into tensors + a JSON-able info dict and back. The class must expose
# ``in_features``, ``out_features``, ``bias`` and ``nbytes()`` (bytes it holds in memory).
# ``to_tensors(m) -> (tensors, info)`` with tensor keys relative to the module;
# ``build(info, get) -> module`` where ``get(rel_key)`` returns a stored tensor or None.
MODULE_FORMATS: dict[str, tuple[type, Any, Any]] = {}


def register_module_format(cls: type, to_tensors, build) -> None:
    MODULE_FORMATS[cls.__name__] = (cls, to_tensors, build)


def packed_types() -> tuple[type, ...]:
    return tuple(cls for cls, _, _ in MODULE_FORMATS.values())


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> packed (quantized / sparse) linear module, in module order."""
    types = packed_types()
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def quantized_nbytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held by the quantized linears, fp32 bytes of the weights and biases they replace)."""
    held = fp32 = 0
    for m in quantized_modules(model).values():
        held += m.nbytes()
        fp32 += 4 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
    return held, fp32


# ---------------------------------------------------------------------------------------------
# module <-> tensors
# ---------------------------------------------------------------------------------------------
def _quant_to_tensors(m: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    qt = m.quantized()
    t: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"spec": qt.spec.to_dict()}
    if isinstance(m, QuantLinear):
        info["backend"] = m.backend
        t["qweight"] = pack_codes(qt.codes, qt.spec)  # [N, ceil(K*bits/8)] uint8
        if qt.dq_scale is not None:
            t.update({f"scale_{k}": v for k, v in qt.dq_scale.items()})
        else:
            s = qt.scale
            exact = torch.equal(s.to(torch.bfloat16).to(torch.float32), s)
            t["scale"] = s.to(torch.bfloat16) if exact else s
        if qt.zero is not None:
            t["zero"] = qt.zero
    else:
        t["weight"] = qt.codes  # [N, K] int8
        t["weight_scale"] = m.weight_scale
        if m.act_scale is not None:
            t["act_scale"] = m.act_scale
    return t, info


def _build_quant_linear(info: dict[str, Any], get) -> nn.Module:
    spec = QuantSpec.from_dict(info["spec"])
    n, k = info["out_features"], info["in_features"]
    dq = None
    if get("scale_codes") is not None:
        dq = {"codes": get("scale_codes"), "absmax": get("scale_absmax"), "offset": get("scale_offset")}
        from slimformer.primitives.affine import dequantize_scales

        scale = dequantize_scales(dq)
    else:
        scale = get("scale").to(torch.float32)
    codes = unpack_codes(get("qweight"), spec, k)
    qt = QuantizedTensor(codes=codes, scale=scale, zero=get("zero"), spec=spec, shape=(n, k), dq_scale=dq)
    return QuantLinear.from_quantized(qt, get("bias"), backend=info.get("backend"))


def _build_int8_linear(info: dict[str, Any], get) -> nn.Module:
    spec = QuantSpec.from_dict(info["spec"])
    n, k = info["out_features"], info["in_features"]
    qt = QuantizedTensor(codes=get("weight"), scale=get("weight_scale").reshape(-1, 1), zero=None,
                         spec=spec, shape=(n, k))
    return Int8Linear.from_quantized(qt, get("bias"), act_scale=get("act_scale"))


register_module_format(QuantLinear, _quant_to_tensors, _build_quant_linear)
register_module_format(Int8Linear, _quant_to_tensors, _build_int8_linear)


def _module_tensors(name: str, m: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind = type(m).__name__
    if kind not in MODULE_FORMATS:
        raise SlimformerError(f"no saved format registered for {kind} ({name})")
    t, extra = MODULE_FORMATS[kind][1](m)
    # a run-time variant (e.g. a fused int8 slice) saves as the plain module it stands for
    info: dict[str, Any] = {"type": getattr(type(m), "SAVED_TYPE", kind), "in_features": m.in_features, "out_features": m.out_features}
    info.update(extra)
    if m.bias is not None:
        t["bias"] = m.bias
    return {f"{name}.{k}": v.contiguous() for k, v in t.items()}, info


def _build_module(name: str, info: dict[str, Any], get) -> nn.Module:
    if info.get("type") not in MODULE_FORMATS:
        raise SlimformerError(f"{CONFIG_NAME}: unknown module type {info.get('type')!r} for {name}; "
                              "known: " + ", ".join(sorted(MODULE_FORMATS)))
    return MODULE_FORMATS[info["type"]][2](info, lambda key: get(f"{name}.{key}"))


def _all_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Parameters and ALL buffers (non-persistent too, e.g. rotary inv_freq, so a model built
    on ``meta`` gets them back) outside the quantized modules."""
    out: dict[str, torch.Tensor] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        if t is None or any(n == s or n.startswith(s + ".") for s in skip):
            continue
        out[n] = t.detach()
    return out


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied embeddings) once; return alias -> stored name."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for n in sorted(tensors):
        t = tensors[n]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[n] = seen[key]
        else:
            seen[key] = n
            kept[n] = t.contiguous()
    return kept, aliases


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def save_compressed(lm, out_dir: str | os.PathLike, meta: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``lm`` (a LoadedModel whose linears may be quantized modules) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SlimformerError(f"output folder '{out}' exists; pass overwrite to replace it")
    model = lm.model
    qmods = quantized_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for name, m in qmods.items():
        t, info = _module_tensors(name, m)
        tensors.update(t)
        modules[name] = info
    rest, aliases = _dedupe(_all_tensors(model, set(qmods)))
    for n, t in rest.items():
        if t.device.type == "meta":
            raise SlimformerError(f"tensor {n} is on the meta device; nothing to save")
    tensors.update(rest)
    cfg = _config_for_save(model, qmods)
    doc = {"format_version": FORMAT_VERSION, "arch": lm.arch.name, "kind": lm.arch.kind,
           "model_class": type(model).__name__, "modules": modules, "aliases": aliases,
           "meta": meta or {}}
    shapes = _shapes_config_cannot_express(model, cfg)
    if shapes:  # per-block widths (non-uniform structured pruning); absent for every other model
        doc["shapes"] = shapes

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file({k: tensors[k].cpu() for k in sorted(tensors)}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})  # one key: safetensors orders metadata by hash
        _readable(tmp / WEIGHTS_NAME)
        cfg.to_json_file(str(tmp / "config.json"), use_diff=False)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(str(tmp))
        # the marker file last: a folder without it is not a slimformer folder
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _shapes_config_cannot_express(model: nn.Module, cfg) -> dict[str, Any]:
    """Linear shapes and integer module attributes that differ from the model the config
    builds (blocks pruned to different widths): ``{"linears": {name: {in_features,
    out_features, bias}}, "attrs": {"module.attr": int}}``, or ``{}`` when the config says it all.
    The reference is built on ``meta`` (no memory)."""
    with torch.device("meta"):
        ref = type(model)(cfg)
    real = dict(model.named_modules())
    linears: dict[str, Any] = {}
    attrs: dict[str, int] = {}
    for name, r in ref.named_modules():
        m = real.get(name)
        if m is None:
            continue
        if isinstance(m, nn.Linear) and isinstance(r, nn.Linear) and (
                (m.in_features, m.out_features) != (r.in_features, r.out_features)):
            linears[name] = {"in_features": m.in_features, "out_features": m.out_features,
                             "bias": m.bias is not None}
            continue
        mine = vars(m)
        for k, v in vars(r).items():
            if type(v) is int and type(mine.get(k)) is int and mine[k] != v:
                attrs[f"{name}.{k}" if name else k] = mine[k]
    out: dict[str, Any] = {}
    if linears:
        out["linears"] = linears
    if attrs:
        out["attrs"] = attrs
    return out


def _apply_shapes(model: nn.Module, shapes: dict[str, Any], get_module, set_module) -> None:
    """Rebuild the recorded per-module shapes on the ``meta`` model before weights are assigned."""
    for name, s in shapes.get("linears", {}).items():
        set_module(model, name, nn.Linear(s["in_features"], s["out_features"], bias=s["bias"], device="meta"))
    for key, v in shapes.get("attrs", {}).items():
        mod_path, _, attr = key.rpartition(".")
        setattr(get_module(model, mod_path), attr, v)


def _config_for_save(model: nn.Module, qmods: dict[str, nn.Module]):
    import copy

    cfg = copy.deepcopy(model.config)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and isinstance(out_emb, packed_types()) and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False  # the head is its own quantized tensor now
    return cfg


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def load_compressed(path: str | os.PathLike):
    """Rebuild a LoadedModel from a folder written by :func:`save_compressed`."""
    import transformers
    from safetensors import safe_open

    from slimformer.models.loading import LoadedModel
    from slimformer.models.registry import ARCHITECTURES, get_module, set_module

    path = Path(path)
    try:
        doc = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlimformerError(f"'{path / CONFIG_NAME}' is unreadable: {type(e).__name__}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise SlimformerError(f"{CONFIG_NAME}: format_version {doc.get('format_version')!r} is not "
                              f"supported (this slimformer reads {FORMAT_VERSION})")
    arch = ARCHITECTURES.get(doc.get("arch"))
    if arch is None:
        raise SlimformerError(f"{CONFIG_NAME}: unknown arch {doc.get('arch')!r}")
    cls = getattr(transformers, doc["model_class"], None)
    if cls is None:
        raise SlimformerError(f"{CONFIG_NAME}: unknown model_class {doc['model_class']!r}")
    cfg = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        model = cls(cfg)
    model.eval()
    _apply_shapes(model, doc.get("shapes", {}), get_module, set_module)

    files = _weight_files(path)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {k: h for h in handles for k in h.keys()}  # tensor name -> open shard
        keys = set(where)
        get = lambda k: where[k].get_tensor(k) if k in where else None  # noqa: E731
        for name, info in doc["modules"].items():
            set_module(model, name, _build_module(name, info, get))
        qnames = set(doc["modules"])
        # fresh, aligned storage: BLAS takes different (and differently rounded) paths for
        # misaligned inputs, which would break bit-identical logits after a load
        rest = {k: _aligned(where[k].get_tensor(k)) for k in sorted(keys)
                if not any(k.startswith(q + ".") for q in qnames)}
    for k, t in rest.items():
        _assign(model, k, t, get_module)
    for alias, target in doc.get("aliases", {}).items():
        mod_path, _, attr = target.rpartition(".")
        src = getattr(get_module(model, mod_path), attr)
        a_path, _, a_attr = alias.rpartition(".")
        _set_tensor(get_module(model, a_path), a_attr, src)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t is not None and t.device.type == "meta"]
    if left:
        raise SlimformerError(f"'{path}' lacks tensors for {', '.join(left[:5])}")
    _fix_meta_attributes(model)
    from slimformer.formats.fused import fuse_int8_mlps, fuse_int8_siblings

    fuse_int8_siblings(model, arch)  # q/k/v and gate/up share one int8 GEMM (bit-identical)
    fuse_int8_mlps(model, arch)  # a W8A8 gated MLP: one kernel call

    tok = None
    if arch.kind != "vision":
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception:
            log.warning("no tokenizer in %s", path)
    return LoadedModel(model=model, tokenizer=tok, arch=arch, name=path.name, source=str(path),
                       meta=doc.get("meta", {}))


def _readable(path: Path) -> None:
    """safetensors writes through a private temp file (mode 600); give the weights the same
    permissions as every other file in the folder (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _weight_files(path: Path) -> list[Path]:
    """The folder's safetensors files: one ``model.safetensors``, or the shards named by
    ``model.safetensors.index.json`` (streamed runs write one shard per block)."""
    single = path / WEIGHTS_NAME
    index = path / (WEIGHTS_NAME + ".index.json")
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SlimformerError(f"'{index}' is unreadable: {type(e).__name__}")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise SlimformerError(f"folder '{path}' lacks shards {', '.join(missing[:3])}")
        return files
    raise SlimformerError(f"folder '{path}' has no {WEIGHTS_NAME} (nor its shard index)")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    return out.copy_(t)


def _set_tensor(mod: nn.Module, attr: str, t: torch.Tensor) -> None:
    if attr in mod._parameters:
        mod._parameters[attr] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        setattr(mod, attr, t)


def _assign(model: nn.Module, key: str, t: torch.Tensor, get_module) -> None:
    mod_path, _, attr = key.rpartition(".")
    try:
        mod = get_module(model, mod_path)
    except AttributeError:
        raise SlimformerError(f"tensor {key} in the checkpoint has no place in the model")
    _set_tensor(mod, attr, t)


def _fix_meta_attributes(model: nn.Module) -> None:
    """Plain tensor attributes (not buffers) that a module computed at construction on meta,
    e.g. rotary ``original_inv_freq``: point them at the loaded buffer of the same content."""
    for mod in model.modules():
        for k, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and v.device.type == "meta":
                twin = mod._buffers.get(k.replace("original_", "")) if k.startswith("original_") else None
                if twin is None:
                    raise SlimformerError(f"attribute {k} of {type(mod).__name__} stayed on meta")
                setattr(mod, k, twin.clone())


# ---------------------------------------------------------------------------------------------
# packed formats defined in their own modules register themselves on import (one line each)
# ---------------------------------------------------------------------------------------------
import slimformer.formats.sparse  # noqa: E402,F401  (SparseLinear: bitmask + kept values)
import slimformer.formats.outlier  # noqa: E402,F401  (Int8OutlierLinear: LLM.int8 int8 + 16-bit outlier columns)
from slimformer.formats import fused as _fused  # noqa: E402

register_module_format(_fused.FusedInt8Slice, _quant_to_tensors, _build_int8_linear)
