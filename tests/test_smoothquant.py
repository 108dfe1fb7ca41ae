"""SmoothQuant: the transform is exact in fp32, the scale formula, it helps W8A8 on outlier
channels, and its config round-trips / fails naming the field."""
import copy

import pytest
import torch

from slimformer.errors import ConfigError
from slimformer.models import tiny_model
from slimformer.quant import SmoothQuantConfig, W8A8Config
from slimformer.quant.smoothquant import smooth_scales
from slimformer.recipe import Recipe, load_recipe


from stage_harness import apply_to_block0, block0, block_outputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


_block0 = block0
_outputs = block_outputs
_apply = apply_to_block0


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_leaves_fp32_block_unchanged(arch, alpha):
    lm = tiny_model(arch)
    block, states, rest = _block0(lm)
    before = {n: p.clone() for n, p in block.named_parameters()}
    ref = _outputs(block, states, rest)
    _apply(lm, block, states, rest, SmoothQuantConfig(alpha=alpha))
    changed = [n for n, p in block.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "smoothing changed no weight"
    assert any("norm" in n for n in changed)
    assert _rel(_outputs(block, states, rest), ref) <= 1e-5


def test_scales_formula_by_hand():
    act = torch.tensor([4.0, 1.0, 9.0, 0.0])
    w = torch.tensor([1.0, 4.0, 1.0, 2.0])
    s = smooth_scales(act, w, 0.5)
    # sqrt(4)/sqrt(1), sqrt(1)/sqrt(4), sqrt(9)/1, and a dead channel -> 1
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 3.0, 1.0]))
    assert torch.allclose(smooth_scales(act[:3], w[:3], 1.0), act[:3])
    assert torch.allclose(smooth_scales(act[:3], w[:3], 0.0), 1 / w[:3])


def test_smoothing_then_w8a8_beats_w8a8_on_outlier_channels():
    lm = tiny_model("llama")
    block, states, rest = _block0(lm, n=8, seq=32)
    with torch.no_grad():  # a few activation outlier channels, as in real LLMs
        block.input_layernorm.weight[[3, 17, 40]] *= 60.0
        block.post_attention_layernorm.weight[[5, 21]] *= 60.0
    ref = _outputs(block, states, rest)
    plain, smooth = copy.deepcopy(block), copy.deepcopy(block)
    _apply(lm, plain, states, rest, W8A8Config())
    _apply(lm, smooth, states, rest, SmoothQuantConfig(alpha=0.5))
    _apply(lm, smooth, states, rest, W8A8Config())
    e_plain, e_smooth = _rel(_outputs(plain, states, rest), ref), _rel(_outputs(smooth, states, rest), ref)
    print(f"block-output rel. error: w8a8 {e_plain:.4f}, smoothquant+w8a8 {e_smooth:.4f}")
    assert e_smooth < 0.7 * e_plain, (e_smooth, e_plain)


def test_yaml_round_trip():
    r = Recipe(stages=(SmoothQuantConfig(alpha=0.8, ignore=("re:.*\\.0\\..*",)), W8A8Config()))
    text = r.to_yaml()
    assert "method: smoothquant" in text and "alpha: 0.8" in text
    again = Recipe.from_yaml(text)
    assert again == r and again.to_yaml() == text
    assert again.needs_calibration


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "high", True, None])
def test_bad_alpha_names_the_field(alpha):
    with pytest.raises(ConfigError, match=r"smoothquant\.alpha"):
        SmoothQuantConfig(alpha=alpha)
    with pytest.raises(ConfigError, match=r"smoothquant\.alpha"):
        load_recipe({"stages": [{"method": "smoothquant", "alpha": alpha}]})


def test_end_to_end_compress_tiny_llama():
    import slimformer
    from slimformer.compress import CalibrationConfig

    lm = tiny_model("llama")
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = lm.model(input_ids=x, use_cache=False).logits
    slimformer.compress(lm, [SmoothQuantConfig(alpha=0.5), W8A8Config()],
                        calibration=CalibrationConfig(samples=4, seq_len=32, batch_size=2), progress=False)
    with torch.no_grad():
        got = lm.model(input_ids=x, use_cache=False).logits
    assert _rel(got, ref) < 0.1
