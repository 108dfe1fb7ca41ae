"""Speculative decoding: greedy is exactly the target's greedy; sampling is exactly the target's
distribution (chi-square, with a deliberately wrong variant shown to fail); bad input."""
import pytest
import torch
from scipy.stats import chisquare

import slimformer.decoding.speculative as spec_mod
from slimformer.decoding import CausalRunner, SamplingConfig, generate
from slimformer.decoding.speculative import (PromptLookupDraft, best_draft_length, early_exit_draft,
                                             lookup_continuation, speculative_generate)
from slimformer.errors import SlimformerError
from slimformer.models import tiny_model
from slimformer.models.loading import LoadedModel

PROMPTS = ["Hello world, this is hello world, this is", "ab", "The quick brown fox jumps over"]


pytestmark = pytest.mark.usefixtures("one_thread")


def drafts(lm, arch):
    return {
        "prompt-lookup": PromptLookupDraft(max_ngram=3),
        "early-exit": early_exit_draft(lm, 1),
        "other-model": tiny_model(arch, seed=1),  # same vocabulary, different weights
        "same-model": lm,  # a compressed copy of the target behaves between these two
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_speculative_greedy_equals_plain_greedy(arch):
    lm = tiny_model(arch)
    ref = generate(lm, PROMPTS, 24, stop_on_eos=False).tokens
    for name, d in drafts(lm, arch).items():
        for adaptive in (False, True):
            out = speculative_generate(lm, PROMPTS, 24, draft=d, num_draft=3, adaptive=adaptive,
                                       stop_on_eos=False)
            assert out.tokens == ref, (arch, name, adaptive)
            assert out.stats["steps"] <= 24


def test_speculative_greedy_stops_at_eos():
    lm = tiny_model("llama")
    ref = generate(lm, PROMPTS, 16, stop_on_eos=False).tokens
    eos = ref[0][6]
    plain = generate(lm, PROMPTS, 16, eos_token_ids=[eos]).tokens
    out = speculative_generate(lm, PROMPTS, 16, draft=early_exit_draft(lm, 2), num_draft=4,
                               eos_token_ids=[eos]).tokens
    assert out == plain


# ---- the output distribution of speculative SAMPLING is the target's -----------------------
V = 6  # tiny vocabulary so two-token sequences give 36 chi-square cells


def small_vocab_model(seed: int, sharpen: float) -> LoadedModel:
    """A tiny llama over a 6-token vocabulary; ``sharpen`` scales the LM head so that target and
    draft distributions are peaked and clearly different (a wrong acceptance rule then shows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimformer.models.registry import ARCHITECTURES

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen)
    return LoadedModel(model=m, tokenizer=None, arch=ARCHITECTURES["llama"], name=f"v6-{seed}",
                       source="test")


def exact_two_token_distribution(lm, prompt: list[int]) -> torch.Tensor:
    """P(t1, t2 | prompt) under the target at temperature 1: [V * V]."""
    with torch.inference_mode():
        p1 = lm.model(torch.tensor([prompt])).logits[0, -1].softmax(-1)  # [V]
        ctx = torch.tensor([prompt + [t] for t in range(V)])
        p2 = lm.model(ctx).logits[:, -1].softmax(-1)  # [V, V]
    return (p1[:, None] * p2).flatten()


def sample_pairs(lm, draft, prompt, n: int, seed: int) -> torch.Tensor:
    """Counts of (t1, t2) from n speculative samples (one batch of n identical prompts)."""
    out = speculative_generate(lm, [prompt] * n, 2, draft=draft, num_draft=2, stop_on_eos=False,
                               sampling=SamplingConfig(temperature=1.0), seed=seed)
    cells = torch.tensor([t[0] * V + t[1] for t in out.tokens])
    return torch.bincount(cells, minlength=V * V).double()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts, probs = counts.double(), probs.double()  # scipy checks sum(obs) == sum(exp) to 1.5e-8
    keep = probs * counts.sum() >= 5  # pool cells with tiny expectations
    exp = torch.cat([probs[keep], probs[~keep].sum()[None]]) * counts.sum()
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    if exp[-1] == 0:
        exp, obs = exp[:-1], obs[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


_accept_sample = spec_mod.accept_sample


def accept_without_residual(logits, prop, sampling, generator):
    """WRONG on purpose: on rejection resample from p instead of norm(max(p - q, 0))."""
    p = spec_mod.target_probs(logits, sampling)
    n, _ = _accept_sample(logits, prop, sampling, generator)
    return n, spec_mod.sample(p[torch.arange(p.shape[0]), n], generator)


@pytest.mark.parametrize("kind", ["model", "prompt-lookup"])
def test_speculative_sampling_matches_target_distribution(kind, monkeypatch):
    target = small_vocab_model(0, sharpen=6.0)
    prompt = [1, 2, 3, 1, 2]  # prompt lookup proposes "3, 1" from the earlier "1, 2" match
    draft = small_vocab_model(1, sharpen=6.0) if kind == "model" else PromptLookupDraft(2)
    probs = exact_two_token_distribution(target, prompt)
    n = 6000
    counts = sample_pairs(target, draft, prompt, n, seed=0)
    assert chi2_pvalue(counts, probs) > 1e-3
    # the test can fail: skipping the residual resample is detected with the same sample size
    monkeypatch.setattr(spec_mod, "accept_sample", accept_without_residual)
    wrong = sample_pairs(target, draft, prompt, n, seed=0)
    assert chi2_pvalue(wrong, probs) < 1e-6


def test_plain_sampling_matches_target_distribution():
    target = small_vocab_model(0, sharpen=6.0)
    prompt = [1, 2, 3, 1, 2]
    out = generate(target, [prompt] * 6000, 2, stop_on_eos=False,
                   sampling=SamplingConfig(temperature=1.0), seed=1)
    counts = torch.bincount(torch.tensor([t[0] * V + t[1] for t in out.tokens]), minlength=V * V)
    assert chi2_pvalue(counts.double(), exact_two_token_distribution(target, prompt)) > 1e-3


# ---- pieces ---------------------------------------------------------------------------------
def test_lookup_continuation_takes_most_recent_longest_match():
    row = torch.tensor([5, 6, 7, 8, 5, 6, 9, 4, 5, 6])
    assert lookup_continuation(row, 2, 1, 3).tolist() == [9, 4, 5]  # latest "5 6" -> "9 4 5"
    assert lookup_continuation(torch.tensor([1, 2, 3]), 2, 1, 3).tolist() == []


def test_best_draft_length_grows_with_acceptance():
    ks = [best_draft_length(a, draft_cost=0.1, verify_cost=0.05, k_max=8) for a in (0.2, 0.6, 0.9)]
    assert ks == sorted(ks) and ks[0] < ks[-1]
    assert best_draft_length(0.9, draft_cost=1.0, verify_cost=0.0, k_max=8) == 1


def test_bad_inputs():
    lm = tiny_model("llama")
    with pytest.raises(SlimformerError, match="draft length"):
        speculative_generate(lm, "hi", 4, draft=PromptLookupDraft(), num_draft=0)
    with pytest.raises(SlimformerError, match="empty"):
        speculative_generate(lm, "", 4, draft=PromptLookupDraft())
    with pytest.raises(SlimformerError, match="context"):
        speculative_generate(lm, [1] * 600, 4, draft=PromptLookupDraft())
    with pytest.raises(SlimformerError, match="prompt lookup"):
        speculative_generate(lm, "hi", 4, draft=small_vocab_model(0, 1.0))
    with pytest.raises(SlimformerError, match="< the model"):
        early_exit_draft(lm, 3)
    with pytest.raises(SlimformerError, match="ngram"):
        PromptLookupDraft(max_ngram=0)


def test_w8a8_compressed_self_draft_is_lossless():
    """The same model compressed (W8A8) as draft: greedy output is still exactly the target's."""
    import copy

    from slimformer import compress

    lm = tiny_model("llama")
    q = copy.deepcopy(lm)
    compress(q, "w8a8", progress=False)
    ref = generate(lm, PROMPTS, 16, stop_on_eos=False).tokens
    out = speculative_generate(lm, PROMPTS, 16, draft=q, num_draft=4, stop_on_eos=False)
    assert out.tokens == ref and out.stats["acceptance"] > 0.5


@pytest.mark.parametrize("compile", [False, True])
def test_w4_self_draft_with_int8_head_and_compiled_steps_is_lossless(compile):
    """The fast self-draft of the benchmark: W4 blocks, a W8A8 copy of the head, compiled steps.
    Proposals change, the output does not (greedy, batch of ragged prompts)."""
    import copy

    from slimformer import compress
    from slimformer.decoding.speculative import model_draft
    from slimformer.formats.linear import Int8Linear

    torch._dynamo.reset()
    lm = tiny_model("llama")
    q = copy.deepcopy(lm)
    compress(q, "w4-g64", progress=False)
    d = model_draft(lm, q, compile=compile, int8_head=True)
    assert isinstance(d.runner.head, Int8Linear)
    assert not isinstance(q.model.lm_head, Int8Linear)  # the draft model itself is untouched
    ref = generate(lm, PROMPTS, 16, stop_on_eos=False).tokens
    out = speculative_generate(lm, PROMPTS, 16, draft=d, num_draft=3, adaptive=True, stop_on_eos=False)
    assert out.tokens == ref
    one = speculative_generate(lm, PROMPTS[0], 16, draft=d, num_draft=3, stop_on_eos=False)
    assert one.tokens == ref[:1]
    assert d.cost < 1.0  # W4 weights: a draft step reads fewer bytes than a target step


def test_int8_head_of_a_draft_reuses_an_int8_weight_only_heads_codes():
    """The ``w8a8`` recipe's weight-only int8 head (``head: int8``) becomes W8A8 with the very
    same codes and scales (only activations are now rounded); the draft stays lossless; a W4
    head stays as it is."""
    import copy

    from slimformer import compress
    from slimformer.decoding.speculative import _int8_head, model_draft
    from slimformer.formats import QuantLinear
    from slimformer.formats.linear import Int8Linear
    from slimformer.primitives.affine import QuantSpec, quantize

    lm = tiny_model("llama")
    draft = copy.deepcopy(lm)
    compress(draft, "w8a8", progress=False)
    head = draft.model.lm_head
    assert isinstance(head, QuantLinear) and head.spec.bits == 8
    w8 = _int8_head(head)
    assert isinstance(w8, Int8Linear)
    torch.testing.assert_close(w8.weight_codes().float() * w8.weight_scale[:, None], head.dequantized_weight(),
                               rtol=0, atol=0)
    x = torch.randn(3, head.in_features)
    assert (w8(x) - head(x)).abs().max() < 0.05 * head(x).abs().max()  # activation rounding only
    d = model_draft(lm, draft, int8_head=True)
    assert isinstance(d.runner.head, Int8Linear) and draft.model.lm_head is head  # the folder's model is untouched
    ref = generate(lm, PROMPTS, 12, stop_on_eos=False).tokens
    assert speculative_generate(lm, PROMPTS, 12, draft=d, num_draft=3, stop_on_eos=False).tokens == ref
    w4_head = QuantLinear.from_quantized(quantize(tiny_model("llama").model.lm_head.weight.detach(),
                                                  QuantSpec(bits=4, symmetric=True, group_size=16)))
    assert _int8_head(w4_head) is w4_head


@pytest.mark.parametrize("compile", [False, True])
def test_w8_weight_only_self_draft_fuses_projections_and_is_lossless(compile):
    """The ``w8`` recipe's model (int8 weight-only blocks and head) as the draft: its runner
    runs q/k/v and gate/up as one kernel call each with exactly the unfused logits, and the
    speculative output is exactly the target's greedy output."""
    import copy

    import slimformer.decoding.runner as runner_mod
    from slimformer import compress
    from slimformer.decoding.speculative import model_draft
    from slimformer.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("needs slimformer's C++ kernels")
    torch._dynamo.reset()
    lm = tiny_model("llama")
    q = copy.deepcopy(lm)
    compress(q, "w8", progress=False)
    d = model_draft(lm, q, compile=compile)
    assert d.runner.blocks[0].qkv is not None and d.runner.blocks[0].q is None
    ref = generate(lm, PROMPTS, 16, stop_on_eos=False).tokens
    out = speculative_generate(lm, PROMPTS, 16, draft=d, num_draft=3, adaptive=True, stop_on_eos=False)
    assert out.tokens == ref and out.stats["acceptance"] > 0.5
    fused = generate(q, PROMPTS, 8, stop_on_eos=False, runner=CausalRunner(q))
    orig = runner_mod.fuse_weight_only
    try:
        runner_mod.fuse_weight_only = lambda members: None
        unfused_runner = CausalRunner(q)
    finally:
        runner_mod.fuse_weight_only = orig
    assert unfused_runner.blocks[0].qkv is None
    assert generate(q, PROMPTS, 8, stop_on_eos=False, runner=unfused_runner).tokens == fused.tokens
    cache_a, cache_b = CausalRunner(q).new_cache(1, 16), unfused_runner.new_cache(1, 16)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        a = CausalRunner(q).prefill(ids, torch.zeros(1, dtype=torch.long), cache_a, last_only=False)
        b = unfused_runner.prefill(ids, torch.zeros(1, dtype=torch.long), cache_b, last_only=False)
    assert torch.equal(a, b)
