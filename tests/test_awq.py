"""AWQ: the searched scales never score worse than RTN, the transform alone is exact, AWQ cuts
the block output error of RTN on activation outliers, [awq, gptq] composes, configs validate
and round-trip, a compressed folder reloads with identical logits."""
import copy

import pytest
import torch

from slimformer.engine.runner import EngineOptions, run
from slimformer.errors import ConfigError
from slimformer.formats import QuantLinear
from slimformer.models import tiny_model
from slimformer.observers import HessianObserver
from slimformer.primitives.affine import QuantSpec, fake_quantize
from slimformer.quant import AWQConfig, GPTQConfig, RTNConfig
from slimformer.quant.awq import search_clip, search_scales
from slimformer.recipe import Recipe, load_recipe

from stage_harness import apply_to_block0, block0, block_outputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _outlier_llama():
    """Tiny llama whose norms make a few input channels 10-30x larger (as in real LLMs)."""
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    for blk in lm.model.model.layers:
        for norm in (blk.input_layernorm, blk.post_attention_layernorm):
            idx = torch.randperm(norm.weight.numel(), generator=g)[:4]
            norm.weight.data[idx] *= 10 + 20 * torch.rand(4, generator=g)
    return lm


def _block0(lm):
    return block0(lm, n=8, seq=24, batch=4)


_outputs = block_outputs
_apply = apply_to_block0


def _err(block, states, rest, ref):
    return float((_outputs(block, states, rest) - ref).pow(2).mean())


def _random_group(cols=96, rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, cols, generator=g) * (0.3 + torch.rand(cols, generator=g))
    x[:, :3] *= 25  # salient channels
    obs = HessianObserver()
    obs.observe(x)
    return x, obs.result(), torch.randn(rows, cols, generator=g) * 0.05


def test_scale_search_scores_on_the_output_and_never_loses_to_rtn():
    x, h, w = _random_group()
    spec = QuantSpec(bits=3, symmetric=True, granularity="group", group_size=32)
    s, losses = search_scales(h, w, x.abs().mean(0), spec, grid=10)
    assert len(losses) == 11 and min(losses) <= losses[0]  # losses[0]: s = 1, plain RTN
    # the loss is the group's output error on the calibration tokens (up to n/2)
    out = lambda q: float((x @ q.t() - x @ w.t()).pow(2).sum())
    q_awq = fake_quantize(w * s, spec) / s
    assert out(q_awq) == pytest.approx(min(losses) * x.shape[0] / 2, rel=1e-3)
    assert out(q_awq) < out(fake_quantize(w, spec))


def test_clip_search_reduces_partial_output_error():
    x, h, w = _random_group(cols=80)  # 80 = 2 x 32 + 16: a partial last group
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32)
    mv = search_clip(h, w, spec, clip_grid=10, max_shrink=0.5)
    assert mv.shape == (40, 3)
    full = w.abs().reshape(40, -1)
    assert bool((mv > 0).all())
    clipped = w.clone()
    from slimformer.quant.awq import apply_clip

    apply_clip(clipped, mv, spec)
    assert float(clipped.abs().max()) <= float(full.max())
    err = lambda q: float((x @ (q - w).t()).pow(2).sum())
    assert err(fake_quantize(clipped, spec)) <= err(fake_quantize(w, spec)) * (1 + 1e-6)


def test_transform_alone_is_exact():
    lm = _outlier_llama()
    block, states, rest = _block0(lm)
    ref = _outputs(block, states, rest)
    before = {n: p.clone() for n, p in block.named_parameters()}
    _apply(lm, block, states, rest, AWQConfig(bits=3, group_size=32, clip=False, quantize=False))
    assert any(not torch.equal(p, before[n]) for n, p in block.named_parameters())
    assert not any(isinstance(m, QuantLinear) for m in block.modules())
    assert float((_outputs(block, states, rest) - ref).norm() / ref.norm()) <= 1e-5


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_block_output(bits):
    lm = _outlier_llama()
    block, states, rest = _block0(lm)
    ref = _outputs(block, states, rest)
    b_rtn, b_awq = copy.deepcopy(block), copy.deepcopy(block)
    _apply(lm, b_rtn, states, rest, RTNConfig(bits=bits, group_size=32))
    _apply(lm, b_awq, states, rest, AWQConfig(bits=bits, group_size=32))
    assert sum(isinstance(m, QuantLinear) for m in b_awq.modules()) == 7
    assert _err(b_awq, states, rest, ref) < 0.9 * _err(b_rtn, states, rest, ref)


def test_awq_then_gptq_composes_and_beats_rtn(tmp_path):
    import slimformer
    from slimformer.formats import save_compressed

    lm = _outlier_llama()
    base = copy.deepcopy(lm)
    rtn = copy.deepcopy(lm)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(3))
    rec = Recipe(stages=(AWQConfig(bits=3, group_size=32, quantize=False), GPTQConfig(bits=3, group_size=32)))
    run(lm, rec.stages, ids, EngineOptions(batch_size=4, progress=False))
    run(rtn, [RTNConfig(bits=3, group_size=32)], None, EngineOptions(progress=False))
    mods = [m for n, m in lm.model.named_modules() if n.startswith("model.layers.")]
    assert sum(isinstance(m, QuantLinear) for m in mods) == 21
    with torch.no_grad():
        ref = base.model(ids).logits
        assert (lm.model(ids).logits - ref).pow(2).mean() < (rtn.model(ids).logits - ref).pow(2).mean()
    save_compressed(lm, tmp_path / "m")
    again = slimformer.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, lm.model(ids).logits)


def test_config_validation_names_the_field():
    for bad, field in [(dict(grid=0), "awq.grid"), (dict(max_shrink=1.0), "awq.max_shrink"),
                       (dict(clip="no"), "awq.clip"), (dict(quantize=1), "awq.quantize"),
                       (dict(bits=9), "awq.bits"), (dict(clip_grid=0), "awq.clip_grid")]:
        with pytest.raises(ConfigError, match=field):
            AWQConfig(**bad)


@pytest.mark.parametrize("name", ["awq-w4-g64", "awq-gptq-w4-g64"])
def test_named_recipes_round_trip(name):
    r = load_recipe(name)
    assert isinstance(r.stages[0], AWQConfig)
    assert Recipe.from_yaml(r.to_yaml()) == r
