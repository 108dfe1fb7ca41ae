"""Shipped evaluation and calibration data (see files/PROVENANCE.md for sources and licences)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from slimformer.errors import SlimformerError

DATA_DIR = Path(__file__).resolve().parent / "files"

ZERO_SHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "copa")
LAMBADA = "lambada_openai"


def data_path(*parts: str) -> Path:
    p = DATA_DIR.joinpath(*parts)
    if not p.exists():
        raise SlimformerError(f"shipped data file missing: {p} (reinstall slimformer)")
    return p


def wikitext2_test_text() -> str:
    """The WikiText-2 raw test split joined exactly as in the evaluation protocol.

    ``rows = [l + "\\n" if l.strip() else "" for l in raw.split("\\n")[:-1]]``,
    ``text = "\\n\\n".join(rows)`` (the GPTQ / lm-eval string).
    """
    raw = data_path("wikitext-2", "wiki.test.raw").read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    return "\n\n".join(rows)


def wikitext2_valid_text(detokenize: bool = False) -> str:
    """The tokenized WikiText-2 validation text (calibration source; never the test split)."""
    text = data_path("wikitext-2", "wiki.valid.tokens").read_text(encoding="utf-8")
    if detokenize:
        text = wikitext_detokenize(text)
    return text


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization artefacts (`` @-@ ``, spaces before punctuation)."""
    import re

    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([.,;:!?)\]'])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = text.replace(" n't", "n't").replace(" 's", "'s")
    return text


def load_jsonl(name: str) -> list[dict]:
    path = data_path("zero-shot", f"{name}.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stsb(split: str = "test") -> list[tuple[str, str, float]]:
    """(sentence1, sentence2, score 0-5) pairs; first 7 tab-separated fields only."""
    if split not in ("test", "dev"):
        raise SlimformerError(f"STS-B split must be 'test' or 'dev', not '{split}'")
    out = []
    with open(data_path("sts-b", f"sts-{split}.csv"), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 7:
                continue
            out.append((parts[5], parts[6], float(parts[4])))
    return out


def sst2(split: str = "dev") -> list[tuple[str, int]]:
    """SST-2 (sentence, label). Splits: 'dev' (GLUE dev, 872), 'train' (ALPS 90%), 'train10'."""
    files = {"dev": "dev.tsv", "train": "train_alps90.tsv", "train10": "train_alps10.tsv"}
    if split not in files:
        raise SlimformerError(f"SST-2 split must be one of {', '.join(files)}, not '{split}'")
    out = []
    with open(data_path("sst-2", files[split]), encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for row in reader:
            if len(row) >= 2:
                out.append((row[0], int(row[1])))
    return out


CALIBRATION_SOURCES = ("wikitext2", "wikitext2-detok", "sst2", "piqa", "boolq")


def calibration_text(source: str = "wikitext2") -> str:
    """Text for calibration. Never the WikiText-2 test split."""
    if source == "wikitext2":
        return wikitext2_valid_text()
    if source == "wikitext2-detok":
        return wikitext2_valid_text(detokenize=True)
    if source == "sst2":
        return "\n".join(s for s, _ in sst2("train"))
    if source in ("piqa", "boolq"):
        return "\n\n".join(r["query"] + " " + r["choices"][r["gold"]] for r in load_jsonl(source))
    raise SlimformerError(
        f"unknown calibration source '{source}'; choose from {', '.join(CALIBRATION_SOURCES)}"
    )


def calibration_samples(tokenizer, n: int = 128, seq_len: int = 512, source: str = "wikitext2",
                        seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens, shape [n, seq_len] (int64).

    Protocol: tokenize the whole source text once, then draw each window's start with
    ``torch.randint`` from ``torch.Generator().manual_seed(seed)``.
    """
    if n <= 0 or seq_len <= 0:
        raise SlimformerError(f"calibration needs n > 0 and seq_len > 0 (got n={n}, seq_len={seq_len})")
    ids = _tokenize_cached(tokenizer, source)
    if ids.numel() <= seq_len:
        raise SlimformerError(f"calibration source '{source}' has only {ids.numel()} tokens (< seq_len {seq_len})")
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, seq_len, dtype=torch.long)
    for i in range(n):
        start = int(torch.randint(0, ids.numel() - seq_len - 1, (1,), generator=g))
        out[i] = ids[start:start + seq_len]
    return out


def token_ids(tokenizer, source: str = "wikitext2") -> torch.Tensor:
    """The whole text of a calibration/training source tokenized once (1-D int64, cached).
    Never the WikiText-2 test split (see :data:`CALIBRATION_SOURCES`)."""
    return _tokenize_cached(tokenizer, source)


_TOKEN_CACHE: dict = {}


def _tokenize_cached(tokenizer, source: str) -> torch.Tensor:
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), source)
    if key not in _TOKEN_CACHE:
        text = calibration_text(source)
        _TOKEN_CACHE[key] = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    return _TOKEN_CACHE[key]
