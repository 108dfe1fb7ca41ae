"""Tiny randomly initialised models of every registered architecture, for tests.

Each comes with a byte-level tokenizer (256 byte tokens + specials, no merges) so the whole
evaluation stack can run on it exactly as on a real model.
"""
from __future__ import annotations

import torch

from slimformer.errors import SlimformerError

BYTE_VOCAB = 256
SPECIALS = ["<pad>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
TINY_VOCAB = BYTE_VOCAB + len(SPECIALS)


def _byte_symbols() -> dict[int, str]:
    """The byte -> printable symbol table that byte-level BPE uses (GPT-2's convention):
    printable latin-1 bytes stand for themselves, the rest map to code points 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer(kind: str = "causal-lm"):
    """A fast HF tokenizer over raw UTF-8 bytes (ids 0..255), specials after them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    # order the byte symbols by the byte they stand for, so id == byte value
    b2u = _byte_symbols()
    vocab = {b2u[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    for i, s in enumerate(SPECIALS):
        vocab[s] = BYTE_VOCAB + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if kind != "causal-lm":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", unk_token=None,
    )
    return fast


def tiny_config(arch: str):
    """A small HF config of the architecture (2-4 blocks, hidden 64, odd sizes on purpose)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig, ViTConfig

    specials = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}
    if arch == "llama":
        # hidden 96 (not a power of two) and 6 heads / 2 KV heads: grouped-query attention
        return LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=160,
                           num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                           **specials)
    if arch == "gpt2":
        return GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=192,
                          n_positions=512, **specials)
    if arch == "opt":
        return OPTConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=160, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512,
                         word_embed_proj_dim=64, **specials)
    if arch == "bert":
        return BertConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                          pad_token_id=256)
    if arch == "vit":
        return ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                         intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_labels=10)
    raise SlimformerError(f"no tiny config for architecture '{arch}'")


def tiny_model(arch: str, seed: int = 0):
    """A :class:`LoadedModel` with random weights (deterministic under ``seed``)."""
    from transformers import AutoModel, AutoModelForCausalLM, ViTForImageClassification

    from slimformer.models.loading import LoadedModel
    from slimformer.models.registry import ARCHITECTURES

    spec = ARCHITECTURES[arch]
    cfg = tiny_config(arch)
    torch.manual_seed(seed)
    if spec.kind == "causal-lm":
        model = AutoModelForCausalLM.from_config(cfg)
    elif spec.kind == "vision":
        model = ViTForImageClassification(cfg)
    else:
        model = AutoModel.from_config(cfg)
    model.eval()
    tok = None if spec.kind == "vision" else byte_tokenizer(spec.kind)
    return LoadedModel(model=model, tokenizer=tok, arch=spec, name=f"tiny-{arch}",
                       source=f"tiny:{arch}")
