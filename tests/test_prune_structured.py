"""Structured pruning (heads / FFN channels / blocks) that really shrinks, reloads, and recovers.

Invariants on tiny random models; one integration test on the real SmolLM2 (marked).
"""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from slimformer.engine import EngineOptions, run
from slimformer.errors import ConfigError
from slimformer.models import get_module, load, tiny_model
from slimformer.prune import importance as imp
from slimformer.prune.lora import LoRALinear, RecoverConfig, add_lora, merge_lora, recover, training_windows
from slimformer.prune.structured import StructuredPruneConfig, block_widths, shrink_linear
from slimformer.recipe import Recipe, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = EngineOptions(progress=False)


def _ids(n: int = 3, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, x):
    return model(input_ids=x).logits


def _prune(lm, **kw):
    cfg = StructuredPruneConfig(**kw)
    run(lm, [cfg], _ids(4, 32, seed=2), OPTS)
    return lm


# ---------------------------------------------------------------------------------------------
# importance math


def test_group_scores_sum_coupled_slices():
    rows = torch.arange(12.0).reshape(6, 2)  # 6 rows -> 3 structures of 2 rows
    cols = torch.ones(4, 6)  # 6 columns -> 3 structures of 2 columns
    g = imp.group_scores([(rows, 0), (cols, 1)], unit=2)
    expect = torch.tensor([0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10 + 11]) + 8.0
    assert torch.equal(g, expect)
    with pytest.raises(ValueError):
        imp.group_scores([(rows, 0), (torch.ones(4, 4), 1)], unit=2)


def test_activation_scores_are_output_energy_per_channel():
    x = torch.randn(50, 5)
    w = torch.randn(3, 5)
    s = imp.activation_scores(w, x.norm(dim=0))
    per_channel = torch.stack([(x[:, j:j + 1] * w[:, j][None]).pow(2).sum() for j in range(5)])
    torch.testing.assert_close(s.sum(0), per_channel, rtol=1e-4, atol=1e-5)


def test_taylor_scores_predict_loss_change_to_first_order():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(16, 3)
    loss = lambda W: (x @ W.t()).pow(2).mean()  # noqa: E731
    loss(w).backward()
    s = imp.taylor_scores(w, w.grad)
    i, j = 1, 2
    w2 = w.detach().clone()
    w2[i, j] = 0
    # first order: |L(w with w_ij=0) - L(w)| ~ |w_ij g_ij|; a small weight makes it tight
    assert torch.equal(s, (w.detach() * w.grad).abs())
    small = w.detach().clone()
    small[i, j] = 1e-3
    g = torch.autograd.grad(loss(small.requires_grad_()), small)[0]
    z = small.detach().clone()
    z[i, j] = 0
    torch.testing.assert_close((loss(small.detach()) - loss(z)).detach(), (small[i, j] * g[i, j]).detach(),
                               rtol=1e-2, atol=1e-9)


def test_keep_heads_in_groups_keeps_the_same_count_per_kv_group():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0])  # 2 KV groups of 3 query heads
    keep = imp.keep_heads_in_groups(scores, num_kv_heads=2, keep_per_group=2)
    assert keep.tolist() == [0, 2, 4, 5]


def test_global_removal_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(6, generator=g) * (l + 1) for l in range(3)]
    costs = [imp.removal_steps(s, 2) for s in scores]
    for total in range(0, 7):
        counts = imp.global_removal(costs, total, [2, 2, 2])
        assert sum(counts) == total
        best = min(sum(float(costs[l][:c].sum()) for l, c in enumerate(cs))
                   for cs in itertools.product(range(3), repeat=3) if sum(cs) == total)
        got = sum(float(costs[l][:c].sum()) for l, c in enumerate(counts))
        assert got == pytest.approx(best)


# ---------------------------------------------------------------------------------------------
# physical shrinking


def test_shrink_linear_keeps_exactly_the_selected_rows_and_columns():
    lin = torch.nn.Linear(5, 4)
    x = torch.randn(2, 5)
    rows = torch.tensor([0, 3])
    r = shrink_linear(lin, rows, 0)
    assert (r.in_features, r.out_features) == (5, 2)
    torch.testing.assert_close(r(x), lin(x)[:, rows])
    cols = torch.tensor([1, 2, 4])
    c = shrink_linear(lin, cols, 1)
    assert (c.in_features, c.out_features) == (3, 4)
    x0 = torch.zeros_like(x)
    x0[:, cols] = x[:, cols]  # the dropped inputs carry nothing
    torch.testing.assert_close(c(x[:, cols]), lin(x0))


def _zero_structures(lm, heads: list[int], channels: list[int]):
    """Zero query heads (q rows + o columns) and FFN channels (gate/up rows + down column) in
    every block: structures that contribute nothing."""
    a, m = lm.arch.attention, lm.arch.mlp
    hd = lm.arch.head_layout(lm.model.config)["head_dim"]
    with torch.no_grad():
        for b in lm.arch.get_blocks(lm.model):
            for h in heads:
                get_module(b, a.q).weight[h * hd:(h + 1) * hd] = 0
                get_module(b, a.o).weight[:, h * hd:(h + 1) * hd] = 0
            for j in channels:
                get_module(b, m.gate).weight[j] = 0
                get_module(b, m.up).weight[j] = 0
                get_module(b, m.down).weight[:, j] = 0


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "activation"])
def test_removing_zero_importance_heads_and_channels_leaves_outputs_unchanged(importance):
    lm = tiny_model("llama")  # 6 query heads in 2 KV groups of 3, 160 FFN channels
    _zero_structures(lm, heads=[1, 5], channels=list(range(0, 160, 5)))  # one head per KV group
    x = _ids()
    ref = _logits(lm.model, x)
    _prune(lm, importance=importance, heads=4, intermediate=128)
    for w in block_widths(lm.model, lm.arch):
        assert w == {"heads": 4, "intermediate": 128}
    torch.testing.assert_close(_logits(lm.model, x), ref, rtol=1e-4, atol=1e-5)


def test_removing_live_structures_does_change_outputs():
    lm = tiny_model("llama")
    x = _ids()
    ref = _logits(lm.model, x)
    _prune(lm, importance="magnitude", heads=4, intermediate=128)
    assert not torch.allclose(_logits(lm.model, x), ref, atol=1e-3)


def test_coupled_shapes_stay_consistent_under_gqa_with_nonuniform_widths():
    lm = tiny_model("llama")
    lay = lm.arch.head_layout(lm.model.config)
    hd, kv = lay["head_dim"], lay["num_kv_heads"]
    _prune(lm, importance="taylor", heads=4, intermediate=96, allocation="global", multiple_of=8)
    a, m = lm.arch.attention, lm.arch.mlp
    widths = block_widths(lm.model, lm.arch)
    assert sum(w["heads"] for w in widths) == 4 * len(widths)
    assert sum(w["intermediate"] for w in widths) == 96 * len(widths)
    for b, w in zip(lm.arch.get_blocks(lm.model), widths):
        q, k, v, o = (get_module(b, r) for r in (a.q, a.k, a.v, a.o))
        assert q.out_features == o.in_features == w["heads"] * hd
        assert k.out_features == v.out_features == kv * hd  # K/V untouched: whole KV groups stay
        assert w["heads"] % kv == 0 and b.self_attn.num_key_value_groups == w["heads"] // kv
        g, u, d = (get_module(b, r) for r in (m.gate, m.up, m.down))
        assert g.out_features == u.out_features == d.in_features == w["intermediate"]
        assert w["intermediate"] % 8 == 0
    # the KV cache path (incremental decode) agrees with a full forward
    x = _ids(1, 12)
    out = lm.model.generate(x, max_new_tokens=5, do_sample=False)
    full = _logits(lm.model, out[:, :-1])[:, x.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, out[:, x.shape[1]:])


def test_parameter_count_drops_by_the_expected_amount():
    lm = tiny_model("llama")
    c = lm.model.config
    hidden, hd, inter, layers = c.hidden_size, c.head_dim, c.intermediate_size, c.num_hidden_layers
    before = sum(p.numel() for p in lm.model.parameters())
    per_block = sum(p.numel() for p in lm.arch.get_blocks(lm.model)[0].parameters())
    _prune(lm, importance="magnitude", heads=4, intermediate=100, layers=2)
    after = sum(p.numel() for p in lm.model.parameters())
    removed_per_kept_block = 2 * (6 - 4) * hd * hidden + 3 * (inter - 100) * hidden
    assert before - after == per_block * (layers - 2) + 2 * removed_per_kept_block
    assert lm.model.config.num_hidden_layers == 2
    assert (c.num_attention_heads, c.intermediate_size) == (4, 100)


def test_depth_pruning_renumbers_blocks_and_keeps_the_best():
    lm = tiny_model("llama")
    # make block 1 an identity (zero o and down): no influence, zero Taylor/weight score
    b1 = lm.arch.get_blocks(lm.model)[1]
    with torch.no_grad():
        b1.self_attn.o_proj.weight.zero_()
        b1.mlp.down_proj.weight.zero_()
    x = _ids()
    ref = _logits(lm.model, x)
    _prune(lm, importance="activation", layers=2)
    blocks = lm.arch.get_blocks(lm.model)
    assert len(blocks) == 2 and [b.self_attn.layer_idx for b in blocks] == [0, 1]
    torch.testing.assert_close(_logits(lm.model, x), ref, rtol=1e-4, atol=1e-5)
    out = lm.model.generate(x[:1, :8], max_new_tokens=3, do_sample=False)  # KV slots renumbered
    assert out.shape == (1, 11)


# ---------------------------------------------------------------------------------------------
# save / load


def test_nonuniform_widths_round_trip_through_slimformer_load(tmp_path):
    from slimformer.formats import save_compressed

    lm = tiny_model("llama")
    _prune(lm, importance="taylor", heads=4, intermediate=96, layers=2, allocation="global", multiple_of=8)
    widths = block_widths(lm.model, lm.arch)
    assert len({w["heads"] for w in widths}) > 1 or len({w["intermediate"] for w in widths}) > 1
    x = _ids()
    ref = _logits(lm.model, x)
    save_compressed(lm, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "slimformer.json").read_text())
    assert doc["shapes"]["linears"]  # the per-block shapes the config cannot say
    back = load(tmp_path / "m")
    assert block_widths(back.model, back.arch) == widths
    assert torch.equal(_logits(back.model, x), ref)


def test_uniform_widths_give_a_plain_transformers_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from slimformer.formats import save_compressed
    from slimformer.kernels.attention import install as install_attention

    lm = tiny_model("llama")
    _prune(lm, importance="taylor", heads=2, intermediate=64, layers=2)
    x = _ids()
    ref = _logits(lm.model, x)
    save_compressed(lm, tmp_path / "m")
    assert "shapes" not in json.loads((tmp_path / "m" / "slimformer.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), local_files_only=True).eval()
    torch.testing.assert_close(_logits(hf, x), ref, rtol=1e-5, atol=1e-5)  # SDPA vs our kernel
    install_attention(hf)  # the same attention kernel: the same weights give the same logits
    assert torch.equal(_logits(hf, x), ref)
    assert torch.equal(_logits(load(tmp_path / "m").model, x), ref)


def test_opt_ffn_and_depth_pruning_round_trip(tmp_path):
    from slimformer.formats import save_compressed

    lm = tiny_model("opt")
    _prune(lm, importance="activation", intermediate=96, layers=1, allocation="global", multiple_of=16)
    x = _ids()
    ref = _logits(lm.model, x)
    save_compressed(lm, tmp_path / "m")
    assert torch.equal(_logits(load(tmp_path / "m").model, x), ref)


def test_prune_then_quantize_round_trips(tmp_path):
    from slimformer.formats import QuantLinear, save_compressed
    from slimformer.quant import RTNConfig

    lm = tiny_model("llama")
    run(lm, [StructuredPruneConfig(importance="magnitude", heads=4, intermediate=96, allocation="global",
                                   multiple_of=16), RTNConfig(bits=4, group_size=16)], _ids(4, 32), OPTS)
    assert any(isinstance(m, QuantLinear) for m in lm.model.modules())
    x = _ids()
    ref = _logits(lm.model, x)
    save_compressed(lm, tmp_path / "m")
    assert torch.equal(_logits(load(tmp_path / "m").model, x), ref)


# ---------------------------------------------------------------------------------------------
# configs and recipes


@pytest.mark.parametrize("kw,field", [
    ({"importance": "random", "heads": 2}, "importance"),
    ({"allocation": "layerwise", "heads": 2}, "allocation"),
    ({}, "heads"),
    ({"heads": 0}, "heads"),
    ({"intermediate": 8, "multiple_of": 0}, "multiple_of"),
    ({"intermediate": 8, "targets": ["re:.*"]}, "targets"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"prune-structured\.{field}"):
        StructuredPruneConfig(**kw)


def test_targets_the_model_cannot_take_fail_before_pruning():
    lm = tiny_model("llama")  # 2 KV heads: kept query heads must be a multiple of 2
    with pytest.raises(ConfigError, match=r"heads: invalid value 3; allowed: multiples of the 2 KV heads"):
        _prune(lm, importance="magnitude", heads=3)
    with pytest.raises(ConfigError, match=r"intermediate: invalid value 999"):
        _prune(lm, importance="magnitude", intermediate=999)
    with pytest.raises(ConfigError, match=r"heads: head pruning needs"):
        _prune(tiny_model("opt"), importance="magnitude", heads=2)
    assert block_widths(lm.model, lm.arch)[0] == {"heads": 6, "intermediate": 160}


@pytest.mark.parametrize("name", ["prune-20pct", "prune-heads-ffn-20pct-nonuniform", "prune-20pct-lora"])
def test_named_recipes_round_trip(name):
    r = load_recipe(name)
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert isinstance(r.stages[0], StructuredPruneConfig)


# ---------------------------------------------------------------------------------------------
# LoRA recovery


def test_lora_merge_equals_the_unmerged_forward():
    lm = tiny_model("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    params = add_lora(lm.model, names, rank=4, alpha=8.0, seed=0)
    x = _ids()
    base = _logits(lm.model, x)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)  # B starts at zero: move it so the update is real
    adapted = _logits(lm.model, x)
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert all(isinstance(get_module(lm.model, n), LoRALinear) for n in names)
    assert merge_lora(lm.model) == 2
    assert not any(isinstance(m, LoRALinear) for m in lm.model.modules())
    torch.testing.assert_close(_logits(lm.model, x), adapted, rtol=1e-4, atol=1e-5)


def test_lora_starts_at_the_pruned_model_and_trains_only_adapters():
    lm = tiny_model("llama")
    x = _ids()
    ref = _logits(lm.model, x)
    add_lora(lm.model, ["model.layers.0.mlp.up_proj"], rank=2, alpha=2.0)
    torch.testing.assert_close(_logits(lm.model, x), ref)  # B = 0
    trainable = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["model.layers.0.mlp.up_proj.lora_A", "model.layers.0.mlp.up_proj.lora_B"]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_recovery_lowers_the_training_loss_and_leaves_a_plain_model(mode):
    lm = tiny_model("llama")
    _prune(lm, importance="magnitude", heads=4, intermediate=96)
    shapes = {n: tuple(p.shape) for n, p in lm.model.named_parameters()}
    text = torch.arange(256).repeat(8)[None].reshape(-1, 64)  # a learnable repeating byte pattern
    windows = training_windows(text, 32)
    cfg = RecoverConfig(mode=mode, rank=4, steps=25, lr=3e-3, batch_size=4, seq_len=32)
    tlog = recover(lm, windows, cfg)
    assert sum(tlog.loss[-5:]) < sum(tlog.loss[:5])
    assert {n: tuple(p.shape) for n, p in lm.model.named_parameters()} == shapes
    assert not any(isinstance(m, LoRALinear) for m in lm.model.modules())


def test_prune_and_recover_as_one_recipe():
    lm = tiny_model("llama")
    rec = Recipe(stages=(StructuredPruneConfig(importance="taylor", heads=4, intermediate=96),
                         RecoverConfig(steps=3, batch_size=2, seq_len=16)))
    run(lm, rec.stages, _ids(4, 32), OPTS)
    assert lm.meta["recovery"]["steps"] == 3 and lm.meta["structure"]["widths"][0]["heads"] == 4
    assert torch.isfinite(_logits(lm.model, _ids())).all()


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.integration
def test_smollm2_prune_20pct_removes_a_fifth_and_stays_a_language_model(smollm2):
    from slimformer.data import calibration_samples
    from slimformer.eval import parameter_count, perplexity, tokenize_wikitext2

    lm = copy.deepcopy(smollm2)
    cfg = load_recipe("prune-20pct").stages[0]
    calib = calibration_samples(lm.tokenizer, n=2, seq_len=128)
    before = parameter_count(lm.model)
    run(lm, [cfg], calib, OPTS)
    assert parameter_count(lm.model) <= 0.8 * before
    ids = tokenize_wikitext2(lm.tokenizer)[:1024]
    dense = perplexity(smollm2.model, ids, window=512)["ppl"]
    pruned = perplexity(lm.model, ids, window=512)["ppl"]
    # pruned without recovery is worse than dense but far from a random model (vocab 49152)
    assert dense < pruned < 49152 / 10


def test_compress_with_a_structured_recipe_saves_and_reloads(tmp_path):
    from slimformer.compress import compress

    lm = tiny_model("llama")
    recipe = """
version: 1
stages:
- method: prune-structured
  importance: activation
  heads: 4
  intermediate: 80
  allocation: global
  multiple_of: 16
- method: recover
  steps: 2
  batch_size: 2
  seq_len: 32
"""
    out = compress(lm, recipe, out_dir=tmp_path / "p", calibration={"samples": 4, "seq_len": 64}, progress=False)
    x = _ids()
    back = load(tmp_path / "p")
    assert block_widths(back.model, back.arch) == block_widths(out.model, out.arch)
    assert torch.equal(_logits(back.model, x), _logits(out.model, x))
