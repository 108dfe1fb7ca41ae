"""Compressed linear modules and compressed folders: real kernels, real sizes, exact round trips."""
import os

import pytest
import torch
import torch.nn as nn

from slimformer.errors import SlimformerError
from slimformer.kernels import cpu_kernels
from slimformer.formats import (Int8Linear, QuantLinear, linear_weight, load_compressed,
                                quantized_nbytes, save_compressed)
from slimformer.models import get_module, load, set_module, tiny_model
from slimformer.primitives.affine import QuantSpec, dequantize, quantize, sqnr_db

W4G64 = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=64)
W8 = QuantSpec(bits=8, symmetric=True, granularity="channel")


def _layer(n=192, k=576):
    return torch.randn(n, k) * 0.05, torch.randn(n)


@pytest.mark.parametrize("spec", [W4G64, QuantSpec(bits=4, symmetric=False, group_size=128),
                                  QuantSpec(bits=3, group_size=64), QuantSpec(bits=2, group_size=32),
                                  QuantSpec(format="nf4", group_size=64, double_quant=True),
                                  QuantSpec(bits=8, format="fp8_e4m3", granularity="channel")])
@pytest.mark.parametrize("m", [1, 40])
def test_quant_linear_matches_its_dequantized_weight(spec, m):
    w, b = _layer(100, 576)  # 100 rows: not a multiple of the int4 kernel's 64-row blocks
    qt = quantize(w, spec)
    lin = QuantLinear.from_quantized(qt, b)
    x = torch.randn(m, 576)
    ref = x @ dequantize(qt).t() + b
    assert sqnr_db(ref, lin(x)) > 35  # bf16 activations on the int4 decode kernel: ~45 dB
    back = lin.quantized()
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)


@pytest.mark.parametrize("n,k", [(576, 576), (192, 576), (1536, 576), (576, 1536)])  # SmolLM2
def test_quant_linear_w4_g64_stays_packed(n, k):
    w, b = _layer(n, k)
    lin = QuantLinear.from_quantized(quantize(w, W4G64), b)
    assert lin.backend == "dequant"  # exact fp32 scales: the bf16-scale int4 kernel does not fit
    assert lin.qweight.dtype == torch.uint8
    weight_bytes = lin.nbytes() - b.numel() * 4
    assert weight_bytes <= 0.15 * w.numel() * 4, weight_bytes / (w.numel() * 4)
    held, fp32 = quantized_nbytes(nn.Sequential(lin))
    assert held <= 0.15 * fp32


@pytest.mark.parametrize("n,k", [(576, 576), (1536, 576)])
def test_quant_linear_int4_kernel_with_bf16_exact_scales(n, k):
    from slimformer.primitives.affine import compute_qparams, round_scale

    w, b = _layer(n, k)
    s, _ = compute_qparams(w, W4G64)
    # PyTorch's blocked int4 layout: the default only without our kernel, so ask for it here
    lin = QuantLinear.from_quantized(quantize(w, W4G64, scale=round_scale(s)), b, backend="int4pack")
    assert lin.backend == "int4pack" and lin.qweight.dtype == torch.uint8
    with torch.profiler.profile() as prof:
        lin(torch.randn(1, k))
    names = {e.name for e in prof.events()}
    assert "aten::_weight_int4pack_mm_for_cpu" in names
    weight_bytes = lin.nbytes() - b.numel() * 4
    assert weight_bytes <= 0.15 * w.numel() * 4, weight_bytes / (w.numel() * 4)


def test_int8_linear_true_int8_gemm_and_close_to_fp32():
    w, b = _layer(1536, 576)
    ref_lin = nn.Linear(576, 1536)
    ref_lin.weight.data, ref_lin.bias.data = w, b
    for backend in ("fbgemm", "int_mm"):
        lin = Int8Linear.from_quantized(quantize(w, W8), b, backend=backend)
        for m in (1, 64):
            x = torch.randn(m, 576)
            x[:, 7] *= 20  # an outlier channel
            with torch.no_grad():
                ref = ref_lin(x)
            with torch.profiler.profile() as prof:
                y = lin(x)
            names = {e.name for e in prof.events()}
            int_ops = {"quantized::linear_dynamic", "aten::_int_mm"} & names
            # <= 8 tokens on the int_mm backend: our own VNNI int8 product (no aten op to see;
            # tests/test_kernels.py checks it bit for bit against _int_mm)
            own = backend == "int_mm" and m <= 8 and cpu_kernels() is not None
            assert int_ops or own, names
            assert not {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul"} & names
            assert sqnr_db(ref, y) > 30, (backend, m)
        assert torch.equal(lin.quantized().codes, quantize(w, W8).codes)


def test_int8_per_token_beats_per_tensor_on_outlier_tokens():
    w, b = _layer(576, 576)
    x = torch.randn(32, 576)
    x[5] *= 200  # one outlier token: a per-tensor scale would flatten every other token
    lin = Int8Linear.from_quantized(quantize(w, W8), b)
    ref = x @ w.t() + b
    y = lin(x)
    assert sqnr_db(ref[:5], y[:5]) > 35


def test_int8_static_scale_clips():
    w, b = _layer(64, 64)
    lin = Int8Linear.from_quantized(quantize(w, W8), None, act_scale=0.01, backend="int_mm")
    x = torch.full((2, 64), 10.0)
    assert torch.allclose(lin(x), torch.full((2, 64), 1.27) @ dequantize(quantize(w, W8)).t(), rtol=1e-3)


def test_linear_weight_conv1d():
    from transformers.pytorch_utils import Conv1D

    c = Conv1D(12, 5)  # nx=5 inputs, nf=12 outputs, weight [5, 12]
    assert linear_weight(c).shape == (12, 5)
    x = torch.randn(3, 5)
    assert torch.allclose(c(x), x @ linear_weight(c).t() + c.bias)


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
def _compress(lm, mixed: bool):
    """Quantize every block linear with RTN via the primitives (the engine does this for real)."""
    bp = lm.arch.block_path(lm.model)
    for i in range(len(lm.arch.get_blocks(lm.model))):
        for role, rel in lm.arch.linear_names().items():
            name = f"{bp}.{i}.{rel}"
            mod = get_module(lm.model, name)
            w = linear_weight(mod).detach()
            if mixed and role in ("q", "qkv", "down"):
                new = Int8Linear.from_quantized(quantize(w, W8), mod.bias)
            elif mixed and role == "o":
                new = QuantLinear.from_quantized(quantize(w, QuantSpec(format="nf4", group_size=32,
                                                                       double_quant=True)), mod.bias)
            else:
                new = QuantLinear.from_quantized(quantize(w, W4G64), mod.bias)
            set_module(lm.model, name, new)
    return lm


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_save_load_logits_bit_identical(arch, tmp_path):
    lm = _compress(tiny_model(arch), mixed=True)
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        ref = lm.model(ids).logits
        ref1 = lm.model(ids[:1, :1]).logits  # one token: the decode kernels
    save_compressed(lm, tmp_path / "out", {"recipe": "test"})
    lm2 = load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(lm2.model(ids).logits, ref)
        assert torch.equal(lm2.model(ids[:1, :1]).logits, ref1)
    assert lm2.meta == {"recipe": "test"} and lm2.arch.name == arch
    assert lm2.tokenizer is not None and lm2.tokenizer("ab")["input_ids"]
    assert not any(p.device.type == "meta" for p in lm2.model.parameters())


def test_tied_embeddings_survive(tmp_path):
    lm = _compress(tiny_model("llama"), mixed=False)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    save_compressed(lm, tmp_path / "o", {})
    m2 = load_compressed(tmp_path / "o").model
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert torch.equal(m2.lm_head.weight, lm.model.lm_head.weight)


def test_save_is_deterministic_and_small(tmp_path):
    lm = _compress(tiny_model("llama"), mixed=False)
    a, b = save_compressed(lm, tmp_path / "a", {"x": 1}), save_compressed(lm, tmp_path / "b", {"x": 1})
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(b)) and "slimformer.json" in files
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as f:
        q = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                if ".qweight" in k or ".scale" in k)
    w = sum(m.in_features * m.out_features * 4 for m in lm.model.modules() if isinstance(m, QuantLinear))
    assert q <= 0.15 * w, q / w


def test_interrupted_save_leaves_nothing(tmp_path):
    lm = _compress(tiny_model("gpt2"), mixed=False)

    class Boom:
        def save_pretrained(self, d):
            raise KeyboardInterrupt

    lm.tokenizer = Boom()
    with pytest.raises(KeyboardInterrupt):
        save_compressed(lm, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tmp_path):
    lm = tiny_model("opt")
    (tmp_path / "o").mkdir()
    with pytest.raises(SlimformerError, match="exists"):
        save_compressed(lm, tmp_path / "o", {})
    save_compressed(lm, tmp_path / "o", {}, overwrite=True)
    assert (tmp_path / "o" / "slimformer.json").exists()


def test_bad_folder_errors(tmp_path):
    lm = tiny_model("opt")
    out = save_compressed(lm, tmp_path / "o", {})
    (out / "slimformer.json").write_text('{"format_version": 99}')
    with pytest.raises(SlimformerError, match="format_version"):
        load_compressed(out)


def test_saved_weights_are_readable_like_the_other_files(tmp_path):
    import os
    import stat

    from slimformer import compress

    out = tmp_path / "w4"
    compress(tiny_model("llama"), "w4-g64", out_dir=out, progress=False)
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


# ---------------------------------------------------------------------------------------------
# run-time fusion of same-input int8 linears (q/k/v, gate/up)
# ---------------------------------------------------------------------------------------------
def _all_int8(lm):
    bp = lm.arch.block_path(lm.model)
    for i in range(len(lm.arch.get_blocks(lm.model))):
        for rel in lm.arch.linear_names().values():
            name = f"{bp}.{i}.{rel}"
            mod = get_module(lm.model, name)
            set_module(lm.model, name, Int8Linear.from_quantized(quantize(linear_weight(mod).detach(), W8), mod.bias))
    return lm


@pytest.mark.parametrize("arch", ["llama", "bert", "opt"])
def test_fused_int8_siblings_are_bit_identical_and_save_unfused(arch, tmp_path):
    from slimformer.formats.fused import (FusedInt8Slice, fuse_int8_mlps, fuse_int8_siblings,
                                          unfuse_int8_siblings)

    lm = _all_int8(tiny_model(arch))
    ids = torch.randint(0, 256, (2, 13))

    def out():
        with torch.no_grad():
            o = lm.model(input_ids=ids)
        return o.logits if hasattr(o, "logits") else o.last_hidden_state

    ref, ref1 = out(), None
    save_compressed(lm, tmp_path / "plain", {})
    n_blocks = len(lm.arch.get_blocks(lm.model))
    groups = fuse_int8_siblings(lm.model, lm.arch)
    assert groups == n_blocks * (2 if arch == "llama" else 1)  # q/k/v (+ gate/up when gated)
    assert any(isinstance(m, FusedInt8Slice) for m in lm.model.modules())
    assert torch.equal(out(), ref)
    assert torch.equal(out(), ref)  # the one-entry cache never serves a stale product
    # saved as the plain Int8Linear modules, byte for byte
    save_compressed(lm, tmp_path / "fused", {})
    for f in sorted(os.listdir(tmp_path / "plain")):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "fused" / f).read_bytes(), f
    # loading fuses again (and a gated MLP into one kernel call, as fuse_int8_mlps does here)
    fuse_int8_mlps(lm.model, lm.arch)
    lm2 = load(tmp_path / "fused")
    assert any(isinstance(m, FusedInt8Slice) for m in lm2.model.modules())
    with torch.no_grad():
        o2 = lm2.model(input_ids=ids)
    assert torch.equal(o2.logits if hasattr(o2, "logits") else o2.last_hidden_state, out())
    torch.testing.assert_close(out(), ref, rtol=1e-3, atol=1e-3)  # SiLU rounding inside the MLP kernel
    assert unfuse_int8_siblings(lm.model) > 0 and torch.equal(out(), ref)


def test_fusion_skips_mixed_groups():
    from slimformer.formats.fused import fuse_int8_siblings

    lm = _compress(tiny_model("llama"), mixed=True)  # q int8, k/v 4-bit: nothing to fuse
    assert fuse_int8_siblings(lm.model, lm.arch) == 0
