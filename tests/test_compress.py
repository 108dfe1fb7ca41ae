"""compress(): methods through the engine vs applied directly, streaming vs in memory, the
output folder contract (refuse, atomic, byte-identical)."""
import copy
import hashlib
from pathlib import Path

import pytest
import torch

import slimformer
from slimformer.compress import CalibrationConfig
from slimformer.errors import ConfigError, SlimformerError
from slimformer.models import tiny_model
from slimformer.quant import RTNConfig, W8A8Config

CAL = CalibrationConfig(samples=4, seq_len=32, batch_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n=3, seq=24):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def _logits(lm, x):
    with torch.no_grad():
        return lm.model(input_ids=x, use_cache=False).logits


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rtn_through_engine_equals_direct(arch):
    from slimformer.formats import QuantLinear, linear_weight
    from slimformer.models import set_module
    from slimformer.primitives.affine import quantize

    cfg = RTNConfig(bits=4, group_size=32, symmetric=False, overrides={"re:.*\\.1\\..*": {"bits": 6}})
    lm = tiny_model(arch)
    direct = copy.deepcopy(lm.model)
    from slimformer.engine import resolve

    plan = resolve(direct, lm.arch, cfg)
    for name, c in plan.modules.items():
        mod = direct.get_submodule(name)
        set_module(direct, name, QuantLinear.from_quantized(quantize(linear_weight(mod), c.spec()), mod.bias))
    out = slimformer.compress(lm, cfg, calibration=CAL, progress=False)
    assert out is lm
    for name, c in plan.modules.items():
        got = lm.model.get_submodule(name)
        assert isinstance(got, QuantLinear)
        assert got.spec.bits == (6 if ".1." in name else 4)
    x = _ids()
    with torch.no_grad():  # as _logits: autograd forwards take SDPA, not the attention kernel
        want = direct(input_ids=x, use_cache=False).logits
    assert torch.equal(_logits(lm, x), want)


def test_w8a8_static_scales_come_from_calibration():
    from slimformer.formats import Int8Linear

    lm = tiny_model("llama")
    ref = copy.deepcopy(lm)
    from slimformer.compress import calibration_inputs

    x = calibration_inputs(ref, CAL)
    q = ref.model.model.layers[0].self_attn.q_proj
    seen = []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    with torch.no_grad():
        ref.model(input_ids=x, use_cache=False)
    h.remove()
    slimformer.compress(lm, "w8a8-static", calibration=CAL, progress=False)
    mod = lm.model.model.layers[0].self_attn.q_proj
    assert isinstance(mod, Int8Linear)
    torch.testing.assert_close(mod.act_scale.reshape(()), torch.stack(seen).max() / 127)
    assert all(isinstance(lm.model.model.layers[i].mlp.down_proj, Int8Linear) for i in range(3))


def test_w8a8_dynamic_close_to_fp32():
    lm = tiny_model("opt")
    x = _ids()
    ref = _logits(lm, x)
    slimformer.compress(lm, "w8a8-plain", progress=False)
    got = _logits(lm, x)
    err = (got - ref).pow(2).mean() / ref.pow(2).mean()
    assert err < 1e-3  # ~30 dB SQNR on the logits of a random model


def test_streaming_equals_in_memory(tmp_path):
    src = tiny_model("llama")
    d = tmp_path / "hf"
    src.model.save_pretrained(d, max_shard_size="100KB")
    src.tokenizer.save_pretrained(d)
    x = _ids()
    mem = slimformer.compress(tiny_model("llama"), "w4-g64", progress=False)
    streamed = slimformer.compress(str(d), "w4-g64", stream=True, progress=False)
    assert torch.equal(_logits(streamed, x), _logits(mem, x))


def test_streaming_static_calibration_equals_in_memory(tmp_path):
    src = tiny_model("llama")
    d = tmp_path / "hf"
    src.model.save_pretrained(d, max_shard_size="100KB")
    src.tokenizer.save_pretrained(d)
    x = _ids()
    lm = tiny_model("llama")
    lm.tokenizer = src.tokenizer
    mem = slimformer.compress(lm, "w8a8-static", calibration=CAL, progress=False)
    streamed = slimformer.compress(str(d), "w8a8-static", calibration=CAL, stream=True, progress=False)
    assert torch.equal(_logits(streamed, x), _logits(mem, x))


def test_unmatched_regex_fails_before_any_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="matches no linear"):
        slimformer.compress(tiny_model("gpt2"), RTNConfig(targets=("re:.*q_proj",)), out_dir=out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SlimformerError, match="already exists.*overwrite"):
        slimformer.compress(tiny_model("gpt2"), "w4-g64", out_dir=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_compress_leaves_no_folder(tmp_path, monkeypatch):
    import slimformer.quant.rtn as rtn

    calls = []

    def boom(module, cfg):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return module

    monkeypatch.setattr(rtn, "rtn_linear", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        slimformer.compress(tiny_model("llama"), "w4-g64", out_dir=out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder left either


def test_saved_output_is_byte_identical_and_overwrite_works(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    slimformer.compress(tiny_model("llama"), "w8a8-static", out_dir=a, calibration=CAL, progress=False)
    slimformer.compress(tiny_model("llama"), "w8a8-static", out_dir=b, calibration=CAL, progress=False)
    da, db = _tree_digest(a), _tree_digest(b)
    assert da and da == db
    slimformer.compress(tiny_model("llama"), "w4-g128", out_dir=a, overwrite=True, progress=False)
    assert _tree_digest(a) != da
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp/old folders left


def test_save_load_round_trip_logits(tmp_path):
    lm = slimformer.compress(tiny_model("llama"), "w4-g64", out_dir=tmp_path / "o", progress=False)
    back = slimformer.load(tmp_path / "o")
    x = _ids()
    assert torch.equal(_logits(back, x), _logits(lm, x))
    assert back.meta.get("recipe", {}).get("stages", [{}])[0].get("method") == "rtn"


def test_cli_compress_refuses_and_writes(tmp_path):
    from slimformer.cli import main

    out = tmp_path / "o"
    out.mkdir()
    assert main(["compress", "--model", "nonexistent-xyz", "--recipe", "w4-g64", "--out", str(out)]) == 2
    assert main(["compress", "--recipe", "w9", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


def test_streamed_output_written_block_by_block(tmp_path):
    import json

    src = tiny_model("llama")
    d = tmp_path / "hf"
    src.model.save_pretrained(d, max_shard_size="100KB")
    src.tokenizer.save_pretrained(d)
    out = tmp_path / "out"
    mem = slimformer.compress(tiny_model("llama"), "w8a8-plain", progress=False)
    try:
        slimformer.compress(str(d), "w8a8-plain", out_dir=out, stream=True, progress=False)
    except SlimformerError as e:  # only the final reload may fail (see below)
        if "model.safetensors" not in str(e):
            raise
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 + 1  # one shard per block, one for the rest
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]
    doc = json.loads((out / "slimformer.json").read_text())
    assert len(doc["modules"]) == 3 * 7 and doc["meta"]["recipe"]["stages"][0]["method"] == "w8a8"
    # every stored tensor equals what the in-memory save would store for that module
    from slimformer.engine.streaming import SafetensorsSource
    from slimformer.formats.serialize import _module_tensors

    src = SafetensorsSource(out)
    for name in doc["modules"]:
        want, _ = _module_tensors(name, mem.model.get_submodule(name))
        for k, t in want.items():
            assert torch.equal(src.get(k, t.dtype), t), k
    back = slimformer.load(out)
    x = _ids()
    assert torch.equal(_logits(back, x), _logits(mem, x))


def test_cli_compress_with_eval_table(tmp_path, capsys):
    import json

    from slimformer.cli import main

    src = tiny_model("llama")
    d = tmp_path / "hf"
    src.model.save_pretrained(d)
    src.tokenizer.save_pretrained(d)
    out, js = tmp_path / "o", tmp_path / "r.json"
    rc = main(["compress", "--model", str(d), "--recipe", "w8a8-static", "--out", str(out), "--eval", "wikitext2",
               "--limit", "1", "--json", str(js), "--calib-samples", "4", "--calib-len", "32", "--no-progress"])
    assert rc == 0
    assert (out / "slimformer.json").exists()
    table = capsys.readouterr().out
    assert "wikitext2" in table and table.count("\n") >= 3
    res = json.loads(js.read_text())
    before = res["before"]["tasks"]["wikitext2:quick"]["ppl"]
    after = res["after"]["tasks"]["wikitext2:quick"]["ppl"]
    assert 0 < before and abs(after / before - 1) < 0.05  # int8 barely moves a tiny model's PPL
    assert main(["compress", "--model", str(d), "--recipe", "w8a8", "--out", str(out)]) == 2  # exists


HEAD_RECIPE = "version: 1\nstages: [{method: w8a8}]\nhead: int8"


def test_int8_head_saves_reloads_and_keeps_the_embedding(tmp_path):
    from slimformer.formats import QuantLinear

    src = tiny_model("llama")
    emb = src.model.model.embed_tokens.weight.detach().clone()
    plain = slimformer.compress(tiny_model("llama"), "w8a8-plain", progress=False)
    lm = slimformer.compress(tiny_model("llama"), HEAD_RECIPE, out_dir=tmp_path / "o", progress=False)
    head = lm.model.lm_head
    assert isinstance(head, QuantLinear) and head.spec.bits == 8 and head.spec.granularity == "channel"
    assert head.nbytes() < emb.numel() * 4 / 3.5  # int8 codes + one scale per row
    # the tied input embedding keeps its fp32 values; only the head is quantized
    assert torch.equal(lm.model.model.embed_tokens.weight, emb)
    assert lm.model.config.tie_word_embeddings is False
    x = _ids()
    y, y_plain = _logits(lm, x), _logits(plain, x)
    assert not torch.equal(y, y_plain)
    assert float((y - y_plain).abs().max() / y_plain.abs().max()) < 0.02  # weight-only int8: close
    back = slimformer.load(tmp_path / "o")
    assert isinstance(back.model.lm_head, QuantLinear)
    assert torch.equal(back.model.model.embed_tokens.weight, emb)
    assert torch.equal(_logits(back, x), y)
    assert back.meta["recipe"]["head"] == "int8"


def test_int8_head_streamed_equals_in_memory(tmp_path):
    src = tiny_model("llama")
    d = tmp_path / "hf"
    src.model.save_pretrained(d, max_shard_size="100KB")
    src.tokenizer.save_pretrained(d)
    mem = slimformer.compress(tiny_model("llama"), HEAD_RECIPE, progress=False)
    streamed = slimformer.compress(str(d), HEAD_RECIPE, out_dir=tmp_path / "s", stream=True, progress=False)
    x = _ids()
    assert torch.equal(_logits(streamed, x), _logits(mem, x))


def test_int8_head_is_skipped_on_an_encoder_and_refused_on_a_quantized_head():
    from slimformer.formats import QuantLinear
    from slimformer.quant.head import quantize_head

    lm = slimformer.compress(tiny_model("bert"), HEAD_RECIPE, progress=False)  # w8a8 still applies
    assert not any(isinstance(m, QuantLinear) for m in lm.model.modules())
    with pytest.raises(SlimformerError, match="causal LM"):
        quantize_head(tiny_model("bert"), "int8")
    dec = tiny_model("llama")
    quantize_head(dec, "int8")
    with pytest.raises(SlimformerError, match="not a plain nn.Linear"):
        quantize_head(dec, "int8")
    with pytest.raises(SlimformerError, match="unknown format"):
        quantize_head(tiny_model("llama"), "int3")
