"""Token pruning / merging (slimformer.prune.tokens): invariants on tiny random encoders, one
check on the real MiniLM."""
import dataclasses
import math

import pytest
import torch

from slimformer.errors import ConfigError
from slimformer.eval.encoders import embed
from slimformer.models.tiny import tiny_model
from slimformer.prune.tokens import (TokenPrunedEncoder, TokenPruningConfig, additive_mask,
                                     apply_token_pruning, compact, evit_keep, fuse_tokens,
                                     remove_token_pruning, tome_merge)

pytestmark = pytest.mark.usefixtures("one_thread")

SENTS = ["hello world, this is a test", "short", "a much longer sentence with many tokens in it",
         "mid length text here"]


def _batch(lm):
    enc = lm.tokenizer(SENTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ---- config ----------------------------------------------------------------------------------
def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="token_pruning.method"):
        TokenPruningConfig(method="drop")
    with pytest.raises(ConfigError, match="keep_rate"):
        TokenPruningConfig(keep_rate=0.0)
    with pytest.raises(ConfigError, match="keep_rate"):
        TokenPruningConfig(keep_rate=1.5)
    with pytest.raises(ConfigError, match="token_pruning.r"):
        TokenPruningConfig(method="tome", r=-1)
    with pytest.raises(ConfigError, match="token_pruning.r"):
        TokenPruningConfig(method="evit", r=2)  # r belongs to tome
    with pytest.raises(ConfigError, match="score"):
        TokenPruningConfig(score="max")
    with pytest.raises(ConfigError, match="token_pruning.dropped"):
        TokenPruningConfig(dropped="forget")
    with pytest.raises(ConfigError, match="merge_rate"):
        TokenPruningConfig(method="tome", merge_rate=0.6)  # bipartite: at most half merge
    with pytest.raises(ConfigError, match="merge_rate"):
        TokenPruningConfig(method="tome", r=2, merge_rate=0.1)
    with pytest.raises(ConfigError, match="merge_rate"):
        TokenPruningConfig(merge_rate=0.1)  # evit
    assert TokenPruningConfig(method="tome", merge_rate=0.25).schedule(3) == [0.25, 0.25, None]
    cfg = TokenPruningConfig(keep_rate=[0.9, 1.0])
    with pytest.raises(ConfigError, match="3 entries"):
        cfg.schedule(3)
    with pytest.raises(ConfigError, match="last block"):
        TokenPruningConfig(keep_rate=[0.9, 0.9]).schedule(2)
    assert TokenPruningConfig(keep_rate=0.7).schedule(3) == [0.7, 0.7, None]
    assert TokenPruningConfig(method="tome", r=[2, 0, 0]).schedule(3) == [2, None, None]


def test_config_round_trips():
    for cfg in (TokenPruningConfig(keep_rate=[0.5, 0.7, 1.0], score="mean", dropped="drop"),
                TokenPruningConfig(method="tome", r=3, proportional_attention=False),
                TokenPruningConfig(method="tome", merge_rate=[0.2, 0.1, 0.0])):
        d = cfg.to_dict()
        assert TokenPruningConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        TokenPruningConfig.from_dict({"method": "tome", "rate": 2})


# ---- pure math -------------------------------------------------------------------------------
def test_evit_keep_counts_top_scores_and_protects_cls():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 10, generator=g)
    size = torch.ones(3, 10)
    size[1, 6:] = 0  # row 1: 6 real tokens
    scores[:, 0] = -5.0  # [CLS] has the lowest score but is protected
    keep = evit_keep(scores, size, 0.5)
    n = (size > 0).sum(1)
    expect = 1 + torch.ceil(0.5 * (n - 1).float()).long()
    assert torch.equal(keep.sum(1), expect)
    assert keep[:, 0].all()
    for b in range(3):
        kept = scores[b, 1:][keep[b, 1:]]
        dropped = scores[b, 1:][(size[b, 1:] > 0) & ~keep[b, 1:]]
        assert kept.min() >= dropped.max()


def test_padding_never_kept_over_real_tokens():
    scores = torch.tensor([[0.1, 0.2, 0.3, 9.0, 9.0], [0.5, 0.4, 9.0, 9.0, 9.0]])
    size = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 0, 0, 0]])  # pads score highest
    for rate in (0.01, 0.5, 1.0):
        keep = evit_keep(scores, size, rate)
        assert not (keep & (size == 0)).any()
    assert evit_keep(scores, size, 1.0).sum().item() == 5  # every real token, nothing else


def test_tome_merge_preserves_size_and_weighted_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 8, generator=g, dtype=torch.float64)
    metric = torch.randn(2, 11, 5, generator=g, dtype=torch.float64)
    size = torch.tensor([[1.0] * 11, [1.0] * 7 + [0.0] * 4], dtype=torch.float64)
    size[0, 3] = 2.0  # a token that already stands for two
    x2, s2 = tome_merge(x, metric, size, r=3)
    assert torch.allclose(s2.sum(1), size.sum(1))
    assert torch.allclose((s2[..., None] * x2).sum(1), (size[..., None] * x).sum(1))
    removed = ((size > 0) & (s2 == 0)).sum(1)
    assert removed.tolist() == [3, 3]
    assert not ((size == 0) & (s2 > 0)).any()  # pads never receive
    assert s2[:, 0].tolist() == size[:, 0].tolist()  # [CLS] neither merges nor receives (A set)
    x0, s0 = tome_merge(x, metric, size, r=0)
    assert torch.equal(x0, x) and torch.equal(s0, size)


def test_tome_per_row_counts():
    g = torch.Generator().manual_seed(2)
    x, metric = torch.randn(3, 12, 4, generator=g), torch.randn(3, 12, 4, generator=g)
    size = torch.ones(3, 12)
    size[2, 5:] = 0
    x2, s2 = tome_merge(x, metric, size, torch.tensor([0, 3, 5]))
    removed = ((size > 0) & (s2 == 0)).sum(1)
    assert removed.tolist() == [0, 3, 2]  # row 2: only 2 mergeable A tokens (2, 4) besides [CLS]
    torch.testing.assert_close(s2.sum(1), size.sum(1))


def test_tome_merges_most_similar_pair():
    # tokens 2 (A) and 3 (B) share a key; every other key is orthogonal
    metric = torch.eye(6)[None].clone()
    metric[0, 2] = metric[0, 3]
    x = torch.arange(6.0)[None, :, None]
    x2, s2 = tome_merge(x, metric, torch.ones(1, 6), r=1)
    assert s2[0].tolist() == [1, 1, 0, 2, 1, 1]
    assert x2[0, 3, 0].item() == pytest.approx(2.5)


def test_fuse_tokens_is_weighted_mean_of_dropped():
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    size = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
    w = torch.tensor([[5.0, 1.0, 3.0, 7.0]])
    dropped = torch.tensor([[False, True, True, False]])
    fused, fsize = fuse_tokens(x, size, w, dropped)
    assert fused.item() == pytest.approx((1 * 2 + 3 * 4) / 4)
    assert fsize.item() == 3.0


def test_compact_keeps_order_and_pads_short_rows():
    present = torch.tensor([[True, False, True, True], [False, True, False, False]])
    idx, ok = compact(present)
    assert idx[0].tolist() == [0, 2, 3] and ok[0].tolist() == [True, True, True]
    assert idx[1, 0].item() == 1 and ok[1].tolist() == [True, False, False]


# ---- on tiny models --------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [TokenPruningConfig(keep_rate=1.0),
                                 TokenPruningConfig(method="tome", r=0)])
def test_identity_settings_leave_outputs_identical(cfg):
    lm = tiny_model("bert")
    ids, mask = _batch(lm)
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        apply_token_pruning(lm, cfg)
        out = lm.model(input_ids=ids, attention_mask=mask)
    assert out.last_hidden_state.shape == ref.shape
    m = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[m], ref[m], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.token_weights, mask.float())


def test_vit_identity_and_merging():
    lm = tiny_model("vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = lm.model(pixel_values=x).logits
        apply_token_pruning(lm, TokenPruningConfig())
        torch.testing.assert_close(lm.model(pixel_values=x).logits, ref, rtol=1e-5, atol=1e-5)
        apply_token_pruning(lm, TokenPruningConfig(method="tome", r=4))
        out = lm.model(pixel_values=x)
    n = ref.new_tensor(17.0)  # 16 patches + [CLS]
    assert out.last_hidden_state.shape[1] == 17 - 4
    assert torch.allclose(out.token_weights.sum(1), n.expand(2))


def test_proportional_attention_equals_duplicated_tokens():
    """A token of size 2 under proportional attention acts as two identical tokens."""
    lm = tiny_model("bert")
    blk = lm.arch.get_blocks(lm.model)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, generator=g)
    dup = torch.cat([x, x[:, 2:3]], 1)  # token 2 twice
    with torch.no_grad():
        a = blk(dup, attention_mask=additive_mask(torch.ones(1, 4), x.dtype, True))
        b = blk(x, attention_mask=additive_mask(torch.tensor([[1.0, 1.0, 2.0]]), x.dtype, True))
    a, b = (t[0] if isinstance(t, tuple) else t for t in (a, b))
    torch.testing.assert_close(a[:, :3], b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [TokenPruningConfig(keep_rate=0.5),
                                 TokenPruningConfig(keep_rate=0.5, score="mean", dropped="drop"),
                                 TokenPruningConfig(keep_rate=0.5, dropped="pool"),
                                 TokenPruningConfig(method="tome", r=5),
                                 TokenPruningConfig(method="tome", merge_rate=0.3)])
def test_pruning_shrinks_tokens_and_keeps_padding_out(cfg):
    lm = tiny_model("bert", seed=1)
    lm.model.config.num_hidden_layers  # noqa: B018 (2 blocks: one reduction)
    ids, mask = _batch(lm)
    apply_token_pruning(lm, cfg)
    with torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    n_in = mask.sum(1)
    n_out = (out.token_weights > 0).sum(1)
    assert (n_out < n_in).all()
    assert out.last_hidden_state.shape[1] == int(n_out.max()) < ids.shape[1]
    assert len(out.hidden_states) == 3
    if cfg.method == "tome" or cfg.dropped != "drop":  # every input token is accounted for once
        torch.testing.assert_close(out.token_weights.sum(1), n_in.float())
    else:
        assert torch.equal(out.token_weights[out.token_weights > 0], torch.ones(int(n_out.sum())))


def test_embed_pools_with_token_sizes_and_remove_restores():
    lm = tiny_model("bert")
    plain = dataclasses.replace(lm)
    ref = embed(plain, SENTS, batch_size=2)
    apply_token_pruning(lm, TokenPruningConfig())
    torch.testing.assert_close(embed(lm, SENTS, batch_size=2), ref, rtol=1e-5, atol=1e-5)
    apply_token_pruning(lm, TokenPruningConfig(method="tome", r=6))
    merged = embed(lm, SENTS, batch_size=2)
    assert merged.shape == ref.shape and not torch.allclose(merged, ref)
    assert isinstance(lm.model, TokenPrunedEncoder)
    remove_token_pruning(lm)
    assert lm.model is plain.model
    torch.testing.assert_close(embed(lm, SENTS, batch_size=2), ref)


@pytest.mark.parametrize("cfg", [
    TokenPruningConfig(keep_rate=0.6),
    TokenPruningConfig(keep_rate=0.5, dropped="drop"),
    TokenPruningConfig(keep_rate=0.5, dropped="pool"),
    TokenPruningConfig(keep_rate=[0.4, 1.0], proportional_attention=False),
    TokenPruningConfig(keep_rate=0.6, protect_first=False),
])
def test_evit_kernel_reduction_equals_the_pytorch_functions(cfg):
    """The one-call C++ reduction (inference) keeps, fuses and pools the same tokens as
    evit_keep / fuse_tokens / compact (what training runs through): same sizes exactly, same
    hidden states on every present token to float rounding."""
    from slimformer.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("no C++ compiler: the reduction runs the PyTorch functions anyway")
    lm = tiny_model("bert")
    ids, mask = _batch(lm)
    m = apply_token_pruning(dataclasses.replace(lm), cfg).model
    calls = []
    real = TokenPrunedEncoder._kernel_reduce
    with torch.inference_mode():
        TokenPrunedEncoder._kernel_reduce = lambda *a: calls.append(1) or real(*a)
        try:
            fast = m(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        finally:
            TokenPrunedEncoder._kernel_reduce = lambda *a: None
        try:
            ref = m(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        finally:
            TokenPrunedEncoder._kernel_reduce = real
    assert len(calls) == sum(a is not None for a in m.plan) > 0
    assert torch.equal(fast.token_weights, ref.token_weights)
    for a, b in zip(fast.hidden_states, ref.hidden_states):
        assert a.shape == b.shape
    present = (fast.token_weights > 0)[..., None]
    torch.testing.assert_close(fast.last_hidden_state * present, ref.last_hidden_state * present,
                               rtol=1e-5, atol=1e-5)


def test_rejects_causal_lm():
    lm = tiny_model("llama")
    with pytest.raises(Exception, match="encoder"):
        apply_token_pruning(lm, TokenPruningConfig())


# ---- real model ------------------------------------------------------------------------------
@pytest.mark.integration
def test_minilm_pruned_embeddings_stay_close(minilm):
    from slimformer.data import stsb as stsb_data

    sents = [p[0] for p in stsb_data("test")[:64]]
    base = dataclasses.replace(minilm)
    ref = embed(base, sents)
    for cfg in (TokenPruningConfig(keep_rate=1.0), TokenPruningConfig(method="tome", merge_rate=0.1),
                TokenPruningConfig(keep_rate=0.8)):
        lm = apply_token_pruning(dataclasses.replace(minilm), cfg)
        cos = torch.nn.functional.cosine_similarity(embed(lm, sents), ref, dim=-1)
        if cfg.method == "evit" and cfg.keep_rate == 1.0:
            assert cos.min() > 0.99999
        else:
            assert 0.9 < cos.mean() < 0.99999  # changed, but still the same sentence


def test_wrapper_owns_no_second_copy_of_the_weights():
    lm = tiny_model("bert")
    keys = set(lm.model.state_dict())
    apply_token_pruning(lm, TokenPruningConfig(method="tome", r=2))
    assert set(lm.model.state_dict()) == {"inner." + k for k in keys}


def test_recovery_pulls_pruned_embeddings_toward_the_unpruned_model():
    """Self-distillation recovery: the pruned encoder's pooled embeddings move toward the
    unpruned ones (on held-out sentences too), the teacher copy is not trained, and a plain
    model is refused."""
    import copy

    from slimformer.errors import SlimformerError
    from slimformer.prune.tokens import recover_token_pruning, recovery_sentences

    lm = tiny_model("bert")
    plain = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    train_s = [f"sentence number {i} says something about {w}" for i, w in
               enumerate(["cats", "dogs", "rain", "sun", "tea", "code", "music", "books"] * 4)]
    held = ["a held out sentence about weather", "another one, on food and drink"]
    pruned = apply_token_pruning(dataclasses.replace(lm, model=copy.deepcopy(lm.model)),
                                 TokenPruningConfig(method="evit", keep_rate=0.5))

    def gap(m):
        return float(1 - torch.nn.functional.cosine_similarity(embed(m, held), embed(plain, held)).mean())

    before = gap(pruned)
    w0 = [p.detach().clone() for p in plain.model.parameters()]
    tlog = recover_token_pruning(pruned, train_s, steps=30, lr=3e-4, batch_size=8, max_len=48)
    assert tlog.loss[-1] < tlog.loss[0]
    assert gap(pruned) < before
    assert all(torch.equal(a, b) for a, b in zip(w0, plain.model.parameters()))
    with pytest.raises(SlimformerError, match="apply_token_pruning"):
        recover_token_pruning(plain, train_s, steps=1)
    sents = recovery_sentences()
    from slimformer.data import stsb
    test_s = {t for a, b, _ in stsb("test") for t in (a, b)}
    assert len(sents) > 1000 and not (set(sents) & test_s)
