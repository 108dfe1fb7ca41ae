"""slimformer's own C++ CPU kernels (few-token int4 and fp32 linears, the W8A8 linear, causal
prefill attention): exact sums against references on awkward shapes, the routes that use them,
and the fallback without them."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import slimformer
import slimformer.formats.linear as linear_mod
from slimformer.decoding import CausalRunner, generate
from slimformer.formats import QuantLinear
from slimformer.formats.linear import KERNEL_MAX_M, few_token_linear
from slimformer.kernels import cpu_kernels
from slimformer.models import tiny_model
from slimformer.primitives.affine import QuantSpec, dequantize, quantize
from slimformer.primitives.packing import pack

pytestmark = pytest.mark.usefixtures("one_thread")

K = cpu_kernels()
needs_kernels = pytest.mark.skipif(K is None, reason="no C++ compiler: the kernels fall back")


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@needs_kernels
@pytest.mark.parametrize("m,k,n,gs,asym,bf16", [
    (1, 576, 192, 64, False, False),   # SmolLM2 k_proj
    (3, 577, 100, 64, True, False),    # odd K: the last byte holds one code; partial last group
    (5, 1536, 61, 128, False, True),   # bf16 scales, N not a multiple of the 16-row tiles
    (9, 70, 33, 16, True, False),      # a token block of 8 and one of 1
    (2, 100, 40, 100, True, False),    # one group spanning the row
    (4, 50, 7, 64, False, False),      # one partial group, fewer rows than a tile
])
def test_int4_kernel_matches_float64_reference(m, k, n, gs, asym, bf16):
    torch.manual_seed(k + n)
    g = -(-k // gs)
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    s = torch.rand(n, g) + 0.1
    if bf16:
        s = s.to(torch.bfloat16)
    z = torch.randint(0, 16, (n, g)).float() if asym else None
    x = torch.randn(m, k)
    zf = z if asym else torch.full((n, g), 8.0)
    w = (u.double() - zf.double().repeat_interleave(gs, 1)[:, :k]) * s.double().repeat_interleave(gs, 1)[:, :k]
    ref = x.double() @ w.t()
    y = K.int4_linear(x, pack(u, 4), s, z, gs, 8.0)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert _rel_err(y, ref) < 1e-5


@needs_kernels
@pytest.mark.parametrize("m,k,n,gs,signed,bf16", [
    (1, 576, 200, None, True, False),  # the int8 LM head: one scale per row, signed codes
    (3, 577, 100, 64, False, False),   # zero points, partial last group
    (9, 70, 33, 16, True, True),       # a token block of 8 and one of 1, bf16 scales
    (16, 1536, 17, 128, False, False),  # N smaller than a tile
])
def test_int8_weight_kernel_matches_float64_reference(m, k, n, gs, signed, bf16):
    torch.manual_seed(k + n)
    g = 1 if gs is None else -(-k // gs)
    gw = k if gs is None else gs
    u = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    s = torch.rand(n, g) * 0.01 + 1e-3
    if bf16:
        s = s.to(torch.bfloat16)
    z = None if signed else torch.randint(0, 256, (n, g)).float()
    zf = torch.full((n, g), 128.0) if signed else z
    w = (u.double() - zf.double().repeat_interleave(gw, 1)[:, :k]) * s.double().repeat_interleave(gw, 1)[:, :k]
    x = torch.randn(m, k)
    ref = x.double() @ w.t()
    y = K.int8w_linear(x, u, s, z, gw, 128.0 if signed else 0.0)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert _rel_err(y, ref) < 1e-5
    assert torch.equal(torch.ops.slimformer.int8w_linear(x, u, s, z, gw, 128.0 if signed else 0.0), y)


@needs_kernels
@pytest.mark.parametrize("k,n,gs,signed", [(576, 100, None, True), (577, 47, 64, False), (70, 33, 16, True),
                                           (1536, 20, 128, True)])
def test_int8_weight_kernel_rows_do_not_depend_on_how_many_tokens_come_along(k, n, gs, signed):
    """Tokens go in sub-blocks of up to 4 with four accumulators each: each (row, token) sum
    keeps its order, so a W8 (or int8-head) target's verify logits equal its one-token steps'."""
    torch.manual_seed(k * n)
    g = 1 if gs is None else -(-k // gs)
    u = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    s = torch.rand(n, g) * 0.01 + 1e-3
    z = None if signed else torch.randint(0, 256, (n, g)).float()
    args = (u, s, z, k if gs is None else gs, 128.0 if signed else 0.0)
    x = torch.randn(11, k)
    ones = torch.cat([K.int8w_linear(x[i:i + 1], *args) for i in range(11)])
    for m in range(2, 12):
        assert torch.equal(K.int8w_linear(x[:m], *args), ones[:m]), m


@needs_kernels
@pytest.mark.parametrize("spec", [QuantSpec(bits=8, symmetric=True, granularity="channel"),
                                  QuantSpec(bits=8, symmetric=False, group_size=64),
                                  QuantSpec(bits=8, symmetric=True, group_size=100),
                                  QuantSpec(bits=4, symmetric=True, granularity="channel"),
                                  QuantSpec(bits=4, symmetric=False, group_size=64),
                                  QuantSpec(bits=4, symmetric=True, group_size=34)])
def test_dequant_kernels_give_the_python_dequantization_bit_for_bit(spec, monkeypatch):
    """Long inputs (a prefill) multiply dequantized tiles: the C++ dequantization must give the
    very values of the pure-PyTorch one, whole and for a slice of rows (odd K: a 4-bit row's
    last byte holds one code; groups of 34: 4-bit groups that start mid-vector)."""
    torch.manual_seed(3)
    w = torch.randn(70, 577) * 0.05
    qt = quantize(w, spec)
    lin = QuantLinear.from_quantized(qt, torch.randn(70))
    ref = dequantize(qt)
    if spec.bits == 8:
        deq = lambda n0, n1: K.int8w_dequant(*lin._kernel_args(), n0, n1)  # noqa: E731
    else:
        deq = lambda n0, n1: K.int4_dequant(*lin._kernel_args(), 577, n0, n1)  # noqa: E731
    assert torch.equal(deq(0, 70), ref)
    assert torch.equal(deq(9, 10), ref[9:10])
    assert torch.equal(lin.dequantized_weight(), ref)
    assert torch.equal(lin.dequantized_weight(slice(5, 41)), ref[5:41])
    x = torch.randn(2, KERNEL_MAX_M + 3, 577)
    fast = lin(x)
    monkeypatch.setattr(linear_mod, "cpu_kernels", lambda: None)
    lin.__dict__.pop("_kargs", None)
    assert torch.equal(lin(x), fast)  # the same tiles through the same GEMM


@needs_kernels
def test_dequant_kernels_reject_bad_rows_and_shapes():
    u, s = torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 1)
    with pytest.raises(RuntimeError, match="outside"):
        K.int8w_dequant(u, s, None, 64, 128.0, 2, 5)
    with pytest.raises(RuntimeError, match="scale rows"):
        K.int8w_dequant(u, torch.ones(3, 1), None, 64, 128.0, 0, 3)
    with pytest.raises(RuntimeError, match="outside"):
        K.int4_dequant(u, s, None, 128, 8.0, 128, 0, 5)
    with pytest.raises(RuntimeError, match="bytes per row"):
        K.int4_dequant(u, s, None, 128, 8.0, 127 + 4, 0, 4)
    with pytest.raises(RuntimeError, match="even"):
        K.int4_dequant(u, torch.ones(4, 2), None, 65, 8.0, 128, 0, 4)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_kernels_reject_bad_shapes(bits):
    fn, kb, zc = (K.int4_linear, 32, 8.0) if bits == 4 else (K.int8w_linear, 64, 128.0)
    x, q = torch.randn(1, 64), torch.zeros(4, kb, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="bytes per row"):
        fn(x, torch.zeros(4, kb - 1, dtype=torch.uint8), torch.ones(4, 1), None, 64, zc)
    with pytest.raises(RuntimeError, match="groups do not match"):
        fn(x, q, torch.ones(4, 3), None, 16, zc)
    with pytest.raises(RuntimeError, match="scale rows"):
        fn(x, q, torch.ones(5, 1), None, 64, zc)
    if bits == 4:  # two codes per byte: a group must not split a byte
        with pytest.raises(RuntimeError, match="even"):
            fn(x, q, torch.ones(4, 2), None, 33, zc)


@needs_kernels
@pytest.mark.parametrize("m,k,n", [(1, 576, 576), (4, 577, 49), (7, 1536, 3), (8, 576, 100), (9, 48, 31),
                                   (13, 33, 130), (16, 40, 17)])
def test_f32_kernel_matches_float64_reference(m, k, n):
    torch.manual_seed(m * k)
    x, w = torch.randn(m, k), torch.randn(n, k)
    y = K.f32_linear(x, w)
    assert _rel_err(y, x.double() @ w.double().t()) < 1e-5


@needs_kernels
@pytest.mark.parametrize("k,n", [(576, 100), (577, 47), (33, 16)])
def test_f32_kernel_rows_do_not_depend_on_how_many_tokens_come_along(k, n):
    """One token runs single weight rows, 2-4 tokens pairs and more tokens triples of rows: each
    (row, token) sum is still taken in the same order, so a verify step's logits equal the
    one-token steps' bit for bit (speculative greedy then matches the plain loop exactly)."""
    torch.manual_seed(k + n)
    x, w = torch.randn(11, k), torch.randn(n, k)
    ones = torch.cat([K.f32_linear(x[i:i + 1], w) for i in range(11)])
    for m in range(2, 12):
        assert torch.equal(K.f32_linear(x[:m], w), ones[:m]), m


@needs_kernels
@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=True, group_size=64),
                                  QuantSpec(bits=4, symmetric=False, group_size=128),
                                  QuantSpec(bits=4, symmetric=True, granularity="channel"),
                                  QuantSpec(bits=8, symmetric=True, granularity="channel"),
                                  QuantSpec(bits=8, symmetric=False, group_size=64)])
def test_quant_linear_few_tokens_run_the_kernel_many_tokens_dequantize(spec):
    torch.manual_seed(0)
    w, b = torch.randn(100, 577) * 0.05, torch.randn(100)
    qt = quantize(w, spec)
    lin = QuantLinear.from_quantized(qt, b)
    assert lin.backend == "dequant" and lin.kernel_fits()
    ref_w = dequantize(qt).double()
    for m in (1, KERNEL_MAX_M, KERNEL_MAX_M + 1):
        x = torch.randn(m, 577)
        y = lin(x)
        assert _rel_err(y, x.double() @ ref_w.t() + b.double()) < 1e-5
    # the few-token route is the kernel itself: bit for bit
    x = torch.randn(3, 577)
    zero = None if lin.zero is None else lin.zero.float()
    offset = float(1 << (spec.bits - 1)) if spec.symmetric else 0.0
    gs = spec.group_size if spec.granularity == "group" else 577
    kern = K.int4_linear if spec.bits == 4 else K.int8w_linear
    want = kern(x, lin.qweight, lin.scale, None if zero is None else zero + offset, gs, offset)
    assert torch.equal(lin(x), want + b)


def test_without_kernels_everything_falls_back(monkeypatch):
    """No compiler (or SLIMFORMER_NO_KERNELS=1): the pure-PyTorch paths give the same numbers."""
    torch.manual_seed(1)
    w = torch.randn(64, 96) * 0.05
    qt = quantize(w, QuantSpec(bits=4, group_size=32))
    lin = QuantLinear.from_quantized(qt)
    dense = nn.Linear(96, 64)
    x = torch.randn(2, 96)
    with torch.inference_mode():
        fast_q, fast_d = lin(x), few_token_linear(dense, x)
        monkeypatch.setattr(linear_mod, "cpu_kernels", lambda: None)
        slow_q, slow_d = lin(x), few_token_linear(dense, x)
    torch.testing.assert_close(fast_q, slow_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_d, slow_d, rtol=1e-5, atol=1e-5)
    assert torch.equal(slow_d, dense(x))


def test_disabled_by_environment(monkeypatch):
    import slimformer.kernels as kernels

    monkeypatch.setenv("SLIMFORMER_NO_KERNELS", "1")
    assert kernels.cpu_kernels() is None


def test_few_token_linear_keeps_autograd_and_other_modules():
    """Training (weights that need grad) and non-fp32 / non-Linear modules use module(x)."""
    lin = nn.Linear(8, 4)
    x = torch.randn(1, 8)
    y = few_token_linear(lin, x)
    assert y.requires_grad and y.grad_fn is not None
    frozen = nn.Linear(8, 4).requires_grad_(False)
    xg = torch.randn(1, 8, requires_grad=True)
    assert few_token_linear(frozen, xg).grad_fn is not None  # gradient to the input survives
    q = QuantLinear.from_quantized(quantize(torch.randn(4, 64), QuantSpec(bits=4, group_size=32)))
    assert q(torch.randn(1, 64, requires_grad=True)).grad_fn is not None
    half = nn.Linear(8, 4).to(torch.bfloat16)
    assert few_token_linear(half, x.to(torch.bfloat16)).dtype == torch.bfloat16


@needs_kernels
def test_decode_loop_with_kernels_matches_without(monkeypatch):
    """The runner's fp32 linears go through the kernel for decode steps; logits agree with the
    plain modules to float rounding and greedy tokens are the same."""
    lm = tiny_model("llama")
    prompts = ["Hello world, this is", "The quick brown fox"]
    with_k = generate(lm, prompts, 12, stop_on_eos=False).tokens
    monkeypatch.setattr(linear_mod, "cpu_kernels", lambda: None)
    without = generate(lm, prompts, 12, stop_on_eos=False).tokens
    assert with_k == without


@needs_kernels
def test_compiled_w4_decode_gives_the_eager_tokens():
    """The int4 and fp32 kernels are custom ops under torch.compile: one graph, same tokens."""
    from slimformer import compress

    torch._dynamo.reset()
    lm = copy.deepcopy(tiny_model("llama"))
    compress(lm, "w4-g64", progress=False)
    qls = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert qls and all(q.kernel_fits() for q in qls)
    prompts = ["Hello world, this is", "ab"]
    eager = generate(lm, prompts, 8, stop_on_eos=False).tokens
    runner = CausalRunner(lm, compile=True)
    got = generate(lm, prompts, 8, stop_on_eos=False, runner=runner).tokens
    assert runner.compile  # compiled as one graph, no fallback
    assert got == eager


@needs_kernels
def test_cached_kernel_arguments_follow_new_weights():
    """The few-token path caches its kernel arguments; loading other weights (or moving the
    module) must not leave it computing with the old ones."""
    spec = QuantSpec(bits=4, symmetric=False, group_size=32)
    a = QuantLinear.from_quantized(quantize(torch.randn(16, 64), spec))
    b = QuantLinear.from_quantized(quantize(torch.randn(16, 64), spec))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        a(x)  # fills the cache
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x))
        c = copy.deepcopy(b).float()  # _apply: the cache is rebuilt for the new tensors
        assert torch.equal(c(x), b(x))


# ---------------------------------------------------------------------------------------------
# W8A8 linear: per-token quantization + int8 GEMM + rescale in one call
# ---------------------------------------------------------------------------------------------
def _int8_layer(n, k, seed=0):
    from slimformer.formats.linear import Int8Linear

    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    b = torch.randn(n) * 0.1
    return w, b, Int8Linear, quantize(w, QuantSpec(bits=8, symmetric=True, granularity="channel"))


@needs_kernels
@pytest.mark.parametrize("m,k,n", [(1, 576, 192), (3, 577, 100), (64, 96, 33), (17, 1536, 61)])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_kernel_is_bit_identical_to_the_pytorch_steps(monkeypatch, m, k, n, static):
    """The kernel computes the same codes (round-half-even of x / s, s = absmax / 127 per token,
    clipped to the static range) and the same two float roundings when rescaling."""
    w, b, Int8Linear, qt = _int8_layer(n, k, seed=m + k)
    lin = Int8Linear.from_quantized(qt, b, act_scale=0.02 if static else None, backend="int_mm")
    x = torch.randn(m, k) * 2
    x[:, 3] *= 40  # an outlier channel sets every token's scale
    if m > 2:
        x[1] = 0.0  # an all-zero token: floored scale, zero codes
    with torch.inference_mode():
        with torch.profiler.profile() as prof:
            fast = lin(x)
        monkeypatch.setattr(linear_mod, "cpu_kernels", lambda: None)
        slow = lin(x)
    # a true int8 GEMM: PyTorch's for many tokens, our VNNI row product for <= 8 (exact too:
    # bit-identical to the _int_mm path below)
    assert ("aten::_int_mm" in {e.name for e in prof.events()}) == (m > 8)
    assert torch.equal(fast, slow)
    # against float64: the same codes, multiplied and rescaled without rounding
    lim = 127 * 0.02 if static else float("inf")
    xc = x.double().clamp(-lim, lim)
    s = xc.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    xq = torch.round(xc / s).clamp(-127, 127) * s
    ref = xq @ (qt.codes.double() * qt.scale.double()).t() + b.double()
    assert _rel_err(fast, ref) < 1e-5


@needs_kernels
def test_w8a8_kernel_rejects_bad_shapes():
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    s = torch.ones(8)
    with pytest.raises(RuntimeError, match="K mismatch"):
        K.w8a8_linear(torch.randn(2, 15), w, s, None, None)
    with pytest.raises(RuntimeError, match="int8"):
        K.w8a8_linear(torch.randn(2, 16), w.float(), s, None, None)
    with pytest.raises(RuntimeError, match="one entry per output row"):
        K.w8a8_linear(torch.randn(2, 16), w, torch.ones(7), None, None)


def test_int8_linear_default_backend_is_the_kernel_when_it_builds():
    from slimformer.formats.linear import default_int8_backend

    assert default_int8_backend() == ("int_mm" if K is not None else default_int8_backend())
    if K is not None:
        _, b, Int8Linear, qt = _int8_layer(16, 32)
        lin = Int8Linear.from_quantized(qt, b)
        assert lin.backend == "int_mm" and lin.weight_int8.dtype == torch.int8


# ---------------------------------------------------------------------------------------------
# causal prefill attention
# ---------------------------------------------------------------------------------------------
def _qkv(b, h, hk, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g).transpose(1, 2)  # the strided view attention modules pass
    return q, torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)


def _sdpa(q, k, v, scale, mask=None):
    """SDPA with the KV heads repeated for grouped queries: [B, L, H, D]; causal without a mask."""
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask, is_causal=mask is None,
        scale=scale)
    return out.transpose(1, 2)


@needs_kernels
@pytest.mark.parametrize("b,h,hk,n,d", [
    (1, 9, 3, 512, 64),   # SmolLM2's prefill square
    (2, 6, 2, 70, 16),    # row blocks and key tiles with tails
    (1, 4, 4, 33, 80),    # no GQA; head dim of one 64-wide and one 16-wide chunk
    (1, 2, 1, 5, 128),    # fewer rows than a register block
    (3, 1, 1, 2, 32),
])
def test_causal_attention_kernel_matches_sdpa(b, h, hk, n, d):
    q, k, v = _qkv(b, h, hk, n, d, seed=n + d)
    out = K.causal_attention(q, k, v, d ** -0.5)
    assert out.shape == (b, n, h, d) and out.is_contiguous()
    torch.testing.assert_close(out, _sdpa(q, k, v, d ** -0.5), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_causal_attention_kernel_never_reads_future_keys():
    q, k, v = _qkv(1, 4, 2, 40, 16)
    out = K.causal_attention(q, k, v, 0.25)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 100.0
    v2[:, :, 20:] -= 50.0
    out2 = K.causal_attention(q, k2, v2, 0.25)
    assert torch.equal(out[:, :20], out2[:, :20])
    assert not torch.allclose(out[:, 20:], out2[:, 20:])


@needs_kernels
def test_causal_attention_kernel_rejects_bad_shapes():
    q, k, v = _qkv(1, 6, 4, 8, 16)
    with pytest.raises(RuntimeError, match="evenly"):
        K.causal_attention(q, k, v, 0.25)
    q, k, v = _qkv(1, 4, 2, 8, 16)
    with pytest.raises(RuntimeError, match="square"):
        K.causal_attention(q, k[:, :, :4], v[:, :, :4], 0.25)
    q, k, v = _qkv(1, 4, 2, 8, 24)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        K.causal_attention(q, k, v, 0.25)


@needs_kernels
@pytest.mark.parametrize("b,h,hk,lq,lk,d,mask", [
    (3, 12, 12, 21, 21, 32, "keys"),   # MiniLM-like batch: a padding mask shared by the queries
    (2, 6, 2, 40, 40, 64, "full"),     # GQA, a float bias per query row, key tiles with tails
    (2, 4, 4, 5, 37, 16, "none"),      # fewer queries than keys, no mask
    (1, 2, 1, 70, 9, 32, "bool"),      # a bool mask (True = attend), several row blocks
])
def test_masked_attention_kernel_matches_sdpa(b, h, hk, lq, lk, d, mask):
    q, _, _ = _qkv(b, h, hk, lq, d, seed=lq + d)
    g = torch.Generator().manual_seed(lk)
    k, v = torch.randn(b, hk, lk, d, generator=g), torch.randn(b, hk, lk, d, generator=g)
    m = None
    if mask == "keys":
        m = torch.zeros(b, 1, 1, lk)
        m[0, ..., -4:] = torch.finfo(torch.float32).min
        m[1, ..., :3] = 0.7  # proportional attention adds log(size)
    elif mask == "full":
        m = torch.randn(b, 1, lq, lk, generator=g)
    elif mask == "bool":
        m = torch.rand(b, 1, lq, lk, generator=g) > 0.3
        m[..., 0] = True  # every row sees a key
    bias = m
    if mask == "bool":
        bias = torch.zeros(m.shape).masked_fill_(~m, float("-inf"))
    out = K.masked_attention(q, k, v, bias, d ** -0.5)
    assert out.shape == (b, lq, h, d) and out.is_contiguous()
    want = _sdpa(q, k, v, d ** -0.5, m if m is not None else torch.ones(1, 1, lq, lk, dtype=torch.bool))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _cache_attention_reference(q, k, v, start, first, scale):
    """The decoding loop's masked SDPA for queries at slots ``first[b] + i`` (step_layout's mask:
    keys start[b] .. own slot, a pad query sees its own key)."""
    from slimformer.decoding.runner import grouped_attention

    B, _, Q, _ = q.shape
    slots = first[:, None] + torch.arange(Q)  # [B, Q]
    key = torch.arange(k.shape[2])
    mask = ((key >= start[:, None, None]) & (key <= slots[:, :, None])) | (key == slots[:, :, None])
    return grouped_attention(q, k, v, mask[:, None], False, scale)


@needs_kernels
@pytest.mark.parametrize("b,h,hk,q,d,starts,lengths,cap", [
    (1, 9, 3, 1, 64, [0], [160], 320),          # SmolLM2 decode step in a larger cache
    (1, 9, 3, 8, 64, [0], [160], 168),          # a verify step, keys exactly filled
    (3, 6, 2, 5, 16, [0, 3, 12], [20, 25, 9], 40),  # left padding; row 2's first queries are pads
    (2, 4, 4, 3, 32, [1, 0], [33, 7], 48),      # no grouping, key counts that are not a multiple of 16
])
def test_decode_attention_kernel_matches_the_loops_masked_sdpa(b, h, hk, q, d, starts, lengths, cap):
    g = torch.Generator().manual_seed(q * d + b)
    kc, vc = torch.randn(b, hk, cap, d, generator=g), torch.randn(b, hk, cap, d, generator=g)
    qs = torch.randn(b, q, h, d, generator=g).transpose(1, 2)  # a strided view, as the runner passes
    start, first = torch.tensor(starts), torch.tensor(lengths)
    kv_len = int(first.max()) + q
    for T in (kv_len, cap):  # eager steps slice the cache; compiled steps pass all of it
        k, v = kc[:, :, :T], vc[:, :, :T]
        out = K.decode_attention(qs, k, v, start, first, d ** -0.5)
        assert out.shape == (b, q, h, d) and out.is_contiguous()
        torch.testing.assert_close(out, _cache_attention_reference(qs, k, v, start, first, d ** -0.5),
                                   rtol=1e-5, atol=1e-5)
        for i in range(q):  # each query alone (a one-token step at its slot): the same bits
            one = K.decode_attention(qs[:, :, i:i + 1], k, v, start, first + i, d ** -0.5)
            assert torch.equal(one[:, 0], out[:, i]), i
    assert torch.equal(torch.ops.slimformer.decode_attention(qs, kc, vc, start, first, d ** -0.5),
                       K.decode_attention(qs, kc, vc, start, first, d ** -0.5))


@needs_kernels
def test_decode_attention_kernel_rejects_bad_input():
    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    start, first = torch.zeros(1, dtype=torch.long), torch.tensor([8])
    with pytest.raises(RuntimeError, match="outside the 10 cache slots"):
        K.decode_attention(q, k, v, start, torch.tensor([9]), 0.25)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        K.decode_attention(q[..., :8], k[..., :8], v[..., :8], start, first, 0.25)
    with pytest.raises(RuntimeError, match="int64"):
        K.decode_attention(q, k, v, start.int(), first, 0.25)
    with pytest.raises(RuntimeError, match="kv heads evenly"):
        K.decode_attention(torch.randn(1, 3, 2, 16), k, v, start, first, 0.25)


@needs_kernels
def test_decode_steps_use_the_cache_attention_kernel_and_keep_the_tokens(monkeypatch):
    """Decode and verify steps of the loop (eager, compiled, speculative) run decode_attention;
    the tokens equal those of the loop on SDPA."""
    import slimformer.decoding.runner as runner_mod
    import slimformer.kernels.attention as attn
    from slimformer.decoding.speculative import early_exit_draft, speculative_generate

    torch._dynamo.reset()
    lm = tiny_model("llama")
    prompts = ["Hello world, this is", "ab"]
    with _counting_kernel(attn, "decode_attention") as calls:
        plain = generate(lm, prompts, 10, stop_on_eos=False).tokens
        spec = speculative_generate(lm, prompts, 10, draft=early_exit_draft(lm, 1),
                                    num_draft=3, stop_on_eos=False).tokens
    assert {c[2] for c in calls} >= {1, 4}  # one-token steps and 4-token verify steps
    compiled = generate(lm, prompts, 10, stop_on_eos=False, runner=CausalRunner(lm, compile=True)).tokens
    monkeypatch.setattr(runner_mod, "kernel_decode_attention", lambda *a: None)
    sdpa = generate(lm, prompts, 10, stop_on_eos=False).tokens
    assert plain == spec == compiled == sdpa


@needs_kernels
def test_masked_attention_kernel_zero_for_rows_without_keys_and_rejects_bad_bias():
    q, k, v = _qkv(2, 4, 2, 6, 16)
    bias = torch.zeros(2, 1, 6, 6)
    bias[1, :, 2] = float("-inf")  # query 2 of row 1 sees nothing
    out = K.masked_attention(q, k, v, bias, 0.25)
    assert torch.equal(out[1, 2], torch.zeros(4, 16))
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="bias must be"):
        K.masked_attention(q, k, v, torch.zeros(2, 4, 6, 6), 0.25)  # one per head
    with pytest.raises(RuntimeError, match="float32"):
        K.masked_attention(q, k, v, torch.zeros(2, 1, 1, 6, dtype=torch.float64), 0.25)


@contextlib.contextmanager
def _counting_kernel(attn, name: str):
    """Within the block, calls of kernel ``name`` made through ``attn.cpu_kernels()`` append
    their first argument's shape to the yielded list (no kernels: nothing is counted)."""
    calls: list = []
    real = attn.cpu_kernels

    class Spy:
        def __getattr__(self, n):
            fn = getattr(real(), n)
            return (lambda *a: calls.append(a[0].shape) or fn(*a)) if n == name else fn

    attn.cpu_kernels = (lambda: Spy()) if real() is not None else real
    try:
        yield calls
    finally:
        attn.cpu_kernels = real


def test_encoders_get_the_attention_and_match_sdpa_on_padded_batches():
    """A loaded (here tiny) encoder routes its attention through the masked kernel for a padded
    batch, with SDPA's outputs to float rounding; training still takes SDPA."""
    from slimformer.kernels import attention as attn

    lm = tiny_model("bert")
    assert attn.installed(lm.model)
    ref = attn.uninstall(copy.deepcopy(lm.model))
    ids = torch.randint(5, 200, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    with torch.inference_mode():
        with _counting_kernel(attn, "masked_attention") as calls:
            got = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    if K is not None:
        assert len(calls) == lm.model.config.num_hidden_layers
    with torch.inference_mode():  # uninstall: stock SDPA again, SDPA's exact numbers
        assert not attn.installed(attn.uninstall(lm.model))
        assert torch.equal(lm.model(input_ids=ids, attention_mask=mask).last_hidden_state, want)
    lm.model.train()
    lm.model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()


def test_installed_attention_matches_sdpa_and_falls_back_where_it_must():
    """On a model: an unpadded prompt takes the kernel (logits as SDPA's to float rounding);
    a padded batch, cached decode steps and training take SDPA, with SDPA's exact numbers."""
    from slimformer.kernels import attention as attn

    lm = tiny_model("llama")
    assert attn.installed(lm.model)  # tiny models get it as loaded ones do
    ref = copy.deepcopy(lm.model)
    ref.config._attn_implementation = "sdpa"
    assert attn.install(lm.model) and not attn.installed(ref)
    ids = torch.randint(0, 200, (2, 37))
    with torch.inference_mode():
        with _counting_kernel(attn, "causal_attention") as calls:
            got = lm.model(ids).logits
            n_prefill = len(calls)
            mask = torch.ones_like(ids)
            mask[0, :5] = 0  # left padding: a mask, so SDPA
            padded, padded_ref = lm.model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
            n_after_padded = len(calls)
            out = lm.model(ids[:, :30], use_cache=True)
            step = lm.model(ids[:, 30:31], past_key_values=out.past_key_values, use_cache=True).logits
            n_after_decode = len(calls)
        want = ref(ids).logits
        ref_out = ref(ids[:, :30], use_cache=True)
        step_ref = ref(ids[:, 30:31], past_key_values=ref_out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(padded, padded_ref)
    torch.testing.assert_close(step, step_ref, rtol=1e-4, atol=1e-4)
    if K is not None:
        assert n_prefill == lm.model.config.num_hidden_layers  # one kernel call per layer
        assert n_after_padded == n_prefill  # the padded batch did not use it
        assert n_after_decode == n_prefill + lm.model.config.num_hidden_layers  # the 30-token prefill did
    # training: autograd needs SDPA's backward
    lm.model.train()
    loss = lm.model(ids, labels=ids).loss
    loss.backward()
    assert lm.model.model.embed_tokens.weight.grad is not None


def test_loaded_causal_lms_get_the_attention_and_saved_configs_stay_plain(tmp_path):
    """slimformer.load installs the kernel on causal LMs (baselines too); a folder saved from
    such a model names no slimformer attention, so plain transformers still loads it."""
    import json

    from transformers import AutoModelForCausalLM

    from slimformer.kernels import attention as attn

    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "hf")
    loaded = slimformer.load(tmp_path / "hf")
    assert attn.installed(loaded.model)
    loaded.model.save_pretrained(tmp_path / "again")
    assert attn.NAME not in json.dumps(json.loads((tmp_path / "again" / "config.json").read_text()))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "again", local_files_only=True)
    ids = torch.randint(0, 200, (1, 20))
    with torch.inference_mode():
        torch.testing.assert_close(plain(ids).logits, loaded.model(ids).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# W8A8 gated MLP in one call
# ---------------------------------------------------------------------------------------------
def _w8a8_llama():
    from slimformer import compress

    lm = copy.deepcopy(tiny_model("llama"))
    compress(lm, "w8a8-plain", progress=False)
    return lm


@needs_kernels
def test_w8a8_gated_mlp_kernel_matches_its_steps():
    """silu(gate) * up between the two int8 GEMMs, re-quantized per token: against the same
    steps as PyTorch ops (codes may flip where SiLU's last bit differs: a few steps at most)."""
    import torch.nn.functional as F

    from slimformer.formats.fused import Int8GatedMLP

    lm = _w8a8_llama()
    mlps = [m for m in lm.model.modules() if isinstance(m, Int8GatedMLP)]
    assert len(mlps) == lm.model.config.num_hidden_layers and all(m.fusable() for m in mlps)
    m = mlps[0]
    x = torch.randn(2, 7, lm.model.config.hidden_size)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        y = m(x)
    names = [e.name for e in prof.events()]
    assert names.count("aten::_int_mm") == 2 and "aten::silu" not in names  # one call, no fp32 MLP ops
    with torch.inference_mode():
        want = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))  # the unfused modules
    assert y.shape == want.shape
    assert float((y - want).norm() / want.norm()) < 1e-3
    with torch.inference_mode(), torch.profiler.profile() as prof:  # without kernels: the modules
        m.fusable = lambda: False
        plain = m(x)
    assert "aten::silu" in [e.name for e in prof.events()] and torch.equal(plain, want)


@needs_kernels
def test_w8a8_mlp_fusion_survives_save_load_and_decodes_the_same(tmp_path):
    from slimformer.decoding import generate
    from slimformer.formats import save_compressed
    from slimformer.formats.fused import Int8GatedMLP

    lm = _w8a8_llama()
    save_compressed(lm, tmp_path / "m")
    back = slimformer.load(tmp_path / "m")
    assert sum(isinstance(m, Int8GatedMLP) for m in back.model.modules()) == lm.model.config.num_hidden_layers
    ids = torch.randint(0, 200, (1, 21))
    with torch.inference_mode():
        assert torch.equal(back.model(ids).logits, lm.model(ids).logits)
    prompts = ["hello there", "a b c"]
    assert generate(back, prompts, 6, stop_on_eos=False).tokens == generate(lm, prompts, 6, stop_on_eos=False).tokens


@needs_kernels
def test_w8a8_gated_mlp_kernel_rejects_bad_shapes():
    wgu = torch.zeros(10, 8, dtype=torch.int8)
    wd = torch.zeros(4, 6, dtype=torch.int8)  # 2 x 6 != 10 gate/up rows
    with pytest.raises(RuntimeError, match="gate/up must have"):
        K.w8a8_gated_mlp(torch.randn(2, 8), wgu, torch.ones(10), None, wd, torch.ones(4), None, None)


@needs_kernels
def test_weight_only_int8_group_is_its_members_side_by_side():
    """q/k/v (or gate/up) of a W8 model as one kernel call: every column bit for bit its own
    member's, with biases, for few tokens (the kernel) and many (the members), eager and
    compiled; formats the kernel cannot take are not grouped."""
    from slimformer.formats.fused import Int8WeightOnlyGroup, fuse_weight_only

    torch.manual_seed(5)
    w8 = QuantSpec(bits=8, symmetric=True, granularity="channel")
    mems = [QuantLinear.from_quantized(quantize(torch.randn(n, 96) * 0.05, w8), b)
            for n, b in ((64, None), (16, torch.randn(16)), (16, None))]
    g = fuse_weight_only(mems)
    assert isinstance(g, Int8WeightOnlyGroup) and g.out_features == 96
    with torch.inference_mode():
        for shape in ((1, 1, 96), (2, 3, 96), (1, KERNEL_MAX_M + 5, 96)):
            x = torch.randn(*shape)
            assert torch.equal(g(x), torch.cat([m(x) for m in mems], -1)), shape
        x = torch.randn(1, 2, 96)
        torch._dynamo.reset()
        compiled = torch.compile(g, fullgraph=True)
        assert torch.equal(compiled(x), g(x))
    g4 = QuantLinear.from_quantized(quantize(torch.randn(16, 96), QuantSpec(bits=4, group_size=32)))
    asym = QuantLinear.from_quantized(quantize(torch.randn(16, 96), QuantSpec(bits=8, symmetric=False,
                                                                               granularity="channel")))
    assert fuse_weight_only([mems[0], g4]) is None
    assert fuse_weight_only([mems[0], asym]) is None
    assert fuse_weight_only([mems[0], nn.Linear(96, 16)]) is None
    assert fuse_weight_only([mems[0]]) is None
    wide = QuantLinear.from_quantized(quantize(torch.randn(16, 97), w8))
    assert fuse_weight_only([mems[0], wide]) is None


# ---- RMSNorm and rotary embedding (slimformer.kernels.elementwise) --------------------------
@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 8, 576), (3, 5, 96), (1, 1, 100), (2, 70, 1536),
                                   (1, 1, 4, 64), (1, 1, 7), (2, 3, 5), (1, 1, 8)])
def test_rms_norm_kernel_equals_transformers_rmsnorm_bit_for_bit(shape):
    """The kernel sums the squares in ATen's order, so it must give LlamaRMSNorm's very values:
    rows of 576 (SmolLM2), 1536 (cascade levels), odd widths (tails), per-head q/k norms."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from slimformer.kernels.elementwise import ATEN_SUM_ORDER_KNOWN

    if not ATEN_SUM_ORDER_KNOWN:
        pytest.skip("ATen's float sum order is only known for its x86 AVX2 build")
    torch.manual_seed(0)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    for scale in (1e-3, 1.0, 40.0):
        x = torch.randn(*shape) * scale
        with torch.no_grad():
            assert torch.equal(K.rms_norm(x, norm.weight.detach(), norm.variance_epsilon), norm(x)), scale


@needs_kernels
def test_rms_norm_kernel_rejects_bad_weights():
    with pytest.raises(RuntimeError, match="weight must be float32"):
        K.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        K.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.float64), 1e-6)


@needs_kernels
@pytest.mark.parametrize("batch_cos,batch_sin", [(1, 1), (2, 2), (1, 2), (2, 1)])
def test_rotary_kernel_equals_apply_rotary_bit_for_bit(batch_cos, batch_sin):
    from slimformer.primitives.rotary import apply_rotary, apply_rotary_heads_last

    torch.manual_seed(1)
    x = torch.randn(2, 5, 3, 16)  # [B, S, H, D]
    cos, sin = torch.randn(batch_cos, 5, 16), torch.randn(batch_sin, 5, 16)
    ref = apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.equal(K.rotary(x, cos, sin), ref)
    assert torch.equal(apply_rotary_heads_last(x, cos, sin), ref)  # the fallback
    with pytest.raises(RuntimeError, match="cos / sin"):
        K.rotary(x, cos[:, :4], sin)
    with pytest.raises(RuntimeError, match="even"):
        K.rotary(torch.randn(1, 5, 3, 15), cos[..., :15], sin[..., :15])


def test_fast_rms_norm_takes_only_known_forms_and_keeps_autograd():
    """Another norm class (or one that only looks like an RMSNorm) is returned as it is; with
    gradients the fused PyTorch op runs and gradients reach the weight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from slimformer.kernels.elementwise import fast_rms_norm

    ln = nn.LayerNorm(8)
    assert fast_rms_norm(ln) is ln

    class GemmaRMSNorm(nn.Module):  # (1 + weight) form, eps attribute
        def __init__(self):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.zeros(8)), 1e-6

    g = GemmaRMSNorm()
    assert fast_rms_norm(g) is g
    norm = LlamaRMSNorm(8)
    fn = fast_rms_norm(norm)
    assert fn is not norm
    x = torch.randn(3, 8, requires_grad=True)
    fn(x).sum().backward()
    wgrad = norm.weight.grad.clone()
    norm.weight.grad = None
    ref_x = x.detach().clone().requires_grad_(True)
    norm(ref_x).sum().backward()
    assert torch.allclose(wgrad, norm.weight.grad) and torch.allclose(x.grad, ref_x.grad)
    with torch.no_grad():
        big = torch.randn(2, 100, 8)  # above KERNEL_MAX_ROWS: PyTorch's rms_norm, same values
        assert torch.equal(fn(big), norm(big)) and torch.equal(fn(big[:, :3]), norm(big[:, :3]))
