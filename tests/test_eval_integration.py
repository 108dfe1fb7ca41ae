"""slimformer.eval on the two real bundled models, kept cheap (a few windows/items each).

The thresholds are sanity floors from published numbers, not tolerances around our own
output: SmolLM2-135M-Instruct scores ~15-20 WikiText-2 PPL and ~0.65-0.70 on PIQA;
all-MiniLM-L6-v2 scores 82.0 on STS-B test. Exact agreement with an independent computation
is checked by benchmarks/verify_eval.py.
"""
from __future__ import annotations

import pytest
import torch

from slimformer.eval import evaluate, perplexity, tokenize_wikitext2
from slimformer.eval import encoders

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: on a loaded shared CPU two OpenMP threads run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_smollm2_wikitext2_two_windows(smollm2):
    ids = tokenize_wikitext2(smollm2.tokenizer)
    assert 280_000 < ids.numel() < 320_000  # ~290k SmolLM2 tokens in the joined test string
    res = perplexity(smollm2.model, ids, window=2048, max_windows=2)
    assert res["windows"] == 2 and res["window"] == 2048
    assert 8 < res["ppl"] < 30


def test_smollm2_piqa_and_lambada(smollm2):
    res = evaluate(smollm2, "piqa,lambada", limit=20, progress=False)["tasks"]
    assert res["piqa"]["n"] == 20 and res["piqa"]["acc"] >= 0.55
    assert res["lambada"]["acc"] >= 0.15  # random is ~0: the model must get some last words


def test_minilm_stsb_and_sst2(minilm, monkeypatch):
    monkeypatch.setattr(encoders, "SST2_TRAIN_SIZE", 500)
    res = evaluate(minilm, "stsb,sst2", limit=200, progress=False)["tasks"]
    assert res["stsb"]["spearman"] > 75
    assert res["sst2"]["acc"] > 0.7 and res["sst2"]["train_n"] == 500
