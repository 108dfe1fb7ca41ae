"""KV-cache pruning (slimformer.prune.kv): policies as pure functions, eviction over the static
cache checked against a dense model with the equivalent attention mask."""
import pytest
import torch

from slimformer.decoding.cache import StaticKVCache, step_layout
from slimformer.decoding.runner import CausalRunner
from slimformer.errors import ConfigError
from slimformer.models.tiny import tiny_model
from slimformer.prune.kv import (KVPruner, KVPruningConfig, attention_mass, heavy_hitter_keep,
                                 kv_pruned_logits, kv_pruned_perplexity, window_keep)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _ids(n, seed=0):
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed))


# ---- config ----------------------------------------------------------------------------------
def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="kv_pruning.policy"):
        KVPruningConfig(policy="lru")
    with pytest.raises(ConfigError, match="kv_pruning.budget"):
        KVPruningConfig(budget=0.0)
    with pytest.raises(ConfigError, match="kv_pruning.chunk"):
        KVPruningConfig(chunk=0)
    with pytest.raises(ConfigError, match="kv_pruning.budget"):
        KVPruningConfig(budget=0.01, chunk=16).budget_tokens(100)  # 1 slot < sinks + chunk + 1
    cfg = KVPruningConfig(policy="window", budget=0.25, sinks=2, chunk=8)
    assert KVPruningConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.budget_tokens(2048) == 512 and KVPruningConfig(budget=1.0).budget_tokens(2048) == 2048


# ---- policies --------------------------------------------------------------------------------
@pytest.mark.parametrize("length,keep,sinks", [(100, 30, 4), (10, 10, 4), (50, 5, 4), (7, 3, 0)])
def test_window_keeps_budget_sinks_and_latest(length, keep, sinks):
    idx = window_keep(length, keep, sinks)
    assert idx.numel() == keep and idx.unique().numel() == keep
    assert set(range(min(sinks, keep - 1))) <= set(idx.tolist())
    assert idx.max().item() == length - 1
    assert torch.equal(idx, idx.sort().values)


def test_heavy_hitter_keeps_highest_scores_sinks_and_recent():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 40, generator=g)  # [B, heads, length]
    scores[0, 1, 10] = 100.0  # an obvious heavy hitter
    scores[..., :4] = -1.0  # sinks score lowest but stay
    scores[..., -3:] = -1.0  # so do the recent tokens
    idx = heavy_hitter_keep(scores, keep=12, sinks=4, recent=3)
    assert idx.shape == (2, 3, 12)
    for b in range(2):
        for h in range(3):
            kept = set(idx[b, h].tolist())
            assert len(kept) == 12
            assert set(range(4)) <= kept and {37, 38, 39} <= kept
            middle = sorted(range(4, 37), key=lambda j: -scores[b, h, j].item())[:5]
            assert kept - set(range(4)) - {37, 38, 39} == set(middle)
    assert 10 in idx[0, 1].tolist()


def test_heavy_hitter_always_keeps_latest_token():
    scores = torch.zeros(1, 1, 20)
    scores[..., 5:19] = 1.0  # everything but the newest looks heavier
    idx = heavy_hitter_keep(scores, keep=6, sinks=4, recent=0)
    assert 19 in idx.tolist()[0][0] and idx.shape[-1] == 6


def test_attention_mass_sums_to_queries():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 5, 16, generator=g)  # 6 query heads, 2 KV heads (groups of 3)
    K = torch.randn(1, 2, 20, 16, generator=g)
    cache = StaticKVCache.allocate(1, 1, 2, 16, 32, torch.float32)
    cache.length[:] = 15
    layout = step_layout(cache, 5)
    m = attention_mass(q, K, layout, 0.25)
    assert m.shape == (1, 2, 20)
    torch.testing.assert_close(m.sum(-1), torch.full((1, 2), 15.0))  # 3 heads x 5 queries
    assert m[..., 16:].sum() > 0 and (m[..., 19] <= m[..., 18] + 5).all()


# ---- eviction over the cache -----------------------------------------------------------------
@pytest.mark.parametrize("policy", ["window", "h2o"])
def test_full_budget_equals_dense_logits(llama, policy):
    ids = _ids(70)
    with torch.no_grad():
        ref = llama.model(input_ids=ids[None]).logits[0]
    out = kv_pruned_logits(CausalRunner(llama), ids, KVPruningConfig(policy=policy, budget=1.0, chunk=8))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _reference_mask(T, chunk, keep_sets):
    allow = torch.zeros(T, T, dtype=torch.bool)
    for s, kept in keep_sets:
        for t in range(s, min(s + chunk, T)):
            allow[t, kept] = True
            allow[t, s:t + 1] = True
    return allow


def test_window_eviction_equals_masked_dense_model(llama):
    """Evicted keys are gone, kept ones keep their positions: the same as a dense forward whose
    mask hides exactly the evicted keys from each chunk's queries."""
    T, c = 61, 5
    cfg = KVPruningConfig(policy="window", budget=0.5, chunk=c, sinks=2)
    M = cfg.budget_tokens(T)
    sets = []
    for s in range(0, T, c):
        n = min(c, T - s)  # the last chunk is shorter: it evicts fewer
        kept = list(range(s)) if s + n <= M else list(range(cfg.sinks)) + list(range(s - (M - n - cfg.sinks), s))
        sets.append((s, kept))
    ids = _ids(T, 1)
    mask = _reference_mask(T, c, sets)[None, None]
    with torch.no_grad():
        ref = llama.model(input_ids=ids[None], attention_mask=mask).logits[0]
    out = kv_pruned_logits(CausalRunner(llama), ids, cfg)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_h2o_eviction_keeps_budget_and_matches_its_own_choices(llama, normalize):
    """Run H2O, recording which slots each layer/head kept; the cache must then hold exactly
    those tokens' keys (checked against a fresh dense pass over the same prefix)."""
    T, c = 40, 4
    cfg = KVPruningConfig(policy="h2o", budget=0.5, chunk=c, sinks=2, normalize=normalize)
    runner = CausalRunner(llama)
    M = cfg.budget_tokens(T)
    cache = runner.new_cache(1, M)
    pruner = KVPruner(cfg, cache, M)
    ids = _ids(T, 2)
    alive = [[list(range(0)) for _ in range(runner.num_kv_heads)] for _ in range(runner.exit_layer)]
    for s in range(0, T, c):
        before = int(cache.length[0])
        pruner.make_room(c)
        after = int(cache.length[0])
        assert after + c <= M and (after == before or after == M - c)
        runner.forward(ids[s:s + c][None], cache)
        assert int(cache.position_offset[0]) + int(cache.length[0]) == s + c  # positions continue
    assert pruner.evicted == T - int(cache.length[0]) > 0
    n = int(cache.length[0])
    for layer in range(runner.exit_layer):  # the slot -> position book-keeping normalize uses
        assert (pruner.pos[layer][0, :, n - c:n] == torch.arange(T - c, T)).all()
    # layer 0's keys depend only on token and position, so every kept slot must hold exactly
    # the key one token had in a dense run: slots are never mixed up, positions stay true
    dense = runner.new_cache(1, T)
    with torch.no_grad():
        runner.forward(ids[None], dense)
    n = int(cache.length[0])
    K, Kd = cache.keys[0][0, :, :n], dense.keys[0][0]  # [Hkv, n, D], [Hkv, T, D]
    d = torch.cdist(K, Kd, compute_mode="donot_use_mm_for_euclid_dist")  # [Hkv, n, T]
    src = d.argmin(-1)  # which token each kept slot holds
    assert d.min(-1).values.max() < 1e-5
    assert (src[:, :2] == torch.tensor([0, 1])).all()  # sinks
    assert (src[:, -c:] == torch.arange(T - c, T)).all()  # the latest chunk
    assert (src.diff(dim=-1) > 0).all()  # kept in order, no duplicates


def test_heavy_fraction_split():
    """heavy_fraction fixes the heavy-hitter slots as a share of the context (capped at half the
    non-sink slots); the recent window takes the rest, so its share grows with the budget."""
    cfg = KVPruningConfig(heavy_fraction=0.1, sinks=4)
    assert cfg.heavy_recent(960, 2048) == (205, 751)  # 50% budget, chunk 64
    assert cfg.heavy_recent(1472, 2048) == (205, 1263)  # 75%: same heavy, longer window
    assert cfg.heavy_recent(300, 2048) == (148, 148)  # small budget: capped at an equal split
    assert KVPruningConfig(sinks=4).heavy_recent(960, 2048) == (478, 478)  # recent_fraction 0.5
    assert KVPruningConfig(sinks=4, recent_fraction=0.75).heavy_recent(960, 2048) == (239, 717)
    with pytest.raises(Exception, match="heavy_fraction"):
        cfg.heavy_recent(960, None)
    with pytest.raises(ConfigError, match="kv_pruning.heavy_fraction"):
        KVPruningConfig(heavy_fraction=1.5)
    assert KVPruningConfig.from_dict(cfg.to_dict()) == cfg


def test_heavy_fraction_eviction_keeps_sinks_heavy_and_recent(llama):
    """With age-biased scores (older = heavier) the kept positions must be exactly the sinks,
    the ``heavy`` oldest non-sink tokens and the ``recent`` latest, per layer and head."""
    T, M, c, sinks = 100, 40, 4, 2
    cfg = KVPruningConfig(policy="h2o", budget=M / T, chunk=c, sinks=sinks, heavy_fraction=0.05)
    runner = CausalRunner(llama)
    cache = runner.new_cache(1, M)
    pruner = KVPruner(cfg, cache, M, context=T)
    with torch.no_grad():
        runner.forward(_ids(M, 3)[None], cache)
    for s in pruner.scores:
        s[:] = torch.arange(s.shape[-1], 0, -1, dtype=s.dtype)  # older slot, larger score
    pruner.make_room(c)
    keep = M - c
    heavy, recent = cfg.heavy_recent(keep, T)
    assert (heavy, recent) == (5, 29)  # recent_fraction 0.5 would give 17 and 17
    want = list(range(sinks)) + list(range(sinks, sinks + heavy)) + list(range(M - recent, M))
    assert int(cache.length[0]) == keep
    for p in pruner.pos:
        assert (p[0, :, :keep] == torch.tensor(want)).all()


def test_heavy_fraction_zero_heavy_is_the_window_policy(llama):
    """No heavy slots (heavy_fraction rounds to 0) leaves sinks + recent = StreamingLLM."""
    ids = _ids(61, 4)
    runner = CausalRunner(llama)
    ref = kv_pruned_logits(runner, ids, KVPruningConfig(policy="window", budget=0.5, chunk=5, sinks=2))
    out = kv_pruned_logits(runner, ids, KVPruningConfig(policy="h2o", budget=0.5, chunk=5, sinks=2,
                                                         heavy_fraction=1e-4))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    other = kv_pruned_logits(runner, ids, KVPruningConfig(policy="h2o", budget=0.5, chunk=5, sinks=2))
    assert not torch.allclose(other, ref, rtol=1e-5, atol=1e-5)  # the equal split differs


def test_observer_and_offset_are_backward_compatible(llama):
    """A cache without eviction fields behaves as before; the observer sees every layer."""
    runner = CausalRunner(llama)
    ids = _ids(12)[None]
    a, b = runner.new_cache(1, 16), runner.new_cache(1, 16)
    seen = []
    b.attn_observer = lambda layer, q, K, layout, scale: seen.append((layer, q.shape[2], K.shape[2]))
    torch.testing.assert_close(runner.forward(ids, a), runner.forward(ids, b))
    assert [s[0] for s in seen] == list(range(runner.exit_layer))
    assert all(s[1:] == (12, 12) for s in seen)


def test_perplexity_full_budget_equals_dense_protocol(llama):
    from slimformer.eval.ppl import perplexity

    ids = _ids(130)
    dense = perplexity(llama.model, ids, window=64)
    full = kv_pruned_perplexity(llama, ids, KVPruningConfig(budget=1.0, chunk=16), window=64)
    assert full["windows"] == dense["windows"] == 2
    assert full["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)
    low = kv_pruned_perplexity(llama, ids, KVPruningConfig(budget=0.5, chunk=8), window=64)
    assert low["budget_tokens"] == 32 and low["ppl"] != pytest.approx(dense["ppl"], rel=1e-6)


def test_rejects_padded_rows(llama):
    runner = CausalRunner(llama)
    cache = runner.new_cache(2, 32)
    cache.start = torch.tensor([0, 3])
    with pytest.raises(Exception, match="unpadded"):
        KVPruner(KVPruningConfig(), cache, 16)


# ---- real model ------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_full_budget_and_window_eviction_match_dense(smollm2):
    from slimformer.eval.ppl import tokenize_wikitext2

    T, c = 256, 32
    ids = tokenize_wikitext2(smollm2.tokenizer)[:T]
    runner = CausalRunner(smollm2)
    with torch.no_grad():
        ref = smollm2.model(input_ids=ids[None]).logits[0].float()
    full = kv_pruned_logits(runner, ids, KVPruningConfig(policy="h2o", budget=1.0, chunk=c))
    torch.testing.assert_close(full, ref, rtol=1e-3, atol=1e-3)
    cfg = KVPruningConfig(policy="window", budget=0.5, chunk=c)
    M = cfg.budget_tokens(T)
    sets = [(s, list(range(s)) if s + c <= M else
             list(range(cfg.sinks)) + list(range(s - (M - c - cfg.sinks), s))) for s in range(0, T, c)]
    mask = _reference_mask(T, c, sets)[None, None]
    with torch.no_grad():
        masked = smollm2.model(input_ids=ids[None], attention_mask=mask).logits[0].float()
    torch.testing.assert_close(kv_pruned_logits(runner, ids, cfg), masked, rtol=1e-3, atol=1e-3)
