"""Distillation: pure losses (hand-computable numbers), the shared training loop (exact resume),
layer-drop students, sequence-level / black-box KD data and the ``distill`` recipe stage — all on
tiny random models."""
import math

import pytest
import torch

from slimformer.distill import (TokenBatches, TrainConfig, attention_kl, forward_kl, generalized_jsd,
                                hint_loss, kd_loss, layer_map, lm_loss, reverse_kl, train,
                                value_relation_kl)
from slimformer.errors import ConfigError, SlimformerError
from slimformer.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(*rows):
    """Logits whose softmax is the given probability rows: log p."""
    return torch.tensor(rows, dtype=torch.float64).log()[None]  # [1, T, V]


# ---- losses ------------------------------------------------------------------------------------

def test_kl_of_a_distribution_with_itself_is_zero():
    z = torch.randn(2, 5, 11)
    for T in (1.0, 3.0):
        assert forward_kl(z, z, T).abs() < 1e-6
        assert reverse_kl(z, z, T).abs() < 1e-6
        assert generalized_jsd(z, z, 0.5, T).abs() < 1e-6


def test_forward_and_reverse_kl_are_asymmetric_by_hand():
    # teacher p = (0.5, 0.5), student q = (0.9, 0.1)
    p, q = _logits([0.5, 0.5]), _logits([0.9, 0.1])
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p||q) = 0.5108
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(q||p) = 0.3681
    assert float(forward_kl(q, p)) == pytest.approx(fwd, abs=1e-6)
    assert float(reverse_kl(q, p)) == pytest.approx(rev, abs=1e-6)
    assert abs(fwd - rev) > 0.1


def test_jsd_symmetric_at_half_bounded_by_log2_and_limits_are_the_kls():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 7, generator=g) * 4, torch.randn(3, 4, 7, generator=g) * 4
    j_ab, j_ba = generalized_jsd(a, b, 0.5), generalized_jsd(b, a, 0.5)
    assert float(j_ab) == pytest.approx(float(j_ba), rel=1e-5)
    # disjoint one-hot distributions reach the bound log 2 exactly
    big = torch.tensor([[[50.0, -50.0]]]), torch.tensor([[[-50.0, 50.0]]])
    assert float(generalized_jsd(*big, 0.5)) == pytest.approx(math.log(2), abs=1e-6)
    for beta in (0.1, 0.5, 0.9):
        assert 0 <= float(generalized_jsd(a, b, beta)) <= math.log(2) + 1e-6
    # documented end points: beta 0 = forward KL, beta 1 = reverse KL, and the small-beta limit
    assert torch.equal(generalized_jsd(a, b, 0.0), forward_kl(a, b))
    assert torch.equal(generalized_jsd(a, b, 1.0), reverse_kl(a, b))
    a, b, eps = a.double() / 4, b.double() / 4, 1e-6
    assert float(generalized_jsd(a, b, eps)) / eps == pytest.approx(float(forward_kl(a, b)), rel=1e-3)
    assert float(generalized_jsd(a, b, 1 - eps)) / eps == pytest.approx(float(reverse_kl(a, b)), rel=1e-3)


def test_temperature_gradient_is_t_times_softened_difference_and_t_independent_at_high_t():
    g = torch.Generator().manual_seed(2)
    zt = torch.randn(1, 3, 50, generator=g, dtype=torch.float64)
    zs0 = torch.randn(1, 3, 50, generator=g, dtype=torch.float64)
    grads = {}
    for T in (1.0, 4.0, 200.0, 400.0):
        zs = zs0.clone().requires_grad_(True)
        forward_kl(zs, zt, T).backward()
        # d/dz_s [T² KL(p_T||q_T)] averaged over 3 tokens = T (q_T - p_T) / 3
        want = T * ((zs0 / T).softmax(-1) - (zt / T).softmax(-1)) / 3
        assert torch.allclose(zs.grad, want, atol=1e-12)
        grads[T] = zs.grad
    # high-T limit: (centred z_s - centred z_t) / (V * tokens), the same at T=200 and T=400
    c = lambda z: z - z.mean(-1, keepdim=True)
    limit = (c(zs0) - c(zt)) / 50 / 3
    assert (grads[400.0] - limit).norm() < 0.01 * limit.norm()
    assert grads[200.0].norm() / grads[400.0].norm() == pytest.approx(1.0, abs=0.01)
    # without the T² factor the gradient would shrink 4x from T=200 to T=400
    assert (grads[200.0].norm() / 200 ** 2) / (grads[400.0].norm() / 400 ** 2) == pytest.approx(4.0, rel=0.01)


def test_masked_tokens_do_not_count():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    t2 = t.clone()
    t2[0, 3:] = 100 * torch.randn(3, 9)  # garbage under the mask changes nothing
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        a, b = kd_loss(s, t, kind, mask=mask), kd_loss(s, t2, kind, mask=mask)
        assert torch.equal(a, b)
    # the mean is over the 9 real tokens, not per row
    per = torch.stack([forward_kl(s[i:i + 1, j:j + 1], t[i:i + 1, j:j + 1]) for i in range(2) for j in range(6)])
    keep = mask.flatten().bool()
    assert float(forward_kl(s, t, mask=mask)) == pytest.approx(float(per[keep].mean()), rel=1e-5)


def test_lm_loss_is_next_token_cross_entropy():
    g = torch.Generator().manual_seed(4)
    z, ids = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    want = torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert float(lm_loss(z, ids)) == pytest.approx(float(want), rel=1e-6)


def test_hint_attention_and_value_relation_losses():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 4, 8, generator=g)
    assert float(hint_loss(h, h)) == 0.0
    assert float(hint_loss(h, h + 1.0)) == pytest.approx(1.0)
    proj = torch.nn.Linear(8, 12)
    assert hint_loss(h, torch.randn(2, 4, 12), proj=proj).requires_grad
    with pytest.raises(SlimformerError, match="projection"):
        hint_loss(h, torch.randn(2, 4, 12))
    a = torch.randn(2, 3, 4, 4, generator=g).softmax(-1)
    b = torch.randn(2, 3, 4, 4, generator=g).softmax(-1)
    assert float(attention_kl(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_kl(a, b)) > 0
    # value relation: widths may differ (8 vs 16) as long as both have the same head count
    v_s, v_t = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 16, generator=g)
    assert float(value_relation_kl(v_s, v_s, 2)) == pytest.approx(0.0, abs=1e-6)
    assert float(value_relation_kl(v_s, v_t, 2)) > 0


def test_layer_map_as_data():
    assert layer_map(3, 6) == ((0, 1), (1, 3), (2, 5))
    assert layer_map(15, 30)[-1] == (14, 29)
    assert layer_map(4, 6, "uniform")[-1] == (3, 5)
    with pytest.raises(SlimformerError):
        layer_map(4, 6)


# ---- the training loop ---------------------------------------------------------------------------

def _data(n=12, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: a repeated byte string with random offsets
    base = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 8))
    starts = torch.randint(0, 40, (n,), generator=g)
    return torch.stack([base[s:s + seq] for s in starts.tolist()])


def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="train.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="train.kd_loss.*forward_kl"):
        TrainConfig(kd_loss="kl")
    with pytest.raises(ConfigError, match="train.checkpoint_dir"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ConfigError, match="train.warmup"):
        TrainConfig(steps=5, warmup=6)


def test_token_batches_are_a_pure_function_of_the_index():
    w = torch.arange(40).view(10, 4)
    a = TokenBatches(w, batch_size=3, seed=7)
    first = [next(iter(a))["input_ids"] for _ in range(5)]
    b = TokenBatches(w, batch_size=3, seed=7)
    b.load_state_dict({"position": 2, "seed": 7, "batch_size": 3, "n": 10})
    assert torch.equal(next(iter(b))["input_ids"], first[2])
    # one epoch (3 batches of 3 from 10 windows) draws no window twice
    rows = torch.cat([a.batch(k)["input_ids"][:, 0] for k in range(3)])
    assert rows.unique().numel() == 9


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    x = _data()
    cfg = dict(steps=6, lr=3e-3, batch_size=4, warmup=2, seed=3, progress=False, eval_every=2)
    evalf = lambda m: float(lm_loss(m(input_ids=x[:2]).logits, x[:2]))

    full = tiny_model("llama", seed=1)
    log_full = train(full.model, x, TrainConfig(**cfg), eval_fn=evalf)

    part = tiny_model("llama", seed=1)
    ck = str(tmp_path / "ck")
    log_a = train(part.model, x, TrainConfig(**cfg, checkpoint_dir=ck, checkpoint_every=2, stop_after=3), eval_fn=evalf)
    assert log_a.stopped_early and log_a.steps == [1, 2, 3]
    fresh = tiny_model("llama", seed=99)  # a different model: everything must come from the checkpoint
    log_b = train(fresh.model, x, TrainConfig(**cfg, checkpoint_dir=ck, checkpoint_every=2), eval_fn=evalf,
                  resume=True)
    assert log_b.resumed_from == 3 and log_b.trained_steps == 6 and log_b.seconds >= log_a.seconds
    assert log_b.loss == log_full.loss and log_b.lr == log_full.lr
    assert log_b.evals == log_full.evals
    for (n, p), q in zip(full.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(p, q), n


def test_kd_loss_decreases_and_lm_finetune_learns():
    x = _data(n=16)
    teacher = tiny_model("llama", seed=0)
    cfg = TrainConfig(steps=1, lr=1e-3, batch_size=4, progress=False)
    train(teacher.model, x, TrainConfig(steps=30, lr=3e-3, batch_size=4, progress=False), loss="lm")
    student = tiny_model("llama", seed=5)
    probe = lambda m: float(forward_kl(m(input_ids=x).logits, teacher.model(input_ids=x).logits))
    tl = train(student.model, x, TrainConfig(steps=25, lr=3e-3, batch_size=4, progress=False), loss="kd",
               teacher=teacher.model, eval_fn=probe)
    assert tl.evals[-1][1] < 0.5 * tl.evals[0][1]
    assert sum(tl.loss[-5:]) < sum(tl.loss[:5])
    with pytest.raises(SlimformerError, match="teacher"):
        train(student.model, x, cfg, loss="kd")


def test_custom_loss_module_parameters_are_trained():
    x = _data(n=8)
    lm = tiny_model("llama", seed=0)
    target = torch.randn(4, 16, 24)

    class Hint(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(96, 24)

        def forward(self, student, batch, teacher):
            h = student(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
            return hint_loss(h, target, self.proj)

    loss = Hint()
    w0 = loss.proj.weight.detach().clone()
    train(lm.model, x, TrainConfig(steps=3, lr=1e-2, batch_size=4, progress=False), loss=loss)
    assert not torch.equal(w0, loss.proj.weight)


# ---- students ------------------------------------------------------------------------------------

def test_keep_indices_rules():
    from slimformer.distill import keep_indices

    assert keep_indices(30, 15, "every-other") == tuple(range(1, 30, 2))
    u = keep_indices(30, 15)
    assert u[0] == 0 and u[-1] == 29 and len(set(u)) == 15
    assert keep_indices(6, 3, "first") == (0, 1, 2)
    with pytest.raises(SlimformerError):
        keep_indices(6, 4, "every-other")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_layer_drop_student_is_initialised_from_kept_blocks_and_reloads(arch, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    import slimformer
    from slimformer.distill import layer_drop_student, save_student
    from slimformer.distill.students import drop_layers

    t = tiny_model(arch)
    n = len(t.arch.get_blocks(t.model))
    keep = (0, n - 1)
    s = layer_drop_student(t, list(keep))
    blocks = s.arch.get_blocks(s.model)
    assert len(blocks) == 2 and getattr(s.model.config, s.arch.num_layers_attr) == 2
    for i, k in enumerate(keep):
        for (name, p), q in zip(blocks[i].state_dict().items(), t.arch.get_blocks(t.model)[k].state_dict().values()):
            assert torch.equal(p, q), name
    assert len(t.arch.get_blocks(t.model)) == n  # the teacher is untouched
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = s.model(input_ids=x)
    out = save_student(s, tmp_path / "student")
    again = slimformer.load(out)
    hf = (AutoModelForCausalLM if arch == "llama" else AutoModel).from_pretrained(str(out))
    with torch.no_grad():
        for m in (again.model, hf.eval()):
            got = m(input_ids=x)
            key = "logits" if arch == "llama" else "last_hidden_state"
            assert torch.allclose(getattr(got, key), getattr(ref, key), atol=1e-5)
    # dropping every block but the first of the teacher keeps the first block's output
    if arch == "llama":
        one = drop_layers(t.model, t.arch, [0])
        assert [m.layer_idx for m in one.modules() if isinstance(getattr(m, "layer_idx", None), int)] == [0]


def test_layer_drop_student_generates_with_kv_cache():
    """The KV cache is indexed by layer_idx: a student keeping blocks (1, 2) must renumber them."""
    from slimformer.decoding import generate
    from slimformer.distill import layer_drop_student

    s = layer_drop_student(tiny_model("llama"), [1, 2])
    res = generate(s, "hello", max_new_tokens=5, stop_on_eos=False)
    # greedy decode with the cache equals argmax of a full forward on the growing prefix
    ids = s.tokenizer("hello", add_special_tokens=False).input_ids
    for tok in res.tokens[0]:
        with torch.no_grad():
            nxt = int(s.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        assert nxt == tok
        ids.append(tok)


# ---- representation (hint + attention) loss --------------------------------------------------

def test_representation_loss_trains_a_bert_student_toward_the_teacher():
    from slimformer.distill import RepresentationLoss, layer_drop_student, use_eager_attention

    t = tiny_model("bert")
    s = layer_drop_student(tiny_model("bert", seed=7), [0])  # another model's block: far from the teacher
    use_eager_attention(t.model)
    use_eager_attention(s.model)
    x = _data(n=8)
    batch = {"input_ids": x[:4], "attention_mask": torch.ones_like(x[:4])}
    loss = RepresentationLoss(t.arch, 64, 64, pairs=[(0, 1)], n_heads=4, attention="kl", vr_weight=1.0)
    # a student identical to the teacher's kept block, compared with that block: zero loss
    same = RepresentationLoss(t.arch, 64, 64, pairs=[(0, 0)], n_heads=4, vr_weight=1.0)
    s0 = layer_drop_student(t, [0])
    use_eager_attention(s0.model)
    with torch.no_grad():
        assert float(same(s0.model, batch, t.model)) == pytest.approx(0.0, abs=1e-6)
        before = float(loss(s.model, batch, t.model))
    train(s.model, x, TrainConfig(steps=20, lr=3e-3, batch_size=4, progress=False), loss=loss, teacher=t.model)
    with torch.no_grad():
        assert float(loss(s.model, batch, t.model)) < 0.5 * before
    # widths differ: the learnable projection is used and trained
    wide = RepresentationLoss(t.arch, 64, 32, pairs=[(0, 1)], n_heads=4, attention="none")
    assert wide.proj is not None and len(wide.proj) == 1


# ---- sequence-level / black-box KD data ------------------------------------------------------

def test_teacher_corpus_is_prompt_plus_teacher_text_and_seeded():
    from slimformer.distill.seqkd import teacher_batches, teacher_corpus

    t = tiny_model("llama")
    prompts = _data(n=3, seq=8)
    rows, mask = teacher_corpus(t, prompts, max_new_tokens=6, seed=1)
    again, _ = teacher_corpus(t, prompts, max_new_tokens=6, seed=1)
    assert rows.shape == (3, 14) and torch.equal(rows, again)
    assert torch.equal(rows[:, :8], prompts) and bool(mask[:, :9].all())
    from slimformer.decoding import SamplingConfig

    greedy, gmask = teacher_corpus(t, prompts, max_new_tokens=6, sampling=SamplingConfig())
    with torch.no_grad():  # greedy continuation: each token is the teacher's argmax
        nxt = t.model(input_ids=greedy[:, :8]).logits[:, -1].argmax(-1)
    assert torch.equal(greedy[:, 8], nxt)
    # black-box KD: plain LM loss on teacher text lowers the student's NLL of that text
    data = teacher_batches(t, _data(n=8, seq=16), batch_size=4, prompt_len=8, max_new_tokens=8, seed=0)
    s = tiny_model("llama", seed=3)
    nll = lambda m: float(lm_loss(m(input_ids=data.windows).logits, data.windows, data.mask).detach())
    before = nll(s.model)
    train(s.model, data, TrainConfig(steps=15, lr=3e-3, batch_size=4, progress=False), loss="lm")
    assert nll(s.model) < before


# ---- the recipe stage ----------------------------------------------------------------------------

def test_distill_config_validates_and_round_trips_yaml():
    from slimformer.distill import DistillConfig
    from slimformer.recipe import Recipe, load_recipe

    with pytest.raises(ConfigError, match="distill.loss"):
        DistillConfig(loss="kl")
    with pytest.raises(ConfigError, match="distill.steps"):
        DistillConfig(steps=0)
    with pytest.raises(ConfigError, match="distill.data"):
        DistillConfig(data="wikitext2-test")
    cfg = DistillConfig(kd_loss="jsd", beta=0.3, temperature=2.0, steps=7)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg


def test_distill_stage_recovers_a_layer_dropped_model_in_a_recipe():
    """[drop a block, distill]: the distill stage trains the student against the model as it was
    before the recipe (the engine's teacher) and brings its logits closer."""
    import dataclasses
    from typing import ClassVar

    from slimformer.distill import DistillConfig
    from slimformer.engine import EngineOptions, StageConfig, StageMethod, register_stage, run
    from slimformer.distill.students import drop_layers

    @dataclasses.dataclass(frozen=True)
    class DropBlock(StageConfig):
        METHOD: ClassVar[str] = "test-distill-drop-block"

    def drop(mctx, cfg):
        mctx.lm.model = drop_layers(mctx.lm.model, mctx.lm.arch, [0, 2])

    register_stage(StageMethod("test-distill-drop-block", DropBlock, apply=lambda c, f: None, apply_model=drop,
                               needs_teacher=lambda c: True))
    lm = tiny_model("llama")
    teacher = tiny_model("llama")
    x = _data(n=16, seq=32)
    gap = lambda: float(forward_kl(lm.model(input_ids=x).logits, teacher.model(input_ids=x).logits))
    run(lm, [DropBlock()], x, EngineOptions(progress=False))
    with torch.no_grad():
        before = gap()
    lm = tiny_model("llama")
    run(lm, [DropBlock(), DistillConfig(steps=30, lr=3e-3, batch_size=4, seq_len=16)], x, EngineOptions(progress=False))
    assert len(lm.arch.get_blocks(lm.model)) == 2
    with torch.no_grad():
        assert gap() < 0.7 * before


def test_cli_distill_saves_a_loadable_student(tmp_path):
    import json

    import slimformer
    from slimformer.cli import main
    from slimformer.distill import save_student

    teacher_dir = save_student(tiny_model("llama"), tmp_path / "teacher")
    out = tmp_path / "student"
    rc = main(["distill", "--teacher", str(teacher_dir), "--student", "layers:2", "--loss", "kd", "--steps", "3",
               "--lr", "1e-3", "--batch-size", "2", "--seq-len", "32", "--out", str(out), "--no-progress",
               "--json", str(tmp_path / "log.json")])
    assert rc == 0
    s = slimformer.load(out)
    assert len(s.arch.get_blocks(s.model)) == 2
    log = json.loads((tmp_path / "log.json").read_text())
    assert len(log["train"]["loss"]) == 3
    # an existing output folder is refused before any work; a bad student spec names itself
    assert main(["distill", "--teacher", str(teacher_dir), "--student", "layers:2", "--out", str(out)]) == 2
    assert main(["distill", "--teacher", str(teacher_dir), "--student", "layers:x", "--out",
                 str(tmp_path / "o2")]) == 2


def test_distill_after_quantization_trains_only_the_targeted_norms():
    """[rtn, distill(targets norms)] (recipe w4-g64-kd on a tiny model): gradients flow through
    the packed int4 linears, only the norms move, and the KD gap to the fp32 model shrinks."""
    from slimformer.engine import EngineOptions, run
    from slimformer.formats import QuantLinear
    from slimformer.recipe import load_recipe
    import dataclasses

    rec = load_recipe("w4-g64-kd")
    rtn, distill = rec.stages
    distill = dataclasses.replace(distill, steps=20, lr=1e-2, seq_len=16, batch_size=4)
    rtn = dataclasses.replace(rtn, group_size=16)
    x = _data(n=16, seq=32)
    ref = tiny_model("llama")
    gap = lambda m: float(forward_kl(m(input_ids=x).logits, ref.model(input_ids=x).logits))
    a, b = tiny_model("llama"), tiny_model("llama")
    run(a, [rtn], x, EngineOptions(progress=False))
    run(b, [rtn, distill], x, EngineOptions(progress=False))
    assert any(isinstance(m, QuantLinear) for m in b.model.modules())
    sa, sb = a.model.state_dict(), b.model.state_dict()
    moved = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert moved and all("norm" in k for k in moved)
    with torch.no_grad():
        assert gap(b.model) < gap(a.model)


# ---- the real bundled models (slower) --------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_half_depth_student_saves_reloads_and_one_kd_step_lowers_the_kd_loss(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    import slimformer
    from slimformer.data import calibration_samples
    from slimformer.distill import layer_drop_student, save_student

    s = layer_drop_student(smollm2, 15)
    assert len(s.arch.get_blocks(s.model)) == 15 and s.meta["kept_blocks"][0] == 0
    x = calibration_samples(smollm2.tokenizer, n=2, seq_len=64, source="wikitext2-detok")
    with torch.no_grad():
        ref = s.model(input_ids=x).logits
        t_logits = smollm2.model(input_ids=x).logits
    out = save_student(s, tmp_path / "s15")
    with torch.no_grad():
        assert torch.allclose(slimformer.load(out).model(input_ids=x).logits, ref, atol=1e-4)
        hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # SDPA, not our kernel
        assert torch.allclose(hf(input_ids=x).logits, ref, atol=1e-3)
    before = float(forward_kl(ref, t_logits))
    train(s.model, x, TrainConfig(steps=2, lr=1e-4, batch_size=2, seq_len=64, progress=False), loss="kd",
          teacher=smollm2.model)
    with torch.no_grad():
        assert float(forward_kl(s.model(input_ids=x).logits, t_logits)) < before


@pytest.mark.integration
def test_minilm_three_block_student_attention_transfer_loss_is_finite(minilm):
    from slimformer.distill import RepresentationLoss, layer_drop_student, use_eager_attention
    import copy

    teacher = copy.deepcopy(minilm.model)
    s = layer_drop_student(minilm, 3, "every-other")
    assert s.meta["kept_blocks"] == [1, 3, 5]
    use_eager_attention(teacher)
    use_eager_attention(s.model)
    enc = minilm.tokenizer(["a man is playing a guitar .", "the cat sat on the mat"], padding=True,
                           return_tensors="pt")
    loss = RepresentationLoss(minilm.arch, 384, 384, layer_map(3, 6), 12, vr_weight=1.0)
    with torch.no_grad():
        v = loss(s.model, dict(enc), teacher)
    assert torch.isfinite(v) and float(v) > 0
