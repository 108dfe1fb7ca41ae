"""The sequential engine on tiny models of every architecture."""
import dataclasses
from typing import ClassVar

import pytest
import torch

from slimformer.engine import (ActivationCache, EngineOptions, StageConfig, StageMethod, block_forward,
                               build_meta_model, capture_block_inputs, register_stage, run)
from slimformer.errors import ConfigError, SlimformerError
from slimformer.models import tiny_model

ARCHS = ["llama", "gpt2", "opt", "bert", "vit"]
SEEN: list = []


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass(frozen=True)
class IdentityConfig(StageConfig):
    """Test stage: observes everything, changes nothing, records what it was given."""

    METHOD: ClassVar[str] = "test-identity"


def _identity(ctx, cfg):
    SEEN.append((ctx.name, sorted(ctx.targets), {k: sorted(v) for k, v in ctx.stats.items()}))


register_stage(StageMethod("test-identity", IdentityConfig, apply=_identity,
                           observers=lambda c: ("hessian", "channel_norm", "abs_mean", "minmax")))


def _inputs(lm, n=5, seq=19):
    g = torch.Generator().manual_seed(0)
    if lm.kind == "vision":
        return torch.randn(n, 3, 32, 32, generator=g)
    return torch.randint(0, 256, (n, seq), generator=g)


def _reference(lm, x):
    """The model's own last-block output (before the final norm) for every sample."""
    blocks = lm.arch.get_blocks(lm.model)
    outs = []
    h = blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    from slimformer.engine.runner import model_inputs

    with torch.no_grad():
        logits = lm.model(**model_inputs(lm, x))
    h.remove()
    return torch.cat(outs), logits


def _logits(lm, x):
    from slimformer.engine.runner import model_inputs

    with torch.no_grad():
        out = lm.model(**model_inputs(lm, x))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_stage_changes_nothing(arch):
    lm = tiny_model(arch)
    x = _inputs(lm)
    ref_states, _ = _reference(lm, x)
    ref_logits = _logits(lm, x)
    SEEN.clear()
    res = run(lm, [IdentityConfig()], x, EngineOptions(batch_size=2, progress=False), keep_outputs=True)
    got = torch.cat(list(res.outputs))
    # propagation through the blocks reproduces the model's own forward exactly
    assert torch.equal(got, ref_states)
    assert torch.equal(_logits(lm, x), ref_logits)
    n_blocks = len(lm.arch.get_blocks(lm.model))
    assert len(SEEN) == n_blocks and res.calibrated
    name, targets, stats = SEEN[0]
    assert set(targets) == set(lm.arch.linear_names().values())
    assert all(v == ["abs_mean", "channel_norm", "hessian", "minmax"] for v in stats.values())
    for m in lm.model.modules():  # observers were detached
        assert not m._forward_pre_hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_captured_inputs_reproduce_block0(arch):
    lm = tiny_model(arch)
    x = _inputs(lm, n=4)
    block0 = lm.arch.get_blocks(lm.model)[0]
    outs = []
    h = block0.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    from slimformer.engine.runner import model_inputs

    with torch.no_grad():
        lm.model(**model_inputs(lm, x))
    h.remove()
    cache = ActivationCache()
    with torch.no_grad():
        rest = capture_block_inputs(lm, x, 3, cache)
        got = torch.cat([block_forward(block0, hs, a, kw) for hs, (a, kw) in zip(cache, rest)])
    assert len(cache) == 2
    assert torch.equal(got, outs[0])


def test_offloaded_activations_match(tmp_path):
    lm = tiny_model("llama")
    x = _inputs(lm)
    a = run(lm, [IdentityConfig()], x, EngineOptions(batch_size=2, progress=False), keep_outputs=True)
    b = run(lm, [IdentityConfig()], x, EngineOptions(batch_size=2, progress=False, offload_dir=tmp_path),
            keep_outputs=True)
    assert b.outputs.offloaded and any(tmp_path.iterdir())
    assert torch.equal(torch.cat(list(a.outputs)), torch.cat(list(b.outputs)))
    b.outputs.close()
    assert not any(p.name.startswith("acts-") for p in tmp_path.iterdir())


def test_offload_writes_in_background_reads_back_and_reports_failures(tmp_path, monkeypatch):
    from slimformer.engine import activations

    c = ActivationCache(tmp_path)
    xs = [torch.randn(3, 5) * i for i in range(7)]  # more than MAX_PENDING writes in flight
    for x in xs:
        c.append(x)
    assert len(c) == 7 and all(torch.equal(a, b) for a, b in zip(c, xs))
    assert c.nbytes() > 0
    c.close()
    assert not any(tmp_path.iterdir())

    def broken(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(activations.torch, "save", broken)
    c = ActivationCache(tmp_path)
    c.append(torch.ones(2))
    with pytest.raises(OSError, match="No space"):
        c[0]
    c.close()


def test_batch_size_does_not_change_statistics():
    lm = tiny_model("llama")
    x = _inputs(lm, n=6)
    results = []
    for bs in (1, 4):
        SEEN.clear()
        stats = {}

        def keep(ctx, cfg):
            stats[ctx.name] = ctx.stats

        register_stage(StageMethod("test-identity", IdentityConfig, apply=keep,
                                   observers=lambda c: ("hessian",)))
        run(lm, [IdentityConfig()], x, EngineOptions(batch_size=bs, progress=False))
        results.append(stats)
    register_stage(StageMethod("test-identity", IdentityConfig, apply=_identity,
                               observers=lambda c: ("hessian", "channel_norm", "abs_mean", "minmax")))
    for name in results[0]:
        for rel in results[0][name]:
            torch.testing.assert_close(results[0][name][rel]["hessian"], results[1][name][rel]["hessian"],
                                       rtol=1e-5, atol=1e-6)


def test_unmatched_target_regex_fails_before_work():
    lm = tiny_model("llama")
    SEEN.clear()
    with pytest.raises(ConfigError, match=r"targets.*re:.*nothing_here.*matches no linear"):
        run(lm, [IdentityConfig(targets=("re:.*nothing_here",))], _inputs(lm), EngineOptions(progress=False))
    from slimformer.engine import plan_stages
    from slimformer.quant import RTNConfig

    with pytest.raises(ConfigError, match=r"rtn.overrides.*c_fc"):  # gpt2 name on a llama
        plan_stages(lm, [RTNConfig(overrides={"re:.*c_fc": {"bits": 8}})])
    assert SEEN == []


def test_targets_default_ignore_and_explicit_head():
    from slimformer.engine import resolve

    lm = tiny_model("llama")
    plan = resolve(lm.model, lm.arch, IdentityConfig())
    assert len(plan.modules) == 3 * 7 and "lm_head" not in plan.modules
    assert not any("embed" in n for n in plan.modules)
    plan = resolve(lm.model, lm.arch, IdentityConfig(ignore=("re:.*\\.0\\..*",)))
    assert len(plan.modules) == 2 * 7
    plan = resolve(lm.model, lm.arch, IdentityConfig(targets=("lm_head", "re:.*down_proj")))
    assert sorted(plan.modules)[-1] == "model.layers.2.mlp.down_proj" and "lm_head" in plan.modules


def test_nan_weight_is_named():
    lm = tiny_model("opt")
    with torch.no_grad():
        lm.arch.get_blocks(lm.model)[1].fc2.weight[3, 5] = float("nan")
    with pytest.raises(SlimformerError, match=r"model\.decoder\.layers\.1\.fc2\.weight.*NaN"):
        run(lm, [IdentityConfig()], _inputs(lm), EngineOptions(progress=False))


def test_calibrated_stage_needs_samples():
    lm = tiny_model("gpt2")
    with pytest.raises(SlimformerError, match="calibration samples"):
        run(lm, [IdentityConfig()], None, EngineOptions(progress=False))


@pytest.fixture()
def llama_folder(tmp_path):
    lm = tiny_model("llama")
    d = tmp_path / "hf"
    lm.model.save_pretrained(d, max_shard_size="100KB")  # several shards + an index json
    lm.tokenizer.save_pretrained(d)
    return lm, d


def test_streaming_matches_in_memory(llama_folder):
    lm, d = llama_folder
    assert (d / "model.safetensors.index.json").exists()
    x = _inputs(lm)
    ref = run(lm, [IdentityConfig()], x, EngineOptions(batch_size=2, progress=False), keep_outputs=True)
    slm, source = build_meta_model(d)
    blocks = slm.arch.get_blocks(slm.model)
    assert all(p.is_meta for p in blocks.parameters())
    released = []

    def done(i, name, block):
        from slimformer.engine.streaming import release

        release(block)
        released.append(i)

    got = run(slm, [IdentityConfig()], x, EngineOptions(batch_size=2, progress=False), source=source,
              on_block_done=done, keep_outputs=True)
    assert released == [0, 1, 2] and all(p.is_meta for p in blocks.parameters())
    assert torch.equal(torch.cat(list(got.outputs)), torch.cat(list(ref.outputs)))


# ---------------------------------------------------------------------------------------------
# model-level stages (structured pruning, distillation) interleave with block passes


@dataclasses.dataclass(frozen=True)
class DropLastBlockConfig(StageConfig):
    """Test model stage: removes the last block; records whether it got samples and a teacher."""

    METHOD: ClassVar[str] = "test-drop-last"


MODEL_SEEN: list = []


def _drop_last(mctx, cfg):
    blocks = mctx.lm.arch.get_blocks(mctx.lm.model)
    MODEL_SEEN.append((mctx.samples is not None, mctx.teacher is not None,
                       sum(isinstance(m, type(blocks[0])) for m in mctx.teacher.modules()) if mctx.teacher else 0,
                       any("QuantLinear" in type(m).__name__ for m in mctx.lm.model.modules())))
    del blocks[len(blocks) - 1]
    mctx.lm.model.config.num_hidden_layers = len(blocks)


register_stage(StageMethod("test-drop-last", DropLastBlockConfig, apply=lambda ctx, cfg: None,
                           apply_model=_drop_last, needs_samples=lambda c: True,
                           needs_teacher=lambda c: True))


def test_model_stage_runs_in_recipe_order_between_block_passes():
    from slimformer.formats import QuantLinear
    from slimformer.quant import RTNConfig

    lm = tiny_model("llama")
    n0 = len(lm.arch.get_blocks(lm.model))
    MODEL_SEEN.clear()
    SEEN.clear()
    x = _inputs(lm)
    res = run(lm, [IdentityConfig(), DropLastBlockConfig(), RTNConfig(bits=4, group_size=16)], x,
              EngineOptions(progress=False))
    blocks = lm.arch.get_blocks(lm.model)
    assert len(blocks) == n0 - 1
    # the identity pass saw every original block before the drop; the teacher kept all blocks;
    # no block was quantized yet when the model stage ran; RTN ran afterwards on what was left
    assert len(SEEN) == n0
    assert MODEL_SEEN == [(True, True, n0, False)]
    assert all(isinstance(m, QuantLinear) for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear) or isinstance(m, QuantLinear))
    assert sum(isinstance(m, QuantLinear) for m in lm.model.modules()) == 7 * (n0 - 1)
    assert res.calibrated
    assert torch.isfinite(_logits(lm, x)).all()


def test_model_stage_without_samples_fails_clearly():
    lm = tiny_model("llama")
    with pytest.raises(SlimformerError, match="test-drop-last needs calibration samples"):
        run(lm, [DropLastBlockConfig()], None, EngineOptions(progress=False))
