"""Unstructured / N:M pruning (magnitude, Wanda, SparseGPT) and the SparseLinear format.

Invariants, not tolerances: exact pruned counts, the N:M pattern in every group, SparseGPT's
Hessian-weighted error not above the scoring-only methods', bit-exact mask packing and
save -> load round trips, and the stored bytes of a 50% layer.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from slimformer.engine import EngineOptions, run
from slimformer.errors import ConfigError, SlimformerError
from slimformer.formats.sparse import MIN_SPARSITY, SparseLinear, pack_mask, unpack_mask
from slimformer.models import tiny_model
from slimformer.primitives.affine import QuantSpec, dequantize, quantize
from slimformer.prune.masks import (check_nm, keep_mask, magnitude_scores, n_pruned, nm_mask,
                                    unstructured_mask, wanda_scores)
from slimformer.prune.unstructured import (MagnitudeConfig, SparseGPTConfig, WandaConfig,
                                           reconstruction_error, sparsegpt_prune)
from slimformer.recipe import Recipe, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = [
    MagnitudeConfig(sparsity=0.5), MagnitudeConfig(sparsity=0.5, pattern="2:4"),
    WandaConfig(sparsity=0.5), WandaConfig(sparsity=0.5, pattern="4:8"),
    SparseGPTConfig(sparsity=0.5), SparseGPTConfig(sparsity=0.5, pattern="2:4"),
    SparseGPTConfig(sparsity=0.3, block_size=32),
    SparseGPTConfig(sparsity=0.5, pattern="2:4", bits=4, group_size=32),
]


def _samples(n=4, seq=24):
    return torch.randint(0, 200, (n, seq), generator=torch.Generator().manual_seed(3))


def _prune(cfg, arch="llama"):
    lm = tiny_model(arch)
    run(lm, [cfg], _samples(), EngineOptions(batch_size=2, progress=False))
    return lm


def _sparse_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


# ---------------------------------------------------------------------------------------------
# masks (pure)


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_unstructured_mask_prunes_exact_count_lowest_scores(scope, sparsity):
    s = torch.randn(13, 37).abs()
    m = unstructured_mask(s, sparsity, scope)
    if scope == "row":
        assert ((~m).sum(1) == n_pruned(37, sparsity)).all()
        # every pruned score is <= every kept score of its row
        for r in range(13):
            if (~m[r]).any():
                assert s[r][~m[r]].max() <= s[r][m[r]].min()
    else:
        assert int((~m).sum()) == n_pruned(13 * 37, sparsity)
        if (~m).any():
            assert s[~m].max() <= s[m].min()


def test_ties_are_broken_deterministically_and_exactly():
    s = torch.ones(4, 10)  # all tied: a threshold rule would prune everything or nothing
    m = unstructured_mask(s, 0.3, "row")
    assert ((~m).sum(1) == 3).all()
    assert (~m[:, :3]).all() and m[:, 3:].all()  # stable: lower index pruned first
    assert torch.equal(m, unstructured_mask(s, 0.3, "row"))
    g = nm_mask(torch.ones(2, 8), 2, 4)
    assert torch.equal(g[0], torch.tensor([False, False, True, True] * 2))


def test_layer_selection_equals_stable_sort_with_many_ties():
    from slimformer.prune.masks import lowest_k_mask

    s = torch.randint(0, 4, (9, 14)).float()  # heavy ties
    for k in (0, 1, 40, 63, 126):
        ref = torch.ones(126, dtype=torch.bool)
        ref[torch.sort(s.reshape(-1), stable=True).indices[:k]] = False
        assert torch.equal(lowest_k_mask(s, k).reshape(-1), ref)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (3, 4)])
def test_nm_mask_keeps_top_n_of_every_group(n, m):
    s = torch.randn(9, m * 7)
    mask = nm_mask(s, n, m)
    assert check_nm(mask, n, m)
    g, gm = s.reshape(9, 7, m), mask.reshape(9, 7, m)
    kept_min = torch.where(gm, g, torch.inf).amin(-1)
    pruned_max = torch.where(~gm, g, -torch.inf).amax(-1)
    assert (pruned_max <= kept_min).all()
    assert not check_nm(torch.ones_like(mask), n, m)


def test_wanda_scores_use_input_norms():
    w = torch.tensor([[1.0, -2.0, 3.0]])
    norm = torch.tensor([10.0, 1.0, 0.0])
    assert torch.equal(wanda_scores(w, norm), torch.tensor([[10.0, 2.0, 0.0]]))
    assert torch.equal(keep_mask(wanda_scores(w, norm), 1 / 3), torch.tensor([[True, True, False]]))
    assert torch.equal(keep_mask(magnitude_scores(w), 1 / 3), torch.tensor([[False, True, True]]))


# ---------------------------------------------------------------------------------------------
# stages through the engine


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.METHOD}-{c.pattern}-{c.sparsity}-{c.bits if hasattr(c, 'bits') else ''}")
def test_every_target_has_exact_sparsity_and_pattern(cfg):
    lm = _prune(cfg)
    mods = _sparse_modules(lm.model)
    assert len(mods) == 3 * 7  # every block linear of the tiny llama
    for name, m in mods.items():
        mask = m.mask()
        assert int((~mask).sum()) == n_pruned(mask.numel(), cfg.sparsity), name
        if cfg.nm is not None:
            assert check_nm(mask, *cfg.nm), name
        w = m.dense_weight()
        assert (w[~mask] == 0).all()
        # 1 bit of mask per weight + the kept values (codes): the fp32 dense bytes scaled
        bits = getattr(cfg, "bits", None) or 32
        dense = 4 * m.in_features * m.out_features
        assert m.nbytes() <= dense * ((1 - cfg.sparsity) * bits / 32 + 1 / 32 + 0.05)


def test_per_layer_sparsity_from_overrides():
    cfg = WandaConfig(sparsity=0.5, overrides={"re:.*down_proj": {"sparsity": 0.25},
                                               "re:.*q_proj": {"pattern": "2:4"}})
    mods = _sparse_modules(_prune(cfg).model)
    for name, m in mods.items():
        want = 0.25 if name.endswith("down_proj") else 0.5
        assert int((~m.mask()).sum()) == n_pruned(m.in_features * m.out_features, want), name
        if name.endswith("q_proj"):
            assert check_nm(m.mask(), 2, 4)


def test_low_sparsity_stays_dense_with_zeros():
    lm = _prune(MagnitudeConfig(sparsity=MIN_SPARSITY / 2))
    assert not _sparse_modules(lm.model)
    w = lm.model.model.layers[0].mlp.up_proj.weight
    assert isinstance(lm.model.model.layers[0].mlp.up_proj, nn.Linear)
    assert int((w == 0).sum()) >= n_pruned(w.numel(), MIN_SPARSITY / 2)


def test_gpt2_conv1d_layers_are_pruned_too():
    lm = _prune(SparseGPTConfig(sparsity=0.5, pattern="2:4"), arch="gpt2")
    mods = _sparse_modules(lm.model)
    assert mods and all(check_nm(m.mask(), 2, 4) for m in mods.values())


def test_nm_needs_divisible_columns():
    with pytest.raises(SlimformerError, match="not a multiple of M=7"):
        _prune(MagnitudeConfig(sparsity=1 - 3 / 7, pattern="3:7"))  # 96 % 7 != 0


# ---------------------------------------------------------------------------------------------
# SparseGPT quality: Hessian-weighted reconstruction error


def _correlated_problem(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    # correlated, uneven channels in random order (SparseGPT fixes the sparsity of each block of
    # columns, so channel norms sorted by column would be an adversarial layout no model has)
    gain = torch.linspace(0.2, 3.0, cols)[torch.randperm(cols, generator=g)]
    x = torch.randn(tokens, cols, generator=g) @ mix * gain
    w = torch.randn(rows, cols, generator=g)
    return w, 2 * x.t() @ x / tokens, x.norm(dim=0)


def _errors(w, H, norm, sparsity, nm):
    sgpt = sparsegpt_prune(w, H, sparsity, nm, block_size=32)
    mag = w * keep_mask(magnitude_scores(w), sparsity, nm, "layer")
    wan = w * keep_mask(wanda_scores(w, norm), sparsity, nm, "row")
    return (reconstruction_error(w, sgpt.weight, H), reconstruction_error(w, mag, H),
            reconstruction_error(w, wan, H))


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_error_not_above_magnitude_and_wanda_random(nm, seed):
    w, H, norm = _correlated_problem(seed=seed)
    e_sgpt, e_mag, e_wanda = _errors(w, H, norm, 0.5, nm)
    assert e_sgpt <= e_mag and e_sgpt <= e_wanda


def test_sparsegpt_joint_quant_beats_prune_then_round():
    w, H, _ = _correlated_problem(seed=2)
    spec = QuantSpec(bits=3, symmetric=True, granularity="group", group_size=16)
    joint = sparsegpt_prune(w, H, 0.5, None, block_size=32, spec=spec)
    pruned = sparsegpt_prune(w, H, 0.5, None, block_size=32)
    after = dequantize(quantize(pruned.weight, spec)) * pruned.mask  # prune, then RTN
    assert reconstruction_error(w, joint.weight, H) <= reconstruction_error(w, after, H)
    # the joint result really lies on its grid: the SparseLinear codes rebuild it exactly
    m = SparseLinear.from_mask(joint.weight, joint.mask, None, spec, joint.scale, joint.zero)
    assert torch.equal(m.dense_weight(), joint.weight)
    assert m.nbytes() < 0.2 * 4 * w.numel()


@pytest.mark.integration
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_error_not_above_others_on_real_smollm2_layer(smollm2, nm):
    from slimformer.data import calibration_samples
    from slimformer.observers import attach

    layer = smollm2.arch.get_blocks(smollm2.model)[5].mlp.gate_proj
    ids = calibration_samples(smollm2.tokenizer, n=4, seq_len=256)
    with attach({"p": layer}, {"p": ("hessian", "channel_norm")}) as obs, torch.no_grad():
        smollm2.model(input_ids=ids, use_cache=False)
        stats = obs.results()["p"]
    w = layer.weight.detach()
    e_sgpt, e_mag, e_wanda = _errors(w, stats["hessian"], stats["channel_norm"], 0.5, nm)
    assert e_sgpt <= e_mag and e_sgpt <= e_wanda


# ---------------------------------------------------------------------------------------------
# storage


@pytest.mark.parametrize("cols", [8, 13, 96])
def test_mask_packing_is_bit_exact(cols):
    m = torch.rand(5, cols) > 0.4
    bits = pack_mask(m)
    assert bits.dtype == torch.uint8 and bits.shape == (5, (cols + 7) // 8)
    assert torch.equal(unpack_mask(bits, cols), m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_matches_masked_dense(dtype):
    w = torch.randn(24, 40).to(dtype)
    mask = torch.rand(24, 40) > 0.5
    b = torch.randn(24).to(dtype)
    m = SparseLinear.from_mask(w, mask, b)
    assert m.values.dtype == dtype
    assert torch.equal(m.dense_weight(), w.masked_fill(~mask, 0))
    x = torch.randn(3, 40).to(dtype)
    assert torch.equal(m(x), nn.functional.linear(x, w.masked_fill(~mask, 0), b))
    assert m.nbytes() == 24 * 5 + int(mask.sum()) * w.element_size() + 24 * b.element_size()


@pytest.mark.parametrize("cfg", [SparseGPTConfig(sparsity=0.5),
                                 SparseGPTConfig(sparsity=0.5, pattern="2:4", bits=4, group_size=32,
                                                 symmetric=False)],
                         ids=["fp32", "int4-asym"])
def test_save_load_bit_identical_and_small(cfg, tmp_path):
    from safetensors import safe_open

    from slimformer.formats import load_compressed, save_compressed

    lm = _prune(cfg)
    ids = _samples(2, 16)
    with torch.no_grad():
        ref = lm.model(ids).logits
    save_compressed(lm, tmp_path / "m")
    back = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, ref)
    for name, m in _sparse_modules(back.model).items():
        assert torch.equal(m.mask(), _sparse_modules(lm.model)[name].mask())
    # bytes of the pruned layers in the saved file vs the same layers dense (fp32 + bias)
    doc = json.loads((tmp_path / "m" / "slimformer.json").read_text())
    pruned = {n: i for n, i in doc["modules"].items() if i["type"] == "SparseLinear"}
    assert len(pruned) == 21
    stored = dense = 0
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if any(k.startswith(n + ".") for n in pruned):
                t = f.get_tensor(k)
                stored += t.numel() * t.element_size()
    for info in pruned.values():
        dense += 4 * info["in_features"] * info["out_features"]
    limit = 0.65 if cfg.bits is None else 0.25
    assert stored <= limit * dense, stored / dense


# ---------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("cls,kw,field", [
    (MagnitudeConfig, {"sparsity": 1.0}, "sparsity"),
    (MagnitudeConfig, {"sparsity": -0.1}, "sparsity"),
    (WandaConfig, {"sparsity": "half"}, "sparsity"),
    (WandaConfig, {"pattern": "4:2"}, "pattern"),
    (WandaConfig, {"pattern": "2-4"}, "pattern"),
    (WandaConfig, {"pattern": "2:4", "sparsity": 0.3}, "sparsity"),
    (MagnitudeConfig, {"scope": "column"}, "scope"),
    (SparseGPTConfig, {"block_size": 0}, "block_size"),
    (SparseGPTConfig, {"block_size": 130, "pattern": "2:4"}, "block_size"),
    (SparseGPTConfig, {"dampening": 0.0}, "dampening"),
    (SparseGPTConfig, {"bits": 9}, "bits"),
    (SparseGPTConfig, {"bits": 4, "group_size": 0}, "group_size"),
    (SparseGPTConfig, {"overrides": {"re:.*": {"sparsity": 2}}}, "sparsity"),
])
def test_invalid_config_names_the_field(cls, kw, field):
    with pytest.raises(ConfigError, match=rf"{cls.METHOD}\.{field}"):
        cls(**kw)


@pytest.mark.parametrize("name", ["magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2of4",
                                  "wanda-2of4", "sparsegpt-2of4"])
def test_named_recipes_round_trip(name):
    r = load_recipe(name)
    assert Recipe.from_yaml(r.to_yaml()) == r
    (stage,) = r.stages
    assert stage.METHOD == name.split("-")[0] and stage.sparsity == 0.5
    assert (stage.nm == (2, 4)) == name.endswith("2of4")
