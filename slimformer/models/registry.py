"""Architecture knowledge as data.

Every method in slimformer (engine, quantizers, pruners, distillers) finds blocks, attention
projections, MLP projections, norms, embeddings and the output head through an
:class:`ArchSpec`, never by sniffing model names. Adding an architecture is one entry in
``ARCHITECTURES`` plus a tiny config in :mod:`slimformer.models.tiny`.

Paths are dotted attribute paths. ``blocks``, ``embeddings``, ``final_norm`` and ``head`` are
relative to the *top* model after one of ``prefixes`` (the task heads of HF wrap the base
model under different names: ``BertModel`` has no prefix, ``BertForSequenceClassification``
has ``bert.``). Paths inside :class:`AttentionSpec` / :class:`MLPSpec` / ``norms`` are
relative to one block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from slimformer.errors import SlimformerError


@dataclass(frozen=True)
class AttentionSpec:
    q: Optional[str]  # None when q/k/v are one fused projection (gpt2 c_attn)
    k: Optional[str]
    v: Optional[str]
    o: str
    fused_qkv: Optional[str] = None
    # config attribute names for the head layout
    num_heads_attr: str = "num_attention_heads"
    num_kv_heads_attr: Optional[str] = None  # grouped-query attention: KV heads < heads
    head_dim_attr: Optional[str] = None  # None -> hidden_size // num_heads
    # attribute of the attention module (the parent of ``o``) holding query heads per KV head
    # (grouped-query attention's repeat factor); structured pruning sets it per block
    kv_groups_module_attr: Optional[str] = None


@dataclass(frozen=True)
class MLPSpec:
    up: str  # up_proj / fc1 / intermediate.dense
    down: str  # down_proj / fc2 / output.dense
    gate: Optional[str] = None  # gated MLPs (SwiGLU): gate and up are coupled channels


@dataclass(frozen=True)
class SmoothGroup:
    """A producer whose output channels feed ONLY the listed linears, so scaling channel j of
    the producer's output by 1/s_j and the consumers' input column j by s_j leaves the block
    unchanged (SmoothQuant's equivalent transformation).

    ``prev`` is a norm (weight, and bias if any, are divided by s) or a linear (its output
    rows and bias are divided by s). Between a producing linear and its consumers only ops
    that commute with a positive per-channel scale are allowed: the product ``act(gate) * up``
    (linear in ``up``), ReLU (positively homogeneous), attention's ``softmax(QKᵀ)·V`` (linear
    in V, per channel, when every head has its own V — not under grouped-query attention,
    where one V channel feeds several heads' o_proj columns).
    """

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    kind: str  # "causal-lm" | "encoder" | "vision"
    blocks: str
    attention: AttentionSpec
    mlp: MLPSpec
    norms: tuple[str, ...]  # per block, in forward order
    embeddings: tuple[str, ...]
    final_norm: Optional[str]
    head: Optional[str]  # lm_head / classifier; None for a bare encoder
    prefixes: tuple[str, ...] = ("",)
    # modules outside the blocks that the blocks need at run time (e.g. rotary embeddings)
    extras: tuple[str, ...] = ()
    # "linear" (nn.Linear, weight [out, in]) or "conv1d" (HF GPT-2 Conv1D, weight [in, out])
    linear_type: str = "linear"
    hidden_size_attr: str = "hidden_size"
    num_layers_attr: str = "num_hidden_layers"
    intermediate_size_attr: Optional[str] = "intermediate_size"
    # SmoothQuant: exact producer -> consumers groups per block (empty: none is exact), and
    # config attributes that must have the given value for the groups to hold
    smooth_groups: tuple[SmoothGroup, ...] = ()
    smooth_requires: tuple[tuple[str, object], ...] = ()
    # block-relative ``module.attribute`` paths holding the block's own index (KV-cache slot);
    # renumbered when blocks are removed (depth pruning)
    layer_index_attrs: tuple[str, ...] = ()
    # config attributes that are lists with one entry per block (filtered on depth pruning)
    per_layer_config_attrs: tuple[str, ...] = ()
    notes: str = ""

    # ---- lookups on a live model ------------------------------------------------------
    def prefix(self, model: nn.Module) -> str:
        for p in self.prefixes:
            if _has_path(model, p + self.blocks):
                return p
        raise SlimformerError(
            f"model {type(model).__name__} has no '{self.blocks}' blocks for architecture '{self.name}'"
        )

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.prefix(model) + self.blocks)

    def block_path(self, model: nn.Module) -> str:
        return self.prefix(model) + self.blocks

    def resolve(self, model: nn.Module, rel: Optional[str]) -> Optional[str]:
        """Full path of a model-level module (embedding, final norm, head), or None if absent."""
        if rel is None:
            return None
        for cand in (self.prefix(model) + rel, rel):
            if _has_path(model, cand):
                return cand
        return None

    def linear_names(self) -> dict[str, str]:
        """Role -> relative path of every projection in one block."""
        a, m = self.attention, self.mlp
        roles = {}
        if a.fused_qkv:
            roles["qkv"] = a.fused_qkv
        else:
            roles.update(q=a.q, k=a.k, v=a.v)
        roles["o"] = a.o
        if m.gate:
            roles["gate"] = m.gate
        roles["up"] = m.up
        roles["down"] = m.down
        return roles

    def head_layout(self, config) -> dict[str, int]:
        """num_heads, num_kv_heads, head_dim and kv group size from an HF config."""
        a = self.attention
        cfg = getattr(config, "text_config", None) or config
        heads = getattr(cfg, a.num_heads_attr)
        kv = getattr(cfg, a.num_kv_heads_attr, None) if a.num_kv_heads_attr else None
        kv = kv or heads
        hd = getattr(cfg, a.head_dim_attr, None) if a.head_dim_attr else None
        hd = hd or getattr(cfg, self.hidden_size_attr) // heads
        return {"num_heads": heads, "num_kv_heads": kv, "head_dim": hd, "group_size": heads // kv}


def _has_path(model: nn.Module, path: str) -> bool:
    try:
        get_module(model, path)
        return True
    except AttributeError:
        return False


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Module at a dotted path ('' is the root). Raises AttributeError if absent."""
    mod = root
    for part in [p for p in path.split(".") if p]:
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = get_module(root, parent_path)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    kind="causal-lm",
    blocks="model.layers",
    attention=AttentionSpec(
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        num_kv_heads_attr="num_key_value_heads", head_dim_attr="head_dim",
        kv_groups_module_attr="num_key_value_groups",
    ),
    mlp=MLPSpec(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    head="lm_head",
    extras=("model.rotary_emb",),
    layer_index_attrs=("self_attn.layer_idx",),
    per_layer_config_attrs=("layer_types",),  # qwen2 / qwen3 (sliding vs full attention)
    # v_proj -> o_proj is left out: under grouped-query attention a v channel feeds the
    # o_proj columns of every query head in its group, so the scales would have to be shared
    # within a KV group (not done yet)
    smooth_groups=(
        SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),  # down(act(gate) * up): linear in up
    ),
    notes="RMSNorm pre-norm, SwiGLU MLP, rotary positions, grouped-query attention",
)

GPT2 = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    kind="causal-lm",
    blocks="transformer.h",
    attention=AttentionSpec(q=None, k=None, v=None, o="attn.c_proj", fused_qkv="attn.c_attn",
                            num_heads_attr="n_head"),
    mlp=MLPSpec(up="mlp.c_fc", down="mlp.c_proj"),
    norms=("ln_1", "ln_2"),
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    head="lm_head",
    linear_type="conv1d",
    layer_index_attrs=("attn.layer_idx",),
    hidden_size_attr="n_embd",
    num_layers_attr="n_layer",
    intermediate_size_attr="n_inner",
    # c_fc -> c_proj goes through GELU (not homogeneous); the v part of the fused c_attn ->
    # c_proj would need scaling part of c_attn's rows only: left out
    smooth_groups=(
        SmoothGroup("ln_1", ("attn.c_attn",)),
        SmoothGroup("ln_2", ("mlp.c_fc",)),
    ),
    notes="fused qkv as HF Conv1D (weight stored [in, out]); learned positions",
)

OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    kind="causal-lm",
    blocks="model.decoder.layers",
    attention=AttentionSpec(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                            o="self_attn.out_proj"),
    mlp=MLPSpec(up="fc1", down="fc2"),
    norms=("self_attn_layer_norm", "final_layer_norm"),
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    head="lm_head",
    intermediate_size_attr="ffn_dim",
    layer_index_attrs=("self_attn.layer_idx",),
    smooth_groups=(
        SmoothGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothGroup("self_attn.v_proj", ("self_attn.out_proj",)),  # multi-head: one V per head
        SmoothGroup("final_layer_norm", ("fc1",)),
        SmoothGroup("fc1", ("fc2",)),  # ReLU(z / s) = ReLU(z) / s for s > 0
    ),
    # OPT-350m is post-norm (do_layer_norm_before=False): its norms feed the residual too
    smooth_requires=(("do_layer_norm_before", True),),
    notes="LayerNorm pre-norm, ReLU fc1/fc2 MLP, learned positions",
)

BERT = ArchSpec(
    name="bert",
    model_types=("bert",),
    kind="encoder",
    blocks="encoder.layer",
    attention=AttentionSpec(q="attention.self.query", k="attention.self.key",
                            v="attention.self.value", o="attention.output.dense"),
    mlp=MLPSpec(up="intermediate.dense", down="output.dense"),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    embeddings=("embeddings",),
    final_norm=None,
    head=None,
    prefixes=("", "bert."),
    layer_index_attrs=("attention.self.layer_idx",),
    # post-norm: each LayerNorm's output is also the residual stream, so no norm -> linear
    # group is exact; intermediate -> output goes through GELU. Only V -> output.dense is.
    smooth_groups=(SmoothGroup("attention.self.value", ("attention.output.dense",)),),
    notes="post-norm encoder, GELU MLP, absolute positions",
)

VIT = ArchSpec(
    name="vit",
    model_types=("vit",),
    kind="vision",
    blocks="layers",  # transformers 5 layout
    attention=AttentionSpec(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                            o="attention.o_proj"),
    mlp=MLPSpec(up="mlp.fc1", down="mlp.fc2"),
    norms=("layernorm_before", "layernorm_after"),
    embeddings=("embeddings",),
    final_norm="layernorm",
    head="classifier",
    prefixes=("", "vit."),
    # fc1 -> fc2 goes through GELU: not exact
    smooth_groups=(
        SmoothGroup("layernorm_before", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
        SmoothGroup("attention.v_proj", ("attention.o_proj",)),
        SmoothGroup("layernorm_after", ("mlp.fc1",)),
    ),
    notes="pre-norm encoder over patches + CLS token",
)

ARCHITECTURES: dict[str, ArchSpec] = {a.name: a for a in (LLAMA, GPT2, OPT, BERT, VIT)}


def arch_for_config(config) -> ArchSpec:
    mt = getattr(config, "model_type", None)
    for spec in ARCHITECTURES.values():
        if mt in spec.model_types:
            return spec
    known = sorted(t for s in ARCHITECTURES.values() for t in s.model_types)
    raise SlimformerError(f"unsupported model_type '{mt}'; supported: {', '.join(known)}")


def arch_for_model(model: nn.Module) -> ArchSpec:
    return arch_for_config(model.config)
