"""True-sequential calibration: one forward per block instead of two.

The generic engine pass (:func:`slimformer.engine.runner.run_blocks`) runs every block twice
on the calibration batches: once with the original weights and observers on every target
linear, once with the compressed weights to produce the next block's inputs. For a method
that only needs statistics of each linear's own input (GPTQ: ``XᵀX``), the block can instead
be walked *sub-layer by sub-layer* over all batches:

==========  ==========================================  ==============================
group       input observed                              computed from
==========  ==========================================  ==============================
q, k, v     ``norm1(h)``                                the block input
o           the attention output                        compressed q/k/v
gate, up    ``norm2(h + o(a))``                         compressed o
down        ``act(gate(n2)) * up(n2)``                  compressed gate/up
(output)    ``h2 + down(g)`` -> the next block's input  compressed down
==========  ==========================================  ==============================

Each group is compressed as soon as every batch has shown it its input, so a later linear
is calibrated on what the compressed linears before it really produce (GPTQ's
"true-sequential" order), and the same pass yields the next block's inputs: the work is one
block forward plus the statistics, not two forwards. The intermediate tensors (attention
output, ``h2``, the MLP product) live in :class:`ActivationCache` objects, so with
``offload_dir`` they go to disk like the hidden states.

This needs the block's internals, which the generic pass never does: :class:`StagedBlock`
covers the pre-norm, rotary, (grouped-query) attention, gated-MLP family of the registry
(``llama``: Llama, Mistral, Qwen2), built from the :class:`~slimformer.models.registry.
ArchSpec` paths. Anything else (fused qkv, q/k norms, a non-gated MLP, no rotary tables in
the captured block arguments) has no staged form and uses the generic pass. Before a block
is touched, its staged forward is checked against the block's own forward on one calibration
sequence; a mismatch falls back to the generic pass for that block (logged).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.engine.activations import ActivationCache
from slimformer.kernels.elementwise import fast_rms_norm
from slimformer.models.registry import get_module
from slimformer.primitives.rotary import apply_rotary

log = logging.getLogger(__name__)

GROUPS = ("qkv", "o", "gate_up", "down")


def dense_weights(m: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or the dequantized weight of a
    compressed linear; None for anything else."""
    if type(m) is nn.Linear:
        return m.weight, m.bias
    deq = getattr(m, "dequantized_weight", None)
    if deq is not None:
        return deq().to(torch.float32), getattr(m, "bias", None)
    return None


def dense_linear(*mods: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> m(x)`` for each module as ONE fp32 GEMM (the outputs concatenated when several
    modules read the same input, e.g. q/k/v); a module with no dense form is called as is."""
    wb = [dense_weights(m) for m in mods]
    if any(p is None for p in wb):
        return lambda x: torch.cat([m(x) for m in mods], dim=-1) if len(mods) > 1 else mods[0](x)
    if len(wb) == 1:
        w, b = wb[0]
        return lambda x: F.linear(x, w, b)
    w = torch.cat([p[0] for p in wb])
    b = None if all(p[1] is None for p in wb) else torch.cat(
        [p[1] if p[1] is not None else p[0].new_zeros(p[0].shape[0]) for p in wb])
    return lambda x: F.linear(x, w, b)


@dataclass
class StagedBlock:
    """A pre-norm rotary decoder block with a gated MLP, cut at the inputs of its linears."""

    block: nn.Module
    rel: dict[str, str]  # role (q, k, v, o, gate, up, down) -> block-relative path
    norm1: nn.Module
    norm2: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @classmethod
    def build(cls, block: nn.Module, arch, config, kwargs: dict) -> Optional["StagedBlock"]:
        """The staged form of ``block`` or None when it is not of the supported shape
        (``kwargs``: the captured keyword arguments of the block's calls)."""
        a, m = arch.attention, arch.mlp
        if arch.kind != "causal-lm" or a.fused_qkv or not (a.q and a.k and a.v) or m.gate is None:
            return None
        if len(arch.norms) != 2 or "position_embeddings" not in kwargs:
            return None
        try:
            attn = get_module(block, a.o.rsplit(".", 1)[0])
            mlp = get_module(block, m.up.rsplit(".", 1)[0])
            norms = [get_module(block, p) for p in arch.norms]
        except AttributeError:
            return None
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            return None
        act = getattr(mlp, "act_fn", None)
        if act is None or getattr(attn, "scaling", None) is None:
            return None
        layout = arch.head_layout(config)
        return cls(block=block, rel={"q": a.q, "k": a.k, "v": a.v, "o": a.o, "gate": m.gate,
                                     "up": m.up, "down": m.down},
                   norm1=fast_rms_norm(norms[0]), norm2=fast_rms_norm(norms[1]), act=act, heads=layout["num_heads"],
                   kv_heads=layout["num_kv_heads"], head_dim=layout["head_dim"],
                   scaling=float(attn.scaling))

    def linear(self, *roles: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The linears of ``roles`` (same input) as one GEMM, outputs concatenated."""
        return dense_linear(*(get_module(self.block, self.rel[r]) for r in roles))

    def members(self, group: str) -> tuple[str, ...]:
        """Block-relative paths of the linears that read a group's input."""
        roles = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}[group]
        return tuple(self.rel[r] for r in roles)

    # ---- the pieces of the forward ---------------------------------------------------
    def attention(self, n1: torch.Tensor, kwargs: dict, qkv: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The input of o: softmax(q kᵀ) v over heads, [B, T, heads * head_dim]; ``qkv`` maps
        ``n1`` to q, k and v concatenated (:meth:`linear` of q, k, v)."""
        B, T, _ = n1.shape
        hd, kv = self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv(n1).split([self.heads * hd, kv, kv], dim=-1)
        q = q.view(B, T, self.heads, hd).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, hd).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.heads != self.kv_heads  # K/V heads shared by query groups, without copies
        mask = kwargs.get("attention_mask")
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., :T], scale=self.scaling,
                                               enable_gqa=gqa)
        return o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)

    def forward(self, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The whole block (for the self-check)."""
        h2 = h + self.linear("o")(self.attention(self.norm1(h), kwargs, self.linear("q", "k", "v")))
        n2 = self.norm2(h2)
        return h2 + self.linear("down")(self.act(self.linear("gate")(n2)) * self.linear("up")(n2))


def staged_matches(staged: StagedBlock, block_forward: Callable[[torch.Tensor], torch.Tensor],
                   h: torch.Tensor, kwargs: dict) -> bool:
    """Does the staged forward reproduce the block's own forward on ``h`` (float rounding)?"""
    with torch.no_grad():
        ref = block_forward(h)
        got = staged.forward(h, kwargs)
    if ref.shape != got.shape:
        return False
    err = float((ref.float() - got.float()).abs().max())
    scale = float(ref.float().abs().max()) or 1.0
    return err <= 1e-4 * scale


def run_sequential(staged: StagedBlock, states: ActivationCache, kwargs_of: list[dict],
                   compress_group: Callable[[tuple[str, ...]], None],
                   observe: Callable[[tuple[str, ...]], Optional[Callable[[torch.Tensor], None]]],
                   offload_dir, need_outputs: bool) -> Optional[ActivationCache]:
    """Walk the block group by group over all batches (see the module docstring).

    ``observe(members)`` returns a function fed every batch's input of that group, or None
    when no member is a target; ``compress_group(members)`` is called once all batches were
    observed. Returns the block outputs (the next block's inputs) when ``need_outputs``.
    """
    caches: list[ActivationCache] = []

    def cache() -> ActivationCache:
        c = ActivationCache(offload_dir)
        caches.append(c)
        return c

    def step(group: str) -> Optional[Callable[[torch.Tensor], None]]:
        return observe(staged.members(group))

    def done(group: str, fed: Optional[Callable]) -> None:
        if fed is not None:  # some member is a target: every batch has been observed
            compress_group(staged.members(group))

    try:
        # q, k, v: their input is norm1(h), cheap to recompute in the next pass
        fed = step("qkv")
        if fed is not None:
            for h in states:
                fed(staged.norm1(h))
        done("qkv", fed)
        # o: the attention output through the (compressed) q, k, v
        qkv = staged.linear("q", "k", "v")
        fed, att = step("o"), cache()
        for h, kw in zip(states, kwargs_of):
            a = staged.attention(staged.norm1(h), kw, qkv)
            if fed is not None:
                fed(a)
            att.append(a)
        done("o", fed)
        # gate, up: norm2 of the residual after the (compressed) o
        o_lin = staged.linear("o")
        fed, res = step("gate_up"), cache()
        for h, a in zip(states, att):
            h2 = h + o_lin(a)
            if fed is not None:
                fed(staged.norm2(h2))
            res.append(h2)
        att.close()
        done("gate_up", fed)
        # down: the gated product through the (compressed) gate and up
        g_lin, u_lin = staged.linear("gate"), staged.linear("up")
        fed, prod = step("down"), cache()
        for h2 in res:
            n2 = staged.norm2(h2)
            g = staged.act(g_lin(n2)) * u_lin(n2)
            if fed is not None:
                fed(g)
            prod.append(g)
        done("down", fed)
        if not need_outputs:
            return None
        d_lin = staged.linear("down")
        out = ActivationCache(offload_dir)
        for h2, g in zip(res, prod):
            out.append(h2 + d_lin(g))
        return out
    finally:
        for c in caches:
            c.close()


__all__ = ["StagedBlock", "dense_linear", "dense_weights", "run_sequential", "staged_matches", "GROUPS"]
