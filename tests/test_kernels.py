"""slimformer's own C++ CPU kernels (few-token int4 and fp32 linears): exact sums against a
float64 reference on awkward shapes, the routes that use them, and the fallback without them."""
import copy

import pytest
import torch
import torch.nn as nn

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
def test_int4_kernel_rejects_bad_shapes():
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="bytes per row"):
        K.int4_linear(x, torch.zeros(4, 31, dtype=torch.uint8), torch.ones(4, 1), None, 64, 8.0)
    with pytest.raises(RuntimeError, match="groups do not match"):
        K.int4_linear(x, torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 3), None, 16, 8.0)
    with pytest.raises(RuntimeError, match="even"):
        K.int4_linear(x, torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2), None, 33, 8.0)


@needs_kernels
@pytest.mark.parametrize("m,k,n", [(1, 576, 576), (4, 577, 49), (7, 1536, 3), (13, 33, 130), (16, 40, 17)])
def test_f32_kernel_matches_float64_reference(m, k, n):
    torch.manual_seed(m * k)
    x, w = torch.randn(m, k), torch.randn(n, k)
    y = K.f32_linear(x, w)
    assert _rel_err(y, x.double() @ w.double().t()) < 1e-5


@needs_kernels
@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=True, group_size=64),
                                  QuantSpec(bits=4, symmetric=False, group_size=128),
                                  QuantSpec(bits=4, symmetric=True, granularity="channel")])
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
    offset = 8.0 if spec.symmetric else 0.0
    gs = spec.group_size if spec.granularity == "group" else 577
    want = K.int4_linear(x, lin.qweight, lin.scale, None if zero is None else zero + offset, gs, offset)
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
