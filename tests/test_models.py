"""Registry, tiny models, loaders and their bad-input errors."""
import struct

import pytest
import torch

from slimformer.errors import SlimformerError
from slimformer.models import ARCHITECTURES, get_module, load, tiny_model
from slimformer.models.registry import arch_for_config


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_registry_paths_resolve_on_tiny_model(arch):
    lm = tiny_model(arch)
    spec = lm.arch
    blocks = spec.get_blocks(lm.model)
    cfg = lm.model.config
    assert len(blocks) == getattr(cfg, spec.num_layers_attr)
    for block in blocks:
        for role, rel in spec.linear_names().items():
            mod = get_module(block, rel)
            assert hasattr(mod, "weight"), (arch, role)
        for rel in spec.norms:
            assert hasattr(get_module(block, rel), "weight")
    for rel in spec.embeddings:
        assert spec.resolve(lm.model, rel) is not None
    if spec.head:
        assert spec.resolve(lm.model, spec.head) is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert"])
def test_head_layout_matches_projection_shapes(arch):
    lm = tiny_model(arch)
    spec = lm.arch
    lay = spec.head_layout(lm.model.config)
    block = spec.get_blocks(lm.model)[0]
    if spec.attention.fused_qkv:
        w = get_module(block, spec.attention.fused_qkv).weight  # Conv1D [in, out]
        assert w.shape[1] == 3 * lay["num_heads"] * lay["head_dim"]
    else:
        q = get_module(block, spec.attention.q).weight
        k = get_module(block, spec.attention.k).weight
        assert q.shape[0] == lay["num_heads"] * lay["head_dim"]
        assert k.shape[0] == lay["num_kv_heads"] * lay["head_dim"]
    assert lay["num_heads"] % lay["num_kv_heads"] == 0


def test_llama_tiny_uses_grouped_query_attention():
    lay = tiny_model("llama").arch.head_layout(tiny_model("llama").model.config)
    assert lay["num_kv_heads"] < lay["num_heads"] and lay["group_size"] == 3


def test_tiny_models_are_deterministic_under_seed():
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    ids = torch.arange(20).unsqueeze(0)
    assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    c = tiny_model("llama", seed=2)
    assert not torch.equal(a.model(ids).logits, c.model(ids).logits)


def test_byte_tokenizer_round_trips_unicode():
    tok = tiny_model("llama").tokenizer
    text = "naïve café — 東京\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_unknown_model_type_is_rejected():
    class Cfg:
        model_type = "mamba"

    with pytest.raises(SlimformerError, match="unsupported model_type 'mamba'"):
        arch_for_config(Cfg())


def test_unknown_name_lists_known_names():
    with pytest.raises(SlimformerError) as e:
        load("gpt-5")
    assert "smollm2-135m" in str(e.value) and "minilm-l6" in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(SlimformerError, match="does not exist"):
        load(str(tmp_path / "nope"))


def test_folder_without_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SlimformerError, match="holds no model"):
        load(str(tmp_path))


def _save_tiny(tmp_path, arch="llama"):
    lm = tiny_model(arch)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    return lm


def test_hf_folder_round_trip_gives_identical_logits(tmp_path):
    lm = _save_tiny(tmp_path)
    back = load(str(tmp_path))
    ids = torch.arange(30).unsqueeze(0)
    assert back.arch.name == "llama"
    assert torch.equal(lm.model(ids).logits, back.model(ids).logits)
    assert back.tokenizer("ab", add_special_tokens=False).input_ids == [97, 98]


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    _save_tiny(tmp_path)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimformerError, match="truncated"):
        load(str(tmp_path))


def test_corrupt_safetensors_header(tmp_path):
    _save_tiny(tmp_path)
    st = tmp_path / "model.safetensors"
    st.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 100)
    with pytest.raises(SlimformerError, match="corrupt"):
        load(str(tmp_path))


def test_bad_gguf_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(SlimformerError, match="not a GGUF"):
        load(str(bad))
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 20)
    with pytest.raises(SlimformerError, match="corrupt or truncated|truncated"):
        load(str(trunc))


def test_non_gguf_file_path(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(SlimformerError, match="not a .gguf"):
        load(str(f))


@pytest.mark.integration
def test_truncated_real_gguf(tmp_path):
    from slimformer.models.loading import bundled_path

    src = bundled_path("smollm2-135m")
    dst = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        dst.write_bytes(f.read(src.stat().st_size // 3))
    with pytest.raises(SlimformerError, match="truncated|corrupt"):
        load(str(dst))


@pytest.mark.integration
def test_smollm2_loads_as_fp32_llama(smollm2):
    m = smollm2.model
    assert smollm2.arch.name == "llama" and smollm2.kind == "causal-lm"
    assert m.config.hidden_size == 576 and m.config.num_hidden_layers == 30
    assert smollm2.arch.head_layout(m.config) == {"num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
                                                  "group_size": 3}
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert not hasattr(m.config, "quantization_config")
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = m(ids).logits[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([nxt]).strip() == "Paris"


@pytest.mark.integration
def test_minilm_loads_as_bert_encoder(minilm):
    assert minilm.arch.name == "bert" and minilm.kind == "encoder"
    enc = minilm.tokenizer(["a cat sits", "a dog runs"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = minilm.model(**enc).last_hidden_state
    assert h.shape[-1] == 384 and torch.isfinite(h).all()
