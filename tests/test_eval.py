"""Evaluation harness on tiny random models: every task, hand-computed references, bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimformer.cli import main
from slimformer.errors import SlimformerError
from slimformer.eval import (SpeedConfig, encode_pair, evaluate, format_table, mean_pool,
                             memory_bytes, parameter_count, perplexity, rankdata, score_requests,
                             spearman, speed_metrics, train_logistic_probe)
from slimformer.eval import encoders, zeroshot
from slimformer.eval.metrics import argmax_accuracy
from slimformer.eval.report import write_report
from slimformer.eval.speed import greedy_decode
from slimformer.models import tiny_model

CAUSAL = ["llama", "gpt2", "opt"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared CI box two OpenMP threads
    competing with other jobs run ~8x slower than one; restored for later modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_runs(monkeypatch):
    """Shrink the defaults that evaluate() uses for the SST-2 probe and speed timing."""
    from slimformer.eval import speed

    monkeypatch.setattr(encoders, "SST2_TRAIN_SIZE", 200)
    monkeypatch.setattr(speed, "DEFAULT_CONFIG", SpeedConfig(prefill_tokens=128, decode_tokens=16, runs=2,
                                                             encoder_sentences=32))


@pytest.fixture(scope="module")
def tiny():
    """One tiny model per architecture, built once for the module."""
    return {a: tiny_model(a) for a in CAUSAL + ["bert", "vit"]}


# ---------------------------------------------------------------- statistics


def test_rankdata_averages_ties():
    assert rankdata(torch.tensor([10.0, 20.0, 20.0, 5.0, 20.0])).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]


def test_spearman_hand_example_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1, 3, 2, 4]: deviations from 2.5 are
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, .5, -.5, 1.5] -> rho = 4.5 / sqrt(4.5 * 5)
    rho = spearman([1, 2, 2, 3], [1, 3, 2, 4])
    assert rho == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_matches_scipy_on_tied_data():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 8, (200,), generator=g).float()  # many ties
    y = x + torch.randint(0, 5, (200,), generator=g).float()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)


def test_argmax_accuracy_first_index_wins_ties():
    assert argmax_accuracy([[0.0, 1.0], [2.0, 2.0], [3.0, 1.0]], [1, 1, 0]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- perplexity


def test_perplexity_equals_hand_computation(tiny):
    model = tiny["llama"].model
    g = torch.Generator().manual_seed(0)
    window = 64
    ids = torch.randint(0, 256, (3 * window + 17,), generator=g)  # 17 trailing tokens dropped
    res = perplexity(model, ids, window=window)
    nlls = []
    with torch.no_grad():
        for w in range(3):
            x = ids[w * window:(w + 1) * window]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), dim=-1)  # [T, V]
            nlls.append(-logp[torch.arange(window - 1), x[1:]].mean())
    expected = math.exp(float(torch.stack(nlls).mean()))
    assert res["windows"] == 3 and res["tokens"] == 3 * window
    assert res["ppl"] == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, window=window, max_windows=2)["windows"] == 2


def test_perplexity_rejects_too_short_text(tiny):
    with pytest.raises(SlimformerError, match="not one full window"):
        perplexity(tiny["gpt2"].model, torch.arange(10), window=64)


@pytest.mark.parametrize("arch", CAUSAL)
def test_wikitext2_window_capped_on_tiny(tiny, arch):
    res = evaluate(tiny[arch], "wikitext2:quick", limit=2, progress=False)["tasks"]["wikitext2:quick"]
    assert res["window"] == 512 and res["window_capped"] is True and res["windows"] == 2
    # an untrained model over ~262 byte tokens: near-uniform, nowhere near a trained LM
    assert 50 < res["ppl"] < 2000


# ---------------------------------------------------------------- zero-shot


def test_encode_pair_moves_trailing_space_to_continuation(tiny):
    tok = tiny["llama"].tokenizer
    r = encode_pair(tok, "Answer: ", "yes")
    assert bytes(r.context) == b"Answer:" and bytes(r.continuation) == b" yes"


@pytest.mark.parametrize("arch", CAUSAL)
def test_batched_scores_equal_one_by_one_and_hand_values(tiny, arch):
    lm = tiny[arch]
    reqs = [encode_pair(lm.tokenizer, c, k) for c, k in
            [("The cat sat on the", " mat"), ("Hi", " there, friend"), ("A much longer context " * 5, " x")]]
    batched = score_requests(lm.model, reqs, pad_id=256, max_batch_tokens=10_000)
    single = score_requests(lm.model, reqs, pad_id=256, max_batch=1)
    for a, b in zip(batched, single):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3) and a.greedy == b.greedy
    r = reqs[0]
    x = torch.tensor(r.context + r.continuation)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(x[None, :-1]).logits[0].double(), dim=-1)
    k = len(r.continuation)
    pos = torch.arange(len(x) - 1 - k, len(x) - 1)
    expected = float(logp[pos, x[-k:]].sum())
    assert single[0].logprob == pytest.approx(expected, abs=1e-4)
    assert single[0].greedy == bool((logp[pos].argmax(-1) == x[-k:]).all())


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward lacks ``logits_to_keep`` (as a custom wrapper might)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_scores_without_logits_to_keep_match(tiny):
    lm = tiny["opt"]
    reqs = [encode_pair(lm.tokenizer, "Question: why?\nAnswer:", c) for c in (" because", " no", " it is so")]
    kept = score_requests(lm.model, reqs, pad_id=256)
    full = score_requests(_NoLogitsToKeep(lm.model), reqs, pad_id=256)
    for a, b in zip(kept, full):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.greedy == b.greedy


def test_long_context_is_left_truncated_to_positions(tiny):
    lm = tiny["gpt2"]  # 512 positions
    req = encode_pair(lm.tokenizer, "word " * 400, "end")
    assert len(req.context) > 512
    (s,) = score_requests(lm.model, [req], pad_id=256)
    assert math.isfinite(s.logprob)


@pytest.mark.parametrize("arch", CAUSAL)
def test_every_causal_task_runs(tiny, arch):
    tasks = ["piqa", "arc_easy", "arc_challenge", "boolq", "copa", "lambada"]
    res = evaluate(tiny[arch], tasks, limit=3, progress=False)
    json.dumps(res)
    for t in tasks:
        m = res["tasks"][t]
        assert m["n"] == 3 and 0.0 <= m["acc"] <= 1.0
        if t != "lambada":
            assert 0.0 <= m["acc_norm"] <= 1.0
    assert set(res["meta"]["seconds"]) == set(tasks)


def test_multiple_choice_prompts_follow_lm_eval():
    assert zeroshot.PROMPTS["piqa"].format(query="Question: q") == "Question: q\nAnswer:"
    assert zeroshot.PROMPTS["copa"].format(query="It rained, therefore") == "It rained, therefore"


# ---------------------------------------------------------------- encoders


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_embeddings_do_not_depend_on_batching(tiny):
    lm = tiny["bert"]
    sents = ["a", "a somewhat longer sentence here", "mid length one", "b c"]
    full = encoders.embed(lm, sents, batch_size=64)
    one = encoders.embed(lm, sents, batch_size=1)
    assert torch.allclose(full, one, atol=1e-5)


def test_stsb_and_sst2_on_tiny_encoder(tiny, small_runs):
    res = evaluate(tiny["bert"], "stsb,sst2,size,speed", limit=40, progress=False)["tasks"]
    assert -100 <= res["stsb"]["spearman"] <= 100 and res["stsb"]["n"] == 40
    assert 0 <= res["sst2"]["acc"] <= 1 and res["sst2"]["n"] == 40 and res["sst2"]["train_n"] == 200
    assert res["speed"]["sentences_s"] > 0 and res["size"]["params"] > 0


def test_probe_learns_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    w1, b1 = train_logistic_probe(x, y)
    w2, b2 = train_logistic_probe(x, y)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    acc = float((encoders.predict_logistic(x, w1, b1) == y).double().mean())
    assert acc > 0.95


def test_sst2_seed_fixes_the_training_subsample(tiny):
    lm = tiny["bert"]
    a = encoders.sst2(lm, limit=30, train_size=60, seed=0, show_progress=False)
    b = encoders.sst2(lm, limit=30, train_size=60, seed=0, show_progress=False)
    assert a == b and a["train_n"] == 60


# ---------------------------------------------------------------- size and speed


def test_size_counts_tied_weights_once(tiny):
    model = tiny["llama"].model  # tie_word_embeddings=True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert parameter_count(model) == n
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory_bytes(model) == 4 * n + buffers


def test_size_of_a_saved_folder_reads_its_files(tmp_path, tiny):
    from slimformer.models import load

    tiny["gpt2"].model.save_pretrained(tmp_path)
    res = evaluate(load(tmp_path), "size", progress=False)["tasks"]["size"]
    assert res["disk_from"] == "source folder"
    # safetensors = raw tensor bytes + a small JSON header
    assert 0 <= res["disk_weight_bytes"] - res["memory_bytes"] < 64 * 1024
    mem = evaluate(tiny["gpt2"], "size", progress=False)["tasks"]["size"]
    assert mem["disk_from"] == "save_pretrained" and mem["disk_weight_bytes"] == res["disk_weight_bytes"]
    vit = evaluate(tiny["vit"], "size", progress=False)["tasks"]["size"]  # size fits every kind
    assert vit["params"] == parameter_count(tiny["vit"].model) and vit["disk_bytes"] > 0


@pytest.mark.parametrize("arch", CAUSAL)
def test_cached_greedy_decode_matches_full_recompute(tiny, arch):
    model = tiny[arch].model
    prompt = torch.tensor([[72, 101, 108, 108, 111]])
    tokens, secs = greedy_decode(model, prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokens.tolist() == seq[:, prompt.shape[1]:].tolist() and secs > 0


def test_speed_with_baseline_reports_ratios(tiny):
    cfg = SpeedConfig(prefill_tokens=64, decode_tokens=8, runs=1)
    res = speed_metrics(tiny["llama"], baseline=tiny["gpt2"], config=cfg, show_progress=False)
    for k in ("prefill_ms", "decode_tok_s", "prefill_speedup", "decode_speedup", "peak_rss_mb"):
        assert res[k] > 0
    assert res["prefill_speedup"] == pytest.approx(res["baseline_prefill_ms"] / res["prefill_ms"])
    enc = speed_metrics(tiny["bert"], config=SpeedConfig(encoder_sentences=16, runs=1), show_progress=False)
    assert enc["sentences_s"] > 0 and enc["sentences"] == 16
    with pytest.raises(SlimformerError, match="speeds do not compare"):
        speed_metrics(tiny["llama"], baseline=tiny["bert"], config=cfg)


def test_full_task_list_with_size_and_speed_is_json(tiny, small_runs):
    res = evaluate(tiny["opt"], "wikitext2,copa,size,speed", limit=2, baseline=tiny["opt"], progress=False)
    back = json.loads(json.dumps(res))
    assert back["model"] == "tiny-opt" and set(back["tasks"]) == {"wikitext2:quick", "copa", "size", "speed"}
    assert back["meta"]["versions"]["torch"].startswith("2.")


# ---------------------------------------------------------------- API errors


def test_unknown_task_lists_known_ones(tiny):
    with pytest.raises(SlimformerError, match=r"unknown task 'hellaswag'.*known tasks: .*piqa"):
        evaluate(tiny["llama"], "piqa,hellaswag")


@pytest.mark.parametrize("arch,task", [("llama", "stsb"), ("gpt2", "sst2"), ("bert", "piqa"),
                                       ("bert", "wikitext2:full"), ("vit", "speed")])
def test_task_must_fit_model_kind(tiny, arch, task):
    with pytest.raises(SlimformerError, match=f"task '{task}' runs on"):
        evaluate(tiny[arch], task)


@pytest.mark.parametrize("limit", [0, -3])
def test_nonpositive_limit_is_an_error(tiny, limit):
    with pytest.raises(SlimformerError, match="limit must be a positive"):
        evaluate(tiny["llama"], "piqa", limit=limit)


# ---------------------------------------------------------------- table, report


def _fake(name: str, ppl: float, acc: float, disk: int) -> dict:
    return {"model": name, "source": name, "tasks": {
        "wikitext2:quick": {"ppl": ppl, "windows": 16},
        "piqa": {"acc": acc, "acc_norm": acc, "n": 100},
        "size": {"params": 10, "memory_bytes": disk, "disk_bytes": disk, "disk_weight_bytes": disk}}}


def test_format_table_two_runs_has_comparison():
    out = format_table([_fake("base", 20.0, 0.60, 4 * 2 ** 20), _fake("int4", 21.5, 0.58, 2 ** 20)])
    lines = out.splitlines()
    assert "B vs A" in lines[0] and "base" in lines[0] and "int4" in lines[0]
    ppl = next(l for l in lines if " ppl " in l)
    assert "20.00" in ppl and "21.50" in ppl and "+1.50" in ppl
    disk = next(l for l in lines if "disk_bytes" in l)
    assert "x0.250" in disk and "4.0 MiB" in disk


def test_report_writes_markdown_and_plots(tmp_path):
    paths = []
    for i, r in enumerate([_fake("base", 20.0, 0.60, 4 * 2 ** 20), _fake("int4", 21.5, 0.58, 2 ** 20)]):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    report = write_report(paths, tmp_path / "out")
    text = report.read_text()
    assert "quality.png" in text and "size_vs_quality.png" in text and "| int4 |" in text
    for png in ("quality.png", "size_vs_quality.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny):
    """A tiny gpt2 saved as an HF folder with its tokenizer: loadable by path from the CLI."""
    d = tmp_path_factory.mktemp("tiny-gpt2")
    tiny["gpt2"].model.save_pretrained(d)
    tiny["gpt2"].tokenizer.save_pretrained(d)
    return d


def test_cli_eval_json_and_report(tiny_folder, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", str(tiny_folder), "--tasks", "wikitext2:quick,copa,size", "--limit", "2",
               "--json", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "wikitext2:quick" in captured.out and "copa" in captured.out
    res = json.loads(out.read_text())
    assert res["tasks"]["wikitext2:quick"]["windows"] == 2 and res["tasks"]["copa"]["n"] == 2
    assert main(["report", str(out), str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists()


def test_cli_baseline_gives_two_columns(tiny_folder, tmp_path, capsys, small_runs):
    rc = main(["eval", "--model", str(tiny_folder), "--baseline", str(tiny_folder), "--tasks", "copa,speed",
               "--limit", "2", "--json", str(tmp_path / "r.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "B vs A" in out
    prefill = next(line for line in out.splitlines() if " prefill_ms " in line)
    assert len(prefill.split()) == 5 and prefill.split()[-1].startswith("x")  # A, B and the ratio
    assert "baseline_prefill_ms" not in out
    base = json.loads((tmp_path / "r.baseline.json").read_text())
    assert base["tasks"]["speed"]["prefill_ms"] > 0 and "copa" in base["tasks"]


def _corrupt_folder(tmp_path: Path, tiny_folder: Path) -> Path:
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text((tiny_folder / "config.json").read_text())
    data = (tiny_folder / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


@pytest.mark.parametrize("case,pattern", [
    ("unknown-name", "unknown model 'no-such-model'"),
    ("missing-path", "does not exist"),
    ("empty-folder", "holds no model"),
    ("corrupt", "truncated"),
    ("unknown-task", "unknown task 'nope'"),
    ("limit-0", "limit must be a positive"),
    ("not-json", "not valid JSON"),
])
def test_cli_bad_input_is_one_line_error(case, pattern, tmp_path, tiny_folder, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    argv = {
        "unknown-name": ["eval", "no-such-model"],
        "missing-path": ["eval", "--model", str(tmp_path / "nowhere" / "model")],
        "empty-folder": ["eval", str(empty)],
        "corrupt": ["eval", str(_corrupt_folder(tmp_path, tiny_folder))],
        "unknown-task": ["eval", str(tiny_folder), "--tasks", "piqa,nope"],
        "limit-0": ["eval", str(tiny_folder), "--limit", "0"],
        "not-json": ["report", str(bad_json), "--out", str(tmp_path / "o")],
    }[case]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("error:") and pattern in err, err


def test_cli_task_kind_mismatch(tiny_folder, capsys):
    assert main(["eval", str(tiny_folder), "--tasks", "stsb"]) != 0
    assert "runs on encoder models" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_no_traceback():
    p = subprocess.run([sys.executable, "-m", "slimformer", "eval", "--model", "no-such-model", "--tasks", "piqa"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "unknown model 'no-such-model'" in p.stderr


def test_size_counts_compressed_linears_logically_and_by_held_bytes():
    """A W8A8 model keeps its parameter count; its memory counts fbgemm's packed int8 weight."""
    from slimformer import compress
    from slimformer.eval.size import memory_bytes, parameter_count

    lm = tiny_model("llama")
    n0, b0 = parameter_count(lm.model), memory_bytes(lm.model)
    q = compress(lm, "w8a8", progress=False, calibration={"samples": 2, "seq_len": 16})
    # the recipe's int8 head is its own tensor now (the embedding it was tied to stays fp32)
    head = q.model.lm_head
    assert parameter_count(q.model) == n0 + head.in_features * head.out_features
    lin_fp32 = sum(m.in_features * m.out_features * 4 for n, m in q.model.named_modules()
                   if type(m).__name__ in ("Int8Linear", "FusedInt8Slice"))  # q/k/v, gate/up fused
    # int8 weights held by fbgemm (invisible to buffers()) are counted: 1/4 of fp32 + scales
    extra = head.nbytes()
    assert b0 - 0.75 * lin_fp32 + extra <= memory_bytes(q.model) <= b0 - 0.70 * lin_fp32 + extra


def test_prefill_times_the_next_token_logits_unless_asked_for_all():
    from slimformer.eval.speed import SpeedConfig, prefill_seconds

    lm = tiny_model("llama")
    seen = []
    h = lm.model.lm_head.register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    ids = torch.randint(0, 256, (1, 9))
    prefill_seconds(lm.model, ids)
    prefill_seconds(lm.model, ids, last_logits_only=False)
    h.remove()
    assert seen[0][1] == 1 and seen[1][1] == 9  # head ran on 1 position, then on all 9
    with pytest.raises(SlimformerError, match="prefill_logits"):
        SpeedConfig(prefill_logits="some")
