"""Run a causal LM block by block against our static KV cache.

Why not call the HF model: with a 135M model on a CPU, HF's ``forward`` spends most of each
decode step building masks, cache objects and output dataclasses (measured: see
benchmarks/RESULTS.md). We keep HF's *modules* — embeddings, norms, projections, MLPs, the
rotary table and the LM head are called as they are, so any replacement that behaves like
``nn.Linear`` (packed W4, W8A8, pruned, low-rank) works unchanged — and only own the glue:
positions, attention over the cache, and residual wiring.

Modules are found through the :class:`~slimformer.models.registry.ArchSpec` paths. The wiring
that the registry does not describe (where positions enter, pre- vs post-norm, query scaling)
is one small adapter per family below.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.decoding.cache import (StaticKVCache, StepLayout, advance, static_step_layout, step_layout,
                                      write_kv)
from slimformer.errors import SlimformerError
from slimformer.formats.fused import Int8GatedMLP, fuse_weight_only
from slimformer.formats.linear import few_token_linear
from slimformer.kernels.attention import kernel_causal_attention, kernel_decode_attention
from slimformer.kernels.elementwise import fast_rms_norm, rotary_heads_last
from slimformer.models.registry import get_module

log = logging.getLogger(__name__)


@dataclass
class _Block:
    """The modules of one block, resolved once (attribute lookups are per-step overhead)."""

    norm1: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    q: Optional[nn.Module]
    k: Optional[nn.Module]
    v: Optional[nn.Module]
    qkv: Optional[nn.Module]
    o: nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]
    q_norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    k_norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    pre_norm: bool = True
    q_scale: Optional[float] = None  # OPT multiplies q after its projection (then SDPA scale 1)


class CausalRunner:
    """Prefill/decode/verify forwards of a causal LM over a :class:`StaticKVCache`.

    ``exit_layer`` < number of blocks makes this an early-exit model: the first ``exit_layer``
    blocks, then the final norm and LM head (the self-draft of speculative decoding).

    ``compile=True`` runs every one-token step (the decode loop) through ``torch.compile`` of a
    static-shape step (:meth:`static_forward`): the cache write slot is a tensor and attention
    spans the whole (masked) cache, so one graph serves every step of every prompt that fits the
    same cache capacity (capacities are rounded up to a multiple of ``CAPACITY_STEP``). Inductor's
    ``freezing`` treats the weights as constants (fused element-wise kernels, pre-packed GEMM
    weights): the model must not change after the first compiled step, and the first step of
    each new (batch, capacity) pays the compilation (about a minute for SmolLM2-135M on 2 CPU
    cores). Two-token steps after the prompt (a speculative draft catching up after a round
    whose proposals were all accepted) are compiled too, as a second graph. Prefill, longer
    verify steps and caches with an attention observer (KV eviction) stay eager. From a shape's
    second step on Dynamo's guard check is skipped, and from its third the compiled bytecode is
    called without Dynamo's frame hook at all (:meth:`_go_direct`).
    """

    CAPACITY_STEP = 128
    COMPILED_MAX_TOKENS = 2  # steps of up to this many tokens after the prompt run compiled

    def __init__(self, lm, exit_layer: Optional[int] = None, compile: bool = False):
        spec = lm.arch
        if spec.kind != "causal-lm":
            raise SlimformerError(f"generation needs a causal LM; '{lm.name}' is a {spec.kind} model")
        if spec.name not in _FAMILIES:
            raise SlimformerError(f"decoding does not support architecture '{spec.name}' yet")
        self.lm, self.spec, self.model = lm, spec, lm.model
        cfg = self.model.config
        self.config = cfg
        layout = spec.head_layout(cfg)
        self.num_heads, self.num_kv_heads = layout["num_heads"], layout["num_kv_heads"]
        self.head_dim = layout["head_dim"]
        self.family = spec.name
        blocks = spec.get_blocks(self.model)
        n = len(blocks)
        self.exit_layer = n if exit_layer is None else exit_layer
        if not 1 <= self.exit_layer <= n:
            raise SlimformerError(f"exit layer must be in 1..{n}, got {exit_layer}")
        self.blocks = [_FAMILIES[self.family].block(b, spec, cfg) for b in list(blocks)[: self.exit_layer]]
        emb = [get_module(self.model, spec.resolve(self.model, e)) for e in spec.embeddings]
        self.embed_tokens = emb[0]
        self.embed_positions = emb[1] if len(emb) > 1 else None
        fn = spec.resolve(self.model, spec.final_norm)
        self.final_norm = get_module(self.model, fn) if fn else None
        self.final_norm_fn = fast_rms_norm(self.final_norm) if fn else None  # the module or one call
        self.head = get_module(self.model, spec.resolve(self.model, spec.head))
        self.rotary = None
        for extra in spec.extras:
            path = spec.resolve(self.model, extra)
            if path and extra.endswith("rotary_emb"):
                self.rotary = get_module(self.model, path)
        self.scales = [_FAMILIES[self.family].scale(cfg, i, self.head_dim) for i in range(self.exit_layer)]
        self.max_positions = _max_positions(cfg)
        p = next(self.model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.vocab_size = _head_out_features(self.head, cfg)
        self._family = _FAMILIES[self.family]
        self._family.check(self.model, cfg)
        self.compile = bool(compile)
        self._compiled_step = None
        self._warm: set = set()  # (batch, capacity, ...) keys already run compiled
        self._direct: dict = {}  # key -> Dynamo's bytecode for it as a plain function (False: not usable)

    # ---- cache --------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> StaticKVCache:
        if self.compile:  # fewer distinct shapes = fewer compilations
            capacity = -(-capacity // self.CAPACITY_STEP) * self.CAPACITY_STEP
        return StaticKVCache.allocate(self.exit_layer, batch, self.num_kv_heads, self.head_dim,
                                      capacity, self.dtype, self.device)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: StaticKVCache, last_only: bool = False) -> torch.Tensor:
        """Feed ``ids`` [B, q] after what the cache holds; returns logits [B, q|1, V] (fp32).

        ``last_only`` computes the LM head for the last position only: prefill of plain
        generation needs just one next-token distribution, and the head is the largest matmul.
        """
        q = ids.shape[1]
        if (self.compile and q <= self.COMPILED_MAX_TOKENS and self._compilable(cache)
                and (q == 1 or bool((cache.length > 0).all()))):  # not a short prompt's prefill
            logits = self._compiled_forward(ids, cache)
            if logits is not None:
                advance(cache, q)
                return logits[:, -1:] if last_only else logits
        layout = step_layout(cache, q)
        x = self.hidden(ids, cache, layout)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    def static_forward(self, ids: torch.Tensor, cache: StaticKVCache, slot: torch.Tensor) -> torch.Tensor:
        """Logits [B, q, V] of ``ids`` [B, q] written at cache slots ``slot .. slot + q - 1`` (every
        row at the same slots; ``slot``: a one-element long tensor). Tensor ops only and shapes
        independent of the fill level: the body that ``compile=True`` compiles. Does not advance
        the cache (the caller does)."""
        x = self._trunk(ids, cache, static_step_layout(cache, slot, ids.shape[1]))
        return self.logits(x)

    @staticmethod
    def _compilable(cache: StaticKVCache) -> bool:
        return cache.attn_observer is None and bool((cache.length == cache.length[0]).all())

    def _compiled_forward(self, ids: torch.Tensor, cache: StaticKVCache) -> Optional[torch.Tensor]:
        """One compiled decode step, or None when the model cannot be compiled as one graph
        (a module dynamo cannot trace, e.g. a packed fbgemm handle): the runner then warns once
        and stays eager. One whole graph only: a split graph would run the cache writes in
        separate frames, and is slower than eager anyway."""
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self.static_forward, dynamic=False, fullgraph=True,
                                                options={"freezing": True})
        exc = torch._dynamo.exc
        key = (ids.shape, cache.capacity, cache.position_offset is None, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled())
        slot = cache.length[:1].clone()
        direct = self._direct.get(key)
        if direct:
            return direct(self, ids, cache, slot)
        try:
            if key in self._warm:
                # a shape this runner has already run compiled: skip Dynamo's guard check (~0.7
                # ms of a ~10 ms compressed draft step; benchmarks/RESULTS.md). Unsafe only for
                # an input no compiled graph fits, which the key rules out (weights are frozen
                # into the graph anyway: the model must not change after compiling, see above)
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    out = self._compiled_step(ids, cache, slot)
                if key not in self._direct:  # tried once per shape
                    self._go_direct(key, ids, cache, slot, out)
                return out
            out = self._compiled_step(ids, cache, slot)
            self._warm.add(key)
            return out
        except (exc.Unsupported, exc.BackendCompilerFailed, exc.TorchRuntimeError) as e:
            log.warning("decode step cannot be compiled as one graph (%s); decoding eagerly",
                        str(e).splitlines()[0][:200])
            self.compile = False
            return None

    def _go_direct(self, key, ids: torch.Tensor, cache: StaticKVCache, slot: torch.Tensor,
                   out: torch.Tensor) -> None:
        """From the third step of a shape on, call the bytecode Dynamo compiled for it as a plain
        function: entering a compiled frame through Dynamo costs ~1.4 ms per step even with the
        guard check skipped (a compiled W8A8 SmolLM2 draft step: 8.2 vs 6.9 ms;
        benchmarks/RESULTS.md "Stop 17"). The same compiled graph runs either way. The entry is
        the first whose guards pass for this step's arguments (Dynamo's own choice), and it is
        checked once: it must give bit-identical logits for the step just run (it rewrites the
        same cache slots), else the runner keeps going through Dynamo for this shape."""
        args = {"self": self, "ids": ids, "cache": cache, "slot": slot}
        fn = None
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list

            for entry in _debug_get_cache_entry_list(type(self).static_forward.__code__):
                if entry.guard_manager.check(args):
                    fn = types.FunctionType(entry.code, type(self).static_forward.__globals__)
                    break
            ok = fn is not None and torch.equal(fn(self, ids, cache, slot), out)
        except Exception as e:  # noqa: BLE001 -- private Dynamo API absent or changed: stay on Dynamo
            log.info("compiled step stays behind Dynamo's frame hook (%s)", e)
            ok = False
        self._direct[key] = fn if ok else False

    def hidden(self, ids: torch.Tensor, cache: StaticKVCache, layout: StepLayout) -> torch.Tensor:
        """Hidden state after the last run block (before the final norm): [B, q, hidden]."""
        x = self._trunk(ids, cache, layout)
        advance(cache, layout.q)
        return x

    def _trunk(self, ids: torch.Tensor, cache: StaticKVCache, layout: StepLayout) -> torch.Tensor:
        fam = self._family
        x = fam.embed(self, ids, layout.positions)  # [B, q, hidden]
        rope = None
        if self.rotary is not None:
            rope = self.rotary(x, layout.positions)  # cos, sin: [B, q, D]
        for i, blk in enumerate(self.blocks):
            x = self._block(i, blk, x, cache, layout, rope)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self._family.final(self, x)
        return few_token_linear(self.head, x).float()

    def _block(self, i: int, blk: _Block, x: torch.Tensor, cache: StaticKVCache,
               layout: StepLayout, rope) -> torch.Tensor:
        B, q, _ = x.shape
        h = blk.norm1(x) if blk.pre_norm else x
        if blk.qkv is not None:
            hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            qs, ks, vs = few_token_linear(blk.qkv, h).split([hq, hkv, hkv], dim=2)
        else:
            qs, ks, vs = (few_token_linear(blk.q, h), few_token_linear(blk.k, h),
                          few_token_linear(blk.v, h))
        if blk.q_scale is not None:
            qs = qs * blk.q_scale
        qs = qs.view(B, q, self.num_heads, self.head_dim)  # [B, q, H, D]
        ks = ks.view(B, q, self.num_kv_heads, self.head_dim)
        if blk.q_norm is not None:
            qs, ks = blk.q_norm(qs), blk.k_norm(ks)
        if rope is not None:
            cos, sin = rope
            qs, ks = rotary_heads_last(qs, cos, sin), rotary_heads_last(ks, cos, sin)
        qs, ks = qs.transpose(1, 2), ks.transpose(1, 2)  # [B, H, q, D], [B, Hkv, q, D]
        vs = vs.view(B, q, self.num_kv_heads, self.head_dim).transpose(1, 2)
        K, V = write_kv(cache, i, ks, vs, layout)  # [B, Hkv, kv_len, D]
        a = None
        if layout.is_causal and layout.mask is None:  # unpadded prompt, empty cache: a square
            a = kernel_causal_attention(qs, K, V, self.scales[i])  # [B, q, H, D] or None
        else:  # a decode / verify step over the cache (no mask tensor needed)
            a = kernel_decode_attention(qs, K, V, cache.start, layout.write_idx[:, 0], self.scales[i])
        if a is None:
            a = grouped_attention(qs, K, V, layout.mask, layout.is_causal, self.scales[i])  # [B, q, H, D]
        if cache.attn_observer is not None:  # e.g. heavy-hitter KV eviction scores
            cache.attn_observer(i, qs, K, layout, self.scales[i])
        a = few_token_linear(blk.o, a.reshape(B, q, self.num_heads * self.head_dim))
        x = x + a
        if not blk.pre_norm:
            x = blk.norm1(x)
        h = blk.norm2(x) if blk.pre_norm else x
        x = x + blk.mlp(h)
        if not blk.pre_norm:
            x = blk.norm2(x)
        return x

    def prefill(self, ids: torch.Tensor, start: torch.Tensor, cache: StaticKVCache,
                last_only: bool = True) -> torch.Tensor:
        """Left-padded prompts ``ids`` [B, P] with ``start[b]`` pad slots into an empty cache."""
        cache.start = start.clone()
        cache.length = torch.zeros_like(start)
        return self.forward(ids, cache, last_only=last_only)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      is_causal: bool, scale: float) -> torch.Tensor:
    """SDPA of ``q`` [B, H, q, D] over ``k``/``v`` [B, Hkv, T, D] -> [B, q, H, D].

    With grouped-query attention (H = g * Hkv) and a few queries, the g query heads that share
    a KV head are folded into one head's query rows ([B, Hkv, g * q, D], the mask repeated per
    group), so every KV head is read once and no KV copy is made. ``enable_gqa`` computes the
    same, but compiled decode steps lowered it to a repeat of K/V over the whole cache: ~6x the
    attention time of a one-token step. A causal square (prefill) keeps ``enable_gqa``."""
    B, H, qn, D = q.shape
    hkv = k.shape[1]
    g = H // hkv
    if g == 1 or is_causal:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=g > 1).transpose(1, 2)
    qf = q.reshape(B, hkv, g * qn, D)  # head h = kv * g + j: rows (j, i) of KV head kv
    m = None if mask is None else mask.repeat(1, 1, g, 1)  # row j * qn + i sees what query i sees
    a = F.scaled_dot_product_attention(qf, k, v, attn_mask=m, scale=scale)  # [B, Hkv, g * qn, D]
    return a.view(B, H, qn, D).transpose(1, 2)


def _max_positions(cfg) -> Optional[int]:
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, attr, None)
        if v:
            return int(v)
    return None


def _head_out_features(head: nn.Module, cfg) -> int:
    n = getattr(head, "out_features", None)
    if n is None and hasattr(head, "weight"):
        n = head.weight.shape[0]
    return int(n or cfg.vocab_size)


# ---- family adapters --------------------------------------------------------------------
def _gated_mlp(b: nn.Module, spec) -> Callable[[torch.Tensor], torch.Tensor]:
    """``down(act(gate(h)) * up(h))`` with each linear through :func:`few_token_linear`; the
    MLP module itself when it is not the plain gated form (then it runs as it is)."""
    mlp = get_module(b, spec.mlp.up.rsplit(".", 1)[0])
    act = getattr(mlp, "act_fn", None)
    if (spec.mlp.gate is None or act is None or not type(mlp).__name__.endswith("MLP")
            or isinstance(mlp, Int8GatedMLP)):  # W8A8: the whole MLP is one kernel call
        return mlp
    gate, up, down = (get_module(b, p) for p in (spec.mlp.gate, spec.mlp.up, spec.mlp.down))
    gu = fuse_weight_only([gate, up])  # a W8 model: gate and up in one kernel call
    if gu is not None:
        n = gate.out_features

        def run_fused(h: torch.Tensor) -> torch.Tensor:
            y = gu(h)
            return few_token_linear(down, act(y[..., :n]) * y[..., n:])
        return run_fused

    def run(h: torch.Tensor) -> torch.Tensor:
        return few_token_linear(down, act(few_token_linear(gate, h)) * few_token_linear(up, h))
    return run


class _Llama:
    @staticmethod
    def block(b: nn.Module, spec, cfg) -> _Block:
        a = spec.attention
        attn = get_module(b, a.o.rsplit(".", 1)[0])
        q, k, v = get_module(b, a.q), get_module(b, a.k), get_module(b, a.v)
        qkv = fuse_weight_only([q, k, v])  # a W8 model: q/k/v in one kernel call
        if qkv is not None:
            q = k = v = None
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return _Block(norm1=fast_rms_norm(get_module(b, spec.norms[0])),  # one call each, same values
                      norm2=fast_rms_norm(get_module(b, spec.norms[1])),
                      q=q, k=k, v=v, qkv=qkv,
                      o=get_module(b, a.o), mlp=_gated_mlp(b, spec),
                      q_norm=None if qn is None else fast_rms_norm(qn),
                      k_norm=None if kn is None else fast_rms_norm(kn))

    @staticmethod
    def scale(cfg, i: int, head_dim: int) -> float:
        return head_dim ** -0.5

    @staticmethod
    def embed(r: CausalRunner, ids, positions):
        return r.embed_tokens(ids)

    @staticmethod
    def final(r: CausalRunner, x):
        return r.final_norm_fn(x)

    @staticmethod
    def check(model, cfg) -> None:
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            raise SlimformerError("sliding-window attention is not supported by the decoding loop")


class _GPT2:
    @staticmethod
    def block(b: nn.Module, spec, cfg) -> _Block:
        a = spec.attention
        return _Block(norm1=get_module(b, spec.norms[0]), norm2=get_module(b, spec.norms[1]),
                      q=None, k=None, v=None, qkv=get_module(b, a.fused_qkv), o=get_module(b, a.o),
                      mlp=get_module(b, spec.mlp.up.rsplit(".", 1)[0]))

    @staticmethod
    def scale(cfg, i: int, head_dim: int) -> float:
        s = head_dim ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            s /= float(i + 1)
        return s

    @staticmethod
    def embed(r: CausalRunner, ids, positions):
        return r.embed_tokens(ids) + r.embed_positions(positions)

    @staticmethod
    def final(r: CausalRunner, x):
        return r.final_norm(x)

    @staticmethod
    def check(model, cfg) -> None:
        if getattr(cfg, "add_cross_attention", False):
            raise SlimformerError("GPT-2 with cross-attention is not a plain causal LM")


class _OPT:
    @staticmethod
    def block(b: nn.Module, spec, cfg) -> _Block:
        a = spec.attention
        fc1, fc2, act = get_module(b, spec.mlp.up), get_module(b, spec.mlp.down), b.activation_fn

        def mlp(h: torch.Tensor) -> torch.Tensor:
            return fc2(act(fc1(h)))

        return _Block(norm1=get_module(b, spec.norms[0]), norm2=get_module(b, spec.norms[1]),
                      q=get_module(b, a.q), k=get_module(b, a.k), v=get_module(b, a.v), qkv=None,
                      o=get_module(b, a.o), mlp=mlp, pre_norm=bool(cfg.do_layer_norm_before),
                      q_scale=(cfg.hidden_size // cfg.num_attention_heads) ** -0.5)

    @staticmethod
    def scale(cfg, i: int, head_dim: int) -> float:
        # q is already scaled right after its projection, as in the reference implementation
        return 1.0

    @staticmethod
    def embed(r: CausalRunner, ids, positions):
        x = r.embed_tokens(ids)
        proj_in = getattr(r.model.model.decoder, "project_in", None)
        if proj_in is not None:
            x = proj_in(x)
        pe = r.embed_positions
        return x + nn.Embedding.forward(pe, positions + getattr(pe, "offset", 0))

    @staticmethod
    def final(r: CausalRunner, x):
        if r.final_norm is not None:
            x = r.final_norm(x)
        proj_out = getattr(r.model.model.decoder, "project_out", None)
        return proj_out(x) if proj_out is not None else x

    @staticmethod
    def check(model, cfg) -> None:
        pass


_FAMILIES = {"llama": _Llama, "gpt2": _GPT2, "opt": _OPT}
