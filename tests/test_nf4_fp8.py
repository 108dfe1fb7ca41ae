"""NF4 with double quantization and FP8-e4m3 as value formats of RTN, end to end: the codebook is
QLoRA's, the double-quantized scales stay within half a step, fp8 rounds within half an ulp,
and compressed folders reload with identical logits."""
import pytest
import torch

from slimformer.errors import ConfigError
from slimformer.formats import QuantLinear, load_compressed, quantized_nbytes
from slimformer.models import tiny_model
from slimformer.primitives.affine import (NF4_CODEBOOK, QuantSpec, dequantize, dequantize_scales,
                                          quantize, quantize_scales, sqnr_db)
from slimformer.quant import RTNConfig
from slimformer.recipe import Recipe, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nf4_codebook_is_qlora_normal_map():
    """QLoRA / bitsandbytes ``create_normal_map(offset=0.9677083, use_extra_value=True)``: 8
    positive and 7 negative N(0,1) quantiles on linspace(offset, 0.5), an exact 0, divided by
    the largest -- recomputed here from the normal distribution, not copied."""
    offset = 0.9677083
    icdf = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                      torch.tensor(1.0, dtype=torch.float64)).icdf
    pos = icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    v = v / v.max()
    assert NF4_CODEBOOK.shape == (16,)
    assert torch.allclose(NF4_CODEBOOK.double(), v, atol=1e-6, rtol=0)


def test_nf4_codes_pick_the_nearest_codebook_value():
    w = torch.randn(16, 128)
    qt = quantize(w, QuantSpec(format="nf4", group_size=64))
    x = (w.reshape(16, 2, 64) / qt.scale[..., None]).reshape(16, 128)  # in [-1, 1]
    nearest = (x[..., None] - NF4_CODEBOOK).abs().argmin(-1)
    got = (x - NF4_CODEBOOK[qt.codes.long()]).abs()
    assert torch.equal(got, (x - NF4_CODEBOOK[nearest]).abs())


@pytest.mark.parametrize("n", [1, 255, 256, 700, 3 * 256 + 1])
def test_double_quant_round_trip_within_half_a_step(n):
    s = torch.exp(torch.randn(n) * 0.5) * 0.01  # positive, clustered like real absmax scales
    dq = quantize_scales(s.reshape(1, n))
    back = dequantize_scales(dq).reshape(-1)
    assert dq["codes"].dtype == torch.int8 and dq["absmax"].numel() == -(-n // 256)
    step = dq["absmax"].repeat_interleave(256)[:n]  # one int8 step of each element's block
    err = (back - s).abs()
    assert bool((err <= step / 2 + 1e-6 * s.abs().max()).all()), float((err / step).max())
    assert bool((back > 0).all())


def test_double_quant_shrinks_scale_storage():
    w = torch.randn(256, 576)
    plain = QuantLinear.from_quantized(quantize(w, QuantSpec(format="nf4", group_size=64)))
    dq = QuantLinear.from_quantized(quantize(w, QuantSpec(format="nf4", group_size=64, double_quant=True)))
    bits_plain = 8 * plain.nbytes() / w.numel()
    bits_dq = 8 * dq.nbytes() / w.numel()
    assert bits_dq < 4.2 < bits_plain  # 4 + 8/64 + 32/(64*256) + ...  vs  4 + 32/64 (fp32 scales)


def test_fp8_round_trip_within_half_an_ulp():
    w = torch.randn(64, 256) * torch.exp(torch.randn(64, 1))
    w[0, :8] = torch.tensor([0.0, 1e-9, -1e-9, 3.0, -3.0, 1e-4, 2.5e-3, -7.0])
    spec = QuantSpec(bits=8, format="fp8_e4m3", granularity="channel")
    qt = quantize(w, spec)
    deq = dequantize(qt)
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normals; subnormal step 2^-9
    bound = 2.0 ** -4 * w.abs() + 2.0 ** -10 * qt.scale
    assert bool(((deq - w).abs() <= bound * (1 + 1e-6)).all())
    assert deq.abs().max() <= w.abs().max() * (1 + 2 ** -4)
    assert qt.codes.dtype == torch.uint8 and sqnr_db(w, deq) > 28


def test_rtn_double_quant_option_and_backward_compatible_yaml():
    assert RTNConfig.from_dict({"method": "rtn", "bits": 4}).double_quant is False  # old recipes
    c = RTNConfig(bits=4, group_size=64, format="nf4", double_quant=True)
    assert c.spec().double_quant and Recipe.from_yaml(Recipe(stages=(c,)).to_yaml()).stages[0] == c
    with pytest.raises(ConfigError, match="rtn.double_quant"):
        RTNConfig(bits=4, double_quant=True)  # int format
    with pytest.raises(ConfigError, match="rtn.double_quant"):
        RTNConfig(bits=4, format="nf4", double_quant="yes")


def test_named_recipes():
    nf4, fp8 = load_recipe("nf4").stages[0], load_recipe("fp8").stages[0]
    assert (nf4.format, nf4.bits, nf4.group_size, nf4.double_quant) == ("nf4", 4, 64, True)
    assert (fp8.format, fp8.bits, fp8.group_size) == ("fp8_e4m3", 8, None)
    assert not load_recipe("nf4").needs_calibration and not load_recipe("fp8").needs_calibration


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
# bytes: 4 (nf4) or 8 (fp8) bits per weight + scales and fp32 bias per row on tiny 96-wide layers
@pytest.mark.parametrize("recipe, max_ratio", [("nf4", 0.15), ("fp8", 0.28)])
def test_compress_save_load_identical_logits(arch, recipe, max_ratio, tmp_path):
    from slimformer.compress import compress

    ids = torch.randint(0, 256, (2, 13))
    ref_lm = tiny_model(arch)
    with torch.no_grad():
        ref = ref_lm.model(ids).logits
    lm = compress(tiny_model(arch), recipe, out_dir=tmp_path / "m", progress=False)
    fmt = load_recipe(recipe).stages[0].format
    mods = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.spec.format == fmt for m in mods)
    held, fp32 = quantized_nbytes(lm.model)
    assert held <= max_ratio * fp32
    back = load_compressed(tmp_path / "m")
    with torch.no_grad():
        out = lm.model(ids).logits
        assert torch.equal(back.model(ids).logits, out)
    # quality against the uniform int4 g64 grid on the same random (Gaussian) weights: NF4's
    # quantile grid is the better 4-bit grid for them, fp8 (8 bits) much better still
    int4 = compress(tiny_model(arch), RTNConfig(bits=4, group_size=64), progress=False)
    with torch.no_grad():
        s_int4 = sqnr_db(ref, int4.model(ids).logits)
    assert sqnr_db(ref, out) > s_int4 + (0.0 if recipe == "nf4" else 10.0)
    if recipe == "nf4":
        m = next(m for m in back.model.modules() if isinstance(m, QuantLinear))
        assert m.scale is None and m.scale_codes.dtype == torch.int8  # stored double-quantized


@pytest.mark.integration
def test_smollm2_layer_nf4_and_fp8(smollm2):
    """A real SmolLM2 MLP weight: both formats keep their SQNR and the module matches the math."""
    w = smollm2.model.model.layers[3].mlp.down_proj.weight.detach()
    x = torch.randn(4, w.shape[1])
    for spec, floor in [(QuantSpec(format="nf4", group_size=64, double_quant=True), 15.0),
                        (QuantSpec(bits=8, format="fp8_e4m3", granularity="channel"), 25.0)]:
        qt = quantize(w, spec)
        assert sqnr_db(w, dequantize(qt)) > floor
        lin = QuantLinear.from_quantized(qt)
        assert sqnr_db(x @ dequantize(qt).t(), lin(x)) > 60
