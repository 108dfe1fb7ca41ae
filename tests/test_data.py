"""Shipped data and the calibration sampler."""
import hashlib

import pytest
import torch

from slimformer import data
from slimformer.errors import SlimformerError
from slimformer.models import tiny_model


def test_shipped_files_match_provenance_hashes():
    # sha256 values from files/PROVENANCE.md: the copy in the package is byte for byte the source
    expected = {
        ("wikitext-2", "wiki.test.raw"): "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
        ("wikitext-2", "wiki.valid.tokens"): "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        ("sts-b", "sts-test.csv"): "affe45928a66ee5a708531233c95b7dacbbdc57f974f002a3d32ea0180cf816a",
        ("sst-2", "dev.tsv"): "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
        ("zero-shot", "piqa.jsonl"): "d2870e73aec5154df3faf259b7700876e11608eebdf69e9d6667435673dbe4e0",
    }
    for parts, sha in expected.items():
        assert hashlib.sha256(data.data_path(*parts).read_bytes()).hexdigest() == sha, parts
    assert (data.DATA_DIR / "PROVENANCE.md").exists()
    assert (data.DATA_DIR / "sts-b" / "LICENSE.txt").exists()


def test_wikitext_protocol_string():
    text = data.wikitext2_test_text()
    assert len(text) == 1_294_336  # the GPTQ / lm-eval join, per PROVENANCE.md
    assert text.startswith("\n\n = Robert Boulter = \n")


def test_dataset_sizes():
    assert len(data.stsb("test")) == 1379
    assert len(data.sst2("dev")) == 872
    assert len(data.load_jsonl("piqa")) == 1838
    assert len(data.load_jsonl("arc_easy")) == 2376
    assert len(data.load_jsonl("lambada_openai")) == 5153


def test_calibration_is_seeded_and_shaped():
    tok = tiny_model("llama").tokenizer
    a = data.calibration_samples(tok, n=8, seq_len=64)
    b = data.calibration_samples(tok, n=8, seq_len=64)
    c = data.calibration_samples(tok, n=8, seq_len=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of the tokenized validation text
    full = data._tokenize_cached(tok, "wikitext2")
    s = full.unfold(0, 64, 1)
    assert (s == a[0]).all(dim=1).any()


def test_calibration_never_uses_test_split():
    valid = data.calibration_text("wikitext2")
    assert " = Robert Boulter = " not in valid


@pytest.mark.parametrize("source", data.CALIBRATION_SOURCES)
def test_calibration_sources(source):
    tok = tiny_model("llama").tokenizer
    assert data.calibration_samples(tok, n=2, seq_len=32, source=source).shape == (2, 32)


def test_bad_calibration_args():
    tok = tiny_model("llama").tokenizer
    with pytest.raises(SlimformerError, match="unknown calibration source"):
        data.calibration_samples(tok, source="c4")
    with pytest.raises(SlimformerError, match="n > 0"):
        data.calibration_samples(tok, n=0)
    with pytest.raises(SlimformerError, match="split"):
        data.sst2("validation")
