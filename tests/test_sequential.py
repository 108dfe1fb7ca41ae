"""True-sequential calibration (slimformer.engine.sequential): the staged block reproduces the
block, each group is calibrated on the outputs of the already-compressed linears before it,
the pass's outputs are the compressed block's outputs, and blocks without a staged form (or
whose staged form does not match) fall back to the generic two-forward pass."""
import logging

import pytest
import torch

from slimformer.engine import ActivationCache, block_forward
from slimformer.engine.runner import EngineOptions, capture_block_inputs, run
from slimformer.engine.sequential import StagedBlock, staged_matches
from slimformer.models import tiny_model
from slimformer.observers import HessianObserver, gram_add_
from slimformer.quant import GPTQConfig
from slimformer.quant import gptq as gptq_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=8, seq=24):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(3))


def _inputs(lm, samples, batch=4):
    states = ActivationCache()
    rest = capture_block_inputs(lm, samples, batch, states)
    return states, rest


def test_gram_add_blocked_equals_full_product():
    g = torch.Generator().manual_seed(0)
    for n in (100, 300, 600):  # 300 and 600 take the block-triangle path
        x = torch.randn(257, n, generator=g)
        h0 = torch.randn(n, n, generator=g)
        h0 = h0 + h0.t()  # symmetric on entry, as the observer's running H is
        got = gram_add_(h0.clone(), x)
        ref = h0 + x.t() @ x
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
        assert torch.equal(got, got.t())
        # the observer's running mean over uneven batches, lower triangle filled on result()
        obs = HessianObserver()
        for part in x.split([100, 57, 100]):
            obs.observe(part)
        h = obs.result()
        assert torch.allclose(h, 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-5) and torch.equal(h, h.t())


def test_staged_block_reproduces_every_llama_block():
    lm = tiny_model("llama")
    states, rest = _inputs(lm, _calib())
    for block in lm.arch.get_blocks(lm.model):
        kw = rest[0][1]
        staged = StagedBlock.build(block, lm.arch, lm.model.config, kw)
        assert staged is not None
        h = states[0]
        ref = block_forward(block, h, (), kw)
        assert torch.allclose(staged.forward(h, kw), ref, rtol=1e-5, atol=1e-5)
        assert staged_matches(staged, lambda x: block_forward(block, x, (), kw), h, kw)
        # other rotary tables on the staged side only: the self-check can fail
        other = {**kw, "position_embeddings": tuple(t * 0.5 for t in kw["position_embeddings"])}
        assert not staged_matches(staged, lambda x: block_forward(block, x, (), kw), h, other)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bert"])
def test_no_staged_form_outside_the_llama_family(arch):
    lm = tiny_model(arch)
    block = lm.arch.get_blocks(lm.model)[0]
    assert StagedBlock.build(block, lm.arch, lm.model.config, {}) is None


def test_each_group_is_calibrated_on_the_compressed_linears_before_it(monkeypatch):
    """The Hessian GPTQ gets for o_proj / down_proj is that of their input through the
    already-quantized q/k/v / gate/up (not through the original weights)."""
    seen = []
    real = gptq_mod.gptq_quantize

    def spy(w, h, *a, **k):
        seen.append((tuple(w.shape), h.clone()))
        return real(w, h, *a, **k)

    monkeypatch.setattr(gptq_mod, "gptq_quantize", spy)
    lm = tiny_model("llama")
    samples = _calib()
    states, rest = _inputs(tiny_model("llama"), samples)  # same seed: the same block-0 inputs
    run(lm, [GPTQConfig(bits=3, group_size=32, actorder=True)], samples,
        EngineOptions(batch_size=4, progress=False))
    block0 = lm.arch.get_blocks(lm.model)[0]  # now compressed
    cfg = lm.model.config
    # block 0's calls: q/k/v stacked, o, gate/up stacked, down (in that order)
    shapes = [s for s, _ in seen[:4]]
    assert shapes == [(cfg.hidden_size + 2 * 32, cfg.hidden_size), (cfg.hidden_size, cfg.hidden_size),
                      (2 * cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size)]
    for idx, rel in ((1, "self_attn.o_proj"), (3, "mlp.down_proj")):
        obs = HessianObserver()
        handle = block0.get_submodule(rel).register_forward_pre_hook(lambda m, a: obs.observe(a[0]))
        with torch.no_grad():
            for h, (a, kw) in zip(states, rest):
                block_forward(block0, h, a, kw)
        handle.remove()
        assert torch.allclose(seen[idx][1], obs.result(), rtol=1e-4, atol=1e-6), rel


def test_sequential_outputs_are_the_compressed_blocks_outputs():
    lm = tiny_model("llama")
    samples = _calib()
    ref_lm = tiny_model("llama")
    res = run(lm, [GPTQConfig(bits=4, group_size=32)], samples, EngineOptions(batch_size=4, progress=False),
              keep_outputs=True)
    # replay the compressed blocks generically from the original block-0 inputs
    states, rest = _inputs(ref_lm, samples)
    blocks = lm.arch.get_blocks(lm.model)
    with torch.no_grad():
        for j, ((h, (a, kw)), out) in enumerate(zip(zip(states, rest), res.outputs)):
            for b in blocks:
                h = block_forward(b, h, a, kw)
            assert torch.allclose(out, h, rtol=1e-4, atol=1e-5), j


def test_mismatching_staged_form_falls_back_to_the_generic_pass(monkeypatch):
    from slimformer.engine import runner, sequential

    monkeypatch.setattr(sequential, "staged_matches", lambda *a, **k: False)
    calls = {"staged": 0, "generic": 0}
    real_seq, real_cal = sequential.run_sequential, runner._calibrate

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(sequential, "run_sequential", count("staged", real_seq))
    monkeypatch.setattr(runner, "_calibrate", count("generic", real_cal))
    # the warning, read from the module's own logger (not through root/caplog, which other
    # tests' logging setup can change)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("slimformer.engine.runner")
    monkeypatch.setattr(log, "disabled", False)
    monkeypatch.setattr(log, "level", logging.INFO)
    log.addHandler(handler)
    try:
        run(tiny_model("llama"), [GPTQConfig(bits=4, group_size=32)], _calib(),
            EngineOptions(batch_size=4, progress=False))
    finally:
        log.removeHandler(handler)
    assert calls == {"staged": 0, "generic": 3}  # every block through the two-forward pass
    assert sum("does not reproduce the block" in m for m in seen) == 3
    # and with the check passing, no block takes the generic pass
    monkeypatch.setattr(sequential, "staged_matches", lambda *a, **k: True)
    calls.update(staged=0, generic=0)
    run(tiny_model("llama"), [GPTQConfig(bits=4, group_size=32)], _calib(), EngineOptions(batch_size=4, progress=False))
    assert calls == {"staged": 3, "generic": 0}


def test_true_sequential_and_generic_pass_both_beat_rtn_on_the_block_outputs():
    """End to end on the tiny model: either order gives block outputs closer to fp32 than RTN."""
    from slimformer.quant import RTNConfig

    samples = _calib()
    ref = run(tiny_model("llama"), [], samples, EngineOptions(batch_size=4, progress=False),
              keep_outputs=True).outputs
    errs = {}
    for name, stage in (("rtn", RTNConfig(bits=3, group_size=32)),
                        ("seq", GPTQConfig(bits=3, group_size=32, actorder=True)),
                        ("two-pass", GPTQConfig(bits=3, group_size=32, actorder=True, true_sequential=False))):
        out = run(tiny_model("llama"), [stage], samples, EngineOptions(batch_size=4, progress=False),
                  keep_outputs=True).outputs
        errs[name] = sum(float((a - b).pow(2).sum()) for a, b in zip(out, ref))
    assert errs["seq"] < errs["rtn"] and errs["two-pass"] < errs["rtn"], errs
