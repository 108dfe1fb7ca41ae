"""The plain decode loop: equality with HF greedy, batching, sampling, stops, bad input."""
import pytest
import torch
import torch.nn as nn

from slimformer.decoding import CausalRunner, SamplingConfig, generate
from slimformer.errors import ConfigError, SlimformerError
from slimformer.models import get_module, set_module, tiny_model

CAUSAL = ["llama", "gpt2", "opt"]
PROMPTS = ["Hello world, this is", "ab", "The quick brown fox jumps over the"]


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_greedy(lm, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        y = lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=256)
    return y[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=CAUSAL)
def lm(request):
    return tiny_model(request.param)


def test_greedy_equals_hf_generate(lm):
    for p in PROMPTS:
        ours = generate(lm, p, 24, stop_on_eos=False)
        assert ours.tokens[0] == hf_greedy(lm, ours.prompt_tokens[0], 24), (lm.name, p)


def test_batch_of_different_lengths_equals_each_alone(lm):
    batch = generate(lm, PROMPTS, 20, stop_on_eos=False).tokens
    alone = [generate(lm, p, 20, stop_on_eos=False).tokens[0] for p in PROMPTS]
    assert batch == alone


def test_sampling_is_seeded_and_top_k_one_is_greedy(lm):
    cfg = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9)
    a = generate(lm, PROMPTS, 16, sampling=cfg, seed=3, stop_on_eos=False).tokens
    b = generate(lm, PROMPTS, 16, sampling=cfg, seed=3, stop_on_eos=False).tokens
    c = generate(lm, PROMPTS, 16, sampling=cfg, seed=4, stop_on_eos=False).tokens
    assert a == b and a != c
    greedy = generate(lm, PROMPTS, 16, stop_on_eos=False).tokens
    top1 = generate(lm, PROMPTS, 16, sampling=SamplingConfig(temperature=1.0, top_k=1),
                    seed=5, stop_on_eos=False).tokens
    assert top1 == greedy


def test_eos_stops_each_row_independently(lm):
    greedy = generate(lm, PROMPTS, 12, stop_on_eos=False).tokens
    eos = greedy[0][4]  # row 0 stops at its 5th token (others at theirs, if they emit it)
    out = generate(lm, PROMPTS, 12, eos_token_ids=[eos]).tokens
    for g, o in zip(greedy, out):
        cut = g[: g.index(eos) + 1] if eos in g else g
        assert o == cut
    assert out[0][-1] == eos and len(out[0]) <= 5


class TransposedLinear(nn.Module):
    """Behaves like nn.Linear but stores W^T: stands in for packed/quantized replacements."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.wt = nn.Parameter(lin.weight.detach().t().contiguous())
        self.bias = lin.bias

    def forward(self, x):
        y = x @ self.wt
        return y + self.bias if self.bias is not None else y


def test_works_with_linear_replacements():
    lm = tiny_model("llama")
    ref = generate(lm, PROMPTS, 12, stop_on_eos=False).tokens
    for name, mod in list(lm.model.named_modules()):
        if isinstance(mod, nn.Linear) and ".layers." in name:
            set_module(lm.model, name, TransposedLinear(mod))
    assert generate(lm, PROMPTS, 12, stop_on_eos=False).tokens == ref


def test_stop_strings():
    lm = tiny_model("gpt2")
    full = generate(lm, "abc", 16, stop_on_eos=False)
    stop = full.texts[0][3:5]
    if not stop.strip():
        pytest.skip("random model emitted whitespace")
    out = generate(lm, "abc", 16, stop_on_eos=False, stop=[stop])
    assert stop in out.texts[0] and len(out.tokens[0]) < len(full.tokens[0])


def test_bad_inputs():
    lm = tiny_model("llama")
    with pytest.raises(SlimformerError, match="empty"):
        generate(lm, "", 4)
    with pytest.raises(SlimformerError, match="empty"):
        generate(lm, [[1, 2], []], 4)
    with pytest.raises(SlimformerError, match="context"):
        generate(lm, [1] * 600, 4)  # tiny context is 512
    with pytest.raises(SlimformerError, match="context"):
        generate(lm, [1] * 500, 40)
    with pytest.raises(SlimformerError, match="max_new_tokens"):
        generate(lm, "hi", 0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(temperature=1, top_p=0)
    with pytest.raises(SlimformerError, match="causal"):
        CausalRunner(tiny_model("bert"))


def test_cli_generate_plain_and_speculative(monkeypatch, capsys):
    import slimformer.models as models
    from slimformer.cli import main

    monkeypatch.setattr(models, "load", lambda name, **kw: tiny_model("llama"))
    assert main(["generate", "--model", "x", "--prompt", "abcabc", "-n", "8"]) == 0
    plain = capsys.readouterr()
    assert "tokens/s" in plain.err and plain.out.startswith("abcabc")
    assert main(["generate", "--model", "x", "--prompt", "abcabc", "-n", "8", "--prompt-lookup"]) == 0
    spec = capsys.readouterr()
    assert "acceptance" in spec.err and spec.out == plain.out
    assert main(["generate", "--model", "x", "--prompt", "abc", "--prompt-lookup",
                 "--self-draft-layers", "1"]) == 2
    assert main(["generate", "--model", "x", "--prompt", "abc", "--self-draft-layers", "1",
                 "-k", "0"]) == 2
    assert "draft length" in capsys.readouterr().err
    assert main(["generate", "--model", "x", "--prompt", "abc", "--prompt-lookup", "--compile"]) == 2
    assert "--compile applies to the plain loop" in capsys.readouterr().err
    assert main(["generate", "--model", "x", "--prompt", "abc", "--draft-int8-head"]) == 2
    assert "needs --draft" in capsys.readouterr().err
    # a (here: same-weights) draft model with an int8 head: same text as the plain loop
    assert main(["generate", "--model", "x", "--prompt", "abcabc", "-n", "8", "--draft", "y",
                 "--draft-int8-head"]) == 0
    drafted = capsys.readouterr()
    assert "acceptance" in drafted.err and drafted.out == plain.out
    assert main(["generate", "--model", "x", "--prompt", "abcabc", "-n", "8", "--draft", "y", "--max-draft", "7"]) == 0
    assert capsys.readouterr().out == plain.out
    assert main(["generate", "--model", "x", "--prompt", "abc", "--max-draft", "7"]) == 2
    assert "--max-draft needs a draft" in capsys.readouterr().err
    assert main(["generate", "--model", "x", "--prompt", "abc", "--prompt-lookup", "-k", "4", "--max-draft", "3"]) == 2
    assert "max_draft (3) must be >= num_draft (4)" in capsys.readouterr().err


def test_static_step_equals_dynamic_step(lm):
    """The compile-friendly step (tensor write slot, attention over the whole masked cache) gives
    the same logits as the eager step, for a left-padded batch, step after step."""
    from slimformer.decoding.cache import advance
    from slimformer.decoding.generate import left_pad

    runner = CausalRunner(lm)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, start = left_pad(rows, 0)
    with torch.inference_mode():
        a, b = runner.new_cache(2, 16), runner.new_cache(2, 16)
        runner.prefill(ids, start, a)
        runner.prefill(ids, start, b)
        tok = torch.tensor([[20], [21]])
        for _ in range(5):
            want = runner.forward(tok, a)
            got = runner.static_forward(tok, b, b.length[:1].clone())
            advance(b, 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tok = want[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(a.length, b.length)
        for ka, kb in zip(a.keys, b.keys):
            torch.testing.assert_close(ka[:, :, :int(a.length[0])], kb[:, :, :int(b.length[0])])


def test_compiled_decode_gives_the_eager_tokens():
    """compile=True: same greedy tokens as eager, for a batch; one compilation serves two calls
    (capacities round up to the same size)."""
    torch._dynamo.reset()
    lm = tiny_model("llama")
    eager = generate(lm, PROMPTS, 12, stop_on_eos=False).tokens
    runner = CausalRunner(lm, compile=True)
    got = generate(lm, PROMPTS, 12, stop_on_eos=False, runner=runner).tokens
    again = generate(lm, PROMPTS[:2], 10, stop_on_eos=False, runner=runner).tokens
    assert got == eager
    assert again == [t[:10] for t in eager[:2]]
    assert runner.new_cache(1, 7).capacity == CausalRunner.CAPACITY_STEP


def test_compiled_runners_skip_guards_without_mixing_graphs():
    """After its first compiled step a runner skips Dynamo's guard check for that shape (batch,
    tokens, capacity), then calls the compiled bytecode directly; two
    compiled runners of different models (one code object, two graphs) and a second capacity
    must still each get their own graph: every step equals its eager runner's."""
    torch._dynamo.reset()
    a_lm, b_lm = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ca, cb = CausalRunner(a_lm, compile=True), CausalRunner(b_lm, compile=True)
    ea, eb = CausalRunner(a_lm), CausalRunner(b_lm)
    with torch.inference_mode():
        for capacity in (16, 200):  # rounds up to 128, then 256: a second shape
            caches = {r: r.new_cache(1, capacity) for r in (ca, cb, ea, eb)}
            for r, c in caches.items():
                r.prefill(torch.tensor([[1, 2, 3]]), torch.zeros(1, dtype=torch.long), c)
            for step in range(6):  # one-token steps, then two-token steps (a draft catching up)
                tok = torch.tensor([[5 + step]]) if step < 3 else torch.tensor([[5 + step, 9]])
                for comp, ref in ((ca, ea), (cb, eb)):
                    torch.testing.assert_close(comp.forward(tok, caches[comp]), ref.forward(tok, caches[ref]),
                                               rtol=1e-4, atol=1e-4)
                    assert torch.equal(caches[comp].length, caches[ref].length)
    assert len(ca._warm) == len(cb._warm) == 4  # (1 and 2 tokens) x 2 capacities
    # from a shape's second step on, each runner calls its own compiled bytecode directly
    assert set(ca._direct) == set(ca._warm) and set(cb._direct) == set(cb._warm)
    assert all(ca._direct.values()) and all(cb._direct.values())
    assert all(ca._direct[k] is not cb._direct[k] for k in ca._direct)


def test_compiled_runner_stays_on_dynamo_without_its_private_cache_api(monkeypatch):
    """Where Dynamo's cache entries cannot be read (the API is private), the direct call is not
    used, tried once per shape, and the compiled steps still equal the eager ones."""
    import torch._dynamo.eval_frame as ef

    def missing(code):
        raise AttributeError("no cache entry list in this PyTorch")

    monkeypatch.setattr(ef, "_debug_get_cache_entry_list", missing)
    torch._dynamo.reset()
    lm = tiny_model("llama", seed=2)
    comp, ref = CausalRunner(lm, compile=True), CausalRunner(lm)
    with torch.inference_mode():
        caches = {r: r.new_cache(1, 16) for r in (comp, ref)}
        for r, c in caches.items():
            r.prefill(torch.tensor([[1, 2, 3]]), torch.zeros(1, dtype=torch.long), c)
        for step in range(4):
            tok = torch.tensor([[7 + step]])
            torch.testing.assert_close(comp.forward(tok, caches[comp]), ref.forward(tok, caches[ref]),
                                       rtol=1e-4, atol=1e-4)
    assert list(comp._direct.values()) == [False]


def test_compiled_step_falls_back_for_ragged_caches():
    """Rows at different fill levels (speculative rollback) cannot share one write slot: the
    compiled runner must take the eager path there and still be right."""
    lm = tiny_model("llama")
    runner, ref = CausalRunner(lm, compile=True), CausalRunner(lm)
    with torch.inference_mode():
        c1, c2 = runner.new_cache(2, 8), ref.new_cache(2, 8)
        for r, c in ((runner, c1), (ref, c2)):
            r.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.zeros(2, dtype=torch.long), c)
            c.rollback(torch.tensor([3, 2]))
        assert not CausalRunner._compilable(c1)
        torch.testing.assert_close(runner.forward(torch.tensor([[7], [8]]), c1),
                                   ref.forward(torch.tensor([[7], [8]]), c2))
    assert runner._compiled_step is None


def test_compiled_w8a8_decode_gives_the_eager_tokens():
    """fbgemm's packed int8 weight is reached through a custom op under compile (one graph,
    fused q/k/v and gate/up computed once): same greedy tokens as the eager W8A8 model."""
    import copy

    from slimformer import compress
    from slimformer.formats.fused import FusedInt8Slice

    torch._dynamo.reset()
    lm = copy.deepcopy(tiny_model("llama"))
    compress(lm, "w8a8", progress=False)
    assert any(isinstance(m, FusedInt8Slice) for m in lm.model.modules())
    eager = generate(lm, PROMPTS, 8, stop_on_eos=False).tokens
    runner = CausalRunner(lm, compile=True)
    got = generate(lm, PROMPTS, 8, stop_on_eos=False, runner=runner).tokens
    assert runner.compile  # it compiled as one graph, no fallback
    assert got == eager


class _GraphBreak(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.inner(x)


def test_compile_falls_back_to_eager_for_untraceable_modules(caplog):
    """A module dynamo cannot trace as one graph: the compiled runner warns once, decodes
    eagerly, and gives exactly the eager tokens."""
    import copy
    import logging

    lm = copy.deepcopy(tiny_model("llama"))
    name = "model.layers.0.mlp.down_proj"
    set_module(lm.model, name, _GraphBreak(get_module(lm.model, name)))
    eager = generate(lm, PROMPTS, 8, stop_on_eos=False).tokens
    runner = CausalRunner(lm, compile=True)
    with caplog.at_level(logging.WARNING, logger="slimformer.decoding.runner"):
        got = generate(lm, PROMPTS, 8, stop_on_eos=False, runner=runner).tokens
    assert got == eager
    assert not runner.compile
    assert any("cannot be compiled" in r.message for r in caplog.records)


def test_weight_bytes_per_token_counts_packed_int8_weights():
    """The bandwidth roofline must count what a W8A8 step reads: fbgemm's packed int8 weights
    live outside ``buffers()``, and were once missed (the roofline then saw only the head)."""
    import copy

    from slimformer import compress
    from slimformer.decoding.speed import weight_bytes_per_token

    lm = tiny_model("llama")
    q = copy.deepcopy(lm)
    compress(q, "w8a8", progress=False)
    dense, quant = weight_bytes_per_token(CausalRunner(lm)), weight_bytes_per_token(CausalRunner(q))
    blocks = sum(p.numel() * 4 for p in lm.arch.get_blocks(lm.model).parameters())
    head = lm.model.lm_head.weight.numel() * 4
    assert dense == blocks + head + lm.model.model.norm.weight.numel() * 4
    # int8 linears: ~1/4 of their fp32 bytes; norms stay fp32; the recipe's int8 head (head: int8)
    # counts its codes and scales
    qhead = q.model.lm_head.nbytes()
    assert head / 4 < qhead < 0.3 * head
    assert qhead + 0.2 * blocks < quant < qhead + 0.45 * blocks


@pytest.mark.parametrize("heads,kv_heads,q", [(9, 3, 1), (9, 3, 5), (4, 4, 3), (8, 2, 1)])
def test_grouped_attention_folds_query_groups_exactly(heads, kv_heads, q):
    """Folding the query heads that share a KV head into its query rows computes exactly
    SDPA's grouped-query attention, with and without a per-row mask."""
    import torch.nn.functional as F

    from slimformer.decoding.runner import grouped_attention

    g = torch.Generator().manual_seed(heads * 10 + q)
    qs = torch.randn(2, heads, q, 16, generator=g)
    k, v = torch.randn(2, kv_heads, 12, 16, generator=g), torch.randn(2, kv_heads, 12, 16, generator=g)
    mask = torch.rand(2, 1, q, 12, generator=g) > 0.4
    mask[..., 0] = True
    for m in (mask, None):
        want = F.scaled_dot_product_attention(qs, k, v, attn_mask=m, scale=0.3,
                                              enable_gqa=heads != kv_heads).transpose(1, 2)
        got = grouped_attention(qs, k, v, m, False, 0.3)
        assert got.shape == (2, q, heads, 16)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_read_bandwidth_counts_the_streamed_weight_bytes(monkeypatch):
    """The roofline's GEMV rate is bytes of the streamed weight over the timed product: with a
    clock that advances 1 ms per reading, 8 MiB must come out as 8 MiB per ms."""
    from slimformer.decoding import speed

    ticks = iter(range(10**6))
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(ticks) * 1e-3)
    rate = speed.measure_read_bandwidth(mbytes=8, cols=64, repeats=3)
    assert rate == pytest.approx(8 * 2**20 / 1e-3)


def test_runner_norm_and_rotary_kernels_leave_the_logits_unchanged(monkeypatch):
    """The eager loop's RMSNorms and rotary embeddings run our kernels: prefill, one-token and
    verify logits must be bit-identical to the loop on transformers' modules and PyTorch ops."""
    import slimformer.decoding.runner as runner_mod
    from slimformer.kernels import cpu_kernels
    from slimformer.primitives.rotary import apply_rotary_heads_last

    if cpu_kernels() is None:
        pytest.skip("no C++ compiler: the kernels fall back")
    lm = tiny_model("llama")
    fast = CausalRunner(lm)
    assert fast.blocks[0].norm1 is not lm.model.model.layers[0].input_layernorm

    def run(runner):
        cache = runner.new_cache(2, 32)
        ids = torch.randint(3, 200, (2, 9))
        with torch.inference_mode():
            out = [runner.prefill(ids, torch.tensor([0, 2]), cache, last_only=False)]
            out.append(runner.forward(torch.tensor([[5], [7]]), cache))
            out.append(runner.forward(torch.randint(3, 200, (2, 4)), cache))
        return out

    torch.manual_seed(0)
    got = run(fast)
    monkeypatch.setattr(runner_mod, "fast_rms_norm", lambda m: m)
    monkeypatch.setattr(runner_mod, "rotary_heads_last", apply_rotary_heads_last)
    plain = CausalRunner(lm)
    assert plain.blocks[0].norm1 is lm.model.model.layers[0].input_layernorm
    torch.manual_seed(0)
    for a, b in zip(got, run(plain)):
        assert torch.equal(a, b)
