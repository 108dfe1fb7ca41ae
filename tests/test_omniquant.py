"""OmniQuant: LWC at factor 1 is RTN, the packed result equals the trained fake quantization,
LET is exact in fp32, training beats RTN on block output error, configs validate, and a
compressed model saves and loads to identical logits."""
import copy

import pytest
import torch

from slimformer.engine import ActivationCache, block_forward
from slimformer.engine.runner import _batches, _calibrate, capture_block_inputs
from slimformer.engine.stage import BlockContext, method_of
from slimformer.errors import ConfigError
from slimformer.models import tiny_model
from slimformer.primitives.affine import QuantSpec, dequantize, fake_quantize, quantize
from slimformer.quant import RTNConfig
from slimformer.quant.omniquant import (OmniQuantConfig, _BlockProblem, lwc_fake_quantize, lwc_quantize,
                                        microbatches)
from slimformer.quant.smoothquant import smoothable_groups
from slimformer.recipe import Recipe, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [QuantSpec(bits=4, group_size=64), QuantSpec(bits=3, symmetric=False, group_size=64),
         QuantSpec(bits=2, group_size=32), QuantSpec(bits=4, symmetric=False, granularity="channel")]


# ---- LWC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_lwc_at_factor_one_is_rtn_exactly(spec):
    w = torch.randn(24, 100) * torch.rand(24, 1)  # 100 columns: a partial last group of 64/32
    n = spec.n_groups(100)
    one = torch.ones(24, n)
    assert torch.equal(lwc_fake_quantize(w, one, one, spec), fake_quantize(w, spec))
    assert torch.equal(lwc_fake_quantize(w, None, None, spec), fake_quantize(w, spec))
    a, b = lwc_quantize(w, one, one, spec), quantize(w, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_packed_codes_dequantize_to_the_trained_fake_quantization(spec):
    w = torch.randn(24, 100)
    n = spec.n_groups(100)
    gamma, beta = 0.5 + 0.5 * torch.rand(24, n), 0.5 + 0.5 * torch.rand(24, n)
    fake = lwc_fake_quantize(w, gamma, beta, spec)
    assert torch.equal(dequantize(lwc_quantize(w, gamma, beta, spec)), fake)
    assert not torch.equal(fake, fake_quantize(w, spec))  # the clipping did change the grid


def test_lwc_gradient_reaches_the_clipping_logits():
    spec = QuantSpec(bits=3, symmetric=False, group_size=64)
    w = torch.randn(8, 100)
    logits = torch.full((8, 2), 4.0, requires_grad=True)
    g = torch.sigmoid(logits)
    ((lwc_fake_quantize(w, g, g, spec) - w) ** 2).sum().backward()
    assert logits.grad is not None and bool((logits.grad != 0).any())


# ---- LET and training on one tiny block ------------------------------------------------------------


def _block0(lm, n=8, seq=32):
    samples = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))
    cache = ActivationCache(None)
    with torch.no_grad():
        rest = capture_block_inputs(lm, samples, 4, cache)
    return lm.arch.get_blocks(lm.model)[0], cache, rest


def _ctx(lm, block, cache, rest, cfg):
    from slimformer.engine.targets import default_target_names

    base = lm.arch.block_path(lm.model) + ".0."
    targets = {n[len(base):]: cfg for n in default_target_names(lm.model, lm.arch) if n.startswith(base)}
    ctx = BlockContext(index=0, name=base[:-1], block=block, arch=lm.arch, config=lm.model.config,
                       targets=targets, forward_inputs=_batches(cache, rest))
    kinds = {rel: tuple(method_of(cfg).observers(cfg)) for rel in targets}
    if any(kinds.values()):
        with torch.no_grad():
            ctx.stats = _calibrate(block, kinds, cache, rest)
    return ctx


def _outputs(block, cache, rest):
    with torch.no_grad():
        return torch.cat([block_forward(block, h, a, kw) for h, (a, kw) in zip(cache, rest)])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "bert"])
def test_let_transform_leaves_fp32_block_unchanged(arch):
    lm = tiny_model(arch)
    block, cache, rest = _block0(lm)
    ref = _outputs(block, cache, rest)
    cfg = OmniQuantConfig(let=True)
    ctx = _ctx(lm, block, cache, rest, cfg)
    problem = _BlockProblem(ctx, cfg, smoothable_groups(ctx, "omniquant"))
    assert problem.groups
    with torch.no_grad():  # move away from the SmoothQuant initialisation: any scales/shifts are exact
        for ls in problem.log_scales:
            ls.add_(0.3 * torch.randn_like(ls))
        for d in problem.shifts:
            if d is not None:
                d.add_(torch.randn_like(d))
    if arch in ("llama", "bert"):  # RMSNorm has no bias; BERT's only group is v -> o: scale only
        assert all(d is None for d in problem.shifts)
    else:
        assert any(d is not None for d in problem.shifts)  # LayerNorm with bias: shift is learned
    params = problem.tensors(quant=False)
    with torch.no_grad():
        got = torch.cat([problem.forward(params, a, kw) for a, kw in ctx.forward_inputs()])
    assert _rel(got, ref) <= 1e-5
    before = {n: p.clone() for n, p in block.named_parameters()}
    problem.fold_let()  # the same transform written into the modules
    assert any(not torch.equal(p, before[n]) for n, p in block.named_parameters())
    assert _rel(_outputs(block, cache, rest), ref) <= 1e-5


@pytest.mark.parametrize("arch,symmetric", [("llama", True), ("opt", False)])
def test_training_lowers_block_output_error_vs_rtn(arch, symmetric):
    lm = tiny_model(arch)
    block, cache, rest = _block0(lm)
    ref = _outputs(block, cache, rest)
    rtn_block, oq_block = copy.deepcopy(block), copy.deepcopy(block)
    rtn = RTNConfig(bits=3, group_size=64, symmetric=symmetric)
    method_of(rtn).apply(_ctx(lm, rtn_block, cache, rest, rtn), rtn)
    cfg = OmniQuantConfig(bits=3, group_size=64, symmetric=symmetric, epochs=4, samples=8)
    method_of(cfg).apply(_ctx(lm, oq_block, cache, rest, cfg), cfg)
    assert all(type(m).__name__ == "QuantLinear" for n, m in oq_block.named_modules()
               if n.endswith(("proj", "fc1", "fc2")))
    e_rtn = float(((_outputs(rtn_block, cache, rest) - ref) ** 2).mean())
    e_oq = float(((_outputs(oq_block, cache, rest) - ref) ** 2).mean())
    print(f"{arch}: block output mse rtn {e_rtn:.3g}, omniquant {e_oq:.3g}")
    assert e_oq < e_rtn


def test_reset_to_rtn_packs_exactly_rtn():
    """The fallback when training does not beat rounding: identical codes and scales."""
    lm = tiny_model("llama")
    block, cache, rest = _block0(lm)
    rtn_block = copy.deepcopy(block)
    rtn = RTNConfig(bits=3, group_size=64)
    method_of(rtn).apply(_ctx(lm, rtn_block, cache, rest, rtn), rtn)
    cfg = OmniQuantConfig(bits=3, group_size=64)
    ctx = _ctx(lm, block, cache, rest, cfg)
    problem = _BlockProblem(ctx, cfg, smoothable_groups(ctx, "omniquant"))
    problem.reset_to_rtn()
    problem.fold_let()
    problem.pack()
    for rel in ctx.targets:
        a, b = ctx.module(rel).quantized(), rtn_block.get_submodule(rel).quantized()
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), rel


def test_microbatches_take_the_first_samples_in_steps():
    lm = tiny_model("llama")
    _, cache, rest = _block0(lm, n=8)  # engine batches of 4
    mbs = microbatches(_batches(cache, rest), samples=6, batch_size=3)
    hidden = [a[0] for a, _ in mbs]
    assert [h.shape[0] for h in hidden] == [3, 1, 2]  # 3 of batch 0, its last 1, then 2 of batch 1
    assert torch.equal(torch.cat(hidden), torch.cat(list(cache))[:6])


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("bits", 1), ("bits", 9), ("group_size", 0), ("epochs", -1),
                                         ("samples", 0), ("batch_size", 0), ("lr_lwc", -1.0),
                                         ("let_alpha", 1.5), ("lwc", "yes"), ("symmetric", None)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"omniquant\.{field}"):
        OmniQuantConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"omniquant\.{field}"):
        load_recipe({"stages": [{"method": "omniquant", field: value}]})


def test_config_cross_field_rules():
    with pytest.raises(ConfigError, match=r"omniquant\.lwc.*at least one"):
        OmniQuantConfig(lwc=False, let=False)
    with pytest.raises(ConfigError, match=r"omniquant\.overrides.*epochs.*allowed: bits"):
        OmniQuantConfig(overrides={"re:.*down_proj": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"omniquant\.steps: unknown field"):
        load_recipe({"stages": [{"method": "omniquant", "steps": 3}]})
    assert OmniQuantConfig(overrides={"re:.*down_proj": {"bits": 8}}).for_module("x.down_proj").bits == 8


@pytest.mark.parametrize("name,bits", [("omniquant-w4-g64", 4), ("omniquant-w3-g64", 3)])
def test_named_recipes_round_trip(name, bits):
    r = load_recipe(name)
    (st,) = r.stages
    assert isinstance(st, OmniQuantConfig) and st.bits == bits and st.group_size == 64
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r and again.to_yaml() == r.to_yaml() and again.needs_calibration


# ---- end to end -------------------------------------------------------------------------------


def test_compress_save_load_identical_logits(tmp_path):
    import slimformer
    from slimformer.compress import CalibrationConfig

    lm = tiny_model("llama")
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = lm.model(input_ids=x, use_cache=False).logits
    out = tmp_path / "oq"
    q = slimformer.compress(lm, OmniQuantConfig(bits=4, group_size=32, epochs=1, samples=4),
                            out_dir=out, calibration=CalibrationConfig(samples=4, seq_len=32, batch_size=2),
                            progress=False)
    again = slimformer.load(str(out))
    with torch.no_grad():
        got = q.model(input_ids=x, use_cache=False).logits
        got2 = again.model(input_ids=x, use_cache=False).logits
    assert torch.equal(got, got2)
    assert 0 < _rel(got, ref) < 0.2  # quantized (not the fp32 model), but still the same model
    assert sum(type(m).__name__ == "QuantLinear" for m in again.model.modules()) == 3 * 7


@pytest.mark.integration
def test_smollm2_one_block_w3_beats_rtn(smollm2):
    """Block 0 of the real model, W3 g64, 4 calibration sequences of 128 tokens."""
    from slimformer.data import calibration_samples

    lm = copy.copy(smollm2)
    lm.model = copy.deepcopy(smollm2.model)
    samples = calibration_samples(lm.tokenizer, n=4, seq_len=128)
    cache = ActivationCache(None)
    with torch.no_grad():
        rest = capture_block_inputs(lm, samples, 2, cache)
    block = lm.arch.get_blocks(lm.model)[0]
    ref = _outputs(block, cache, rest)
    rtn_block = copy.deepcopy(block)
    rtn = RTNConfig(bits=3, group_size=64)
    method_of(rtn).apply(_ctx(lm, rtn_block, cache, rest, rtn), rtn)
    cfg = OmniQuantConfig(bits=3, group_size=64, epochs=2, samples=4)
    method_of(cfg).apply(_ctx(lm, block, cache, rest, cfg), cfg)
    e_rtn = float(((_outputs(rtn_block, cache, rest) - ref) ** 2).mean())
    e_oq = float(((_outputs(block, cache, rest) - ref) ** 2).mean())
    assert e_oq < e_rtn
