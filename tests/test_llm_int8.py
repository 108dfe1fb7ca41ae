"""LLM.int8(): exact 16-bit outlier columns, an int8 part that IS Int8Linear, calibration through
the engine, save -> load with identical logits."""
import pytest
import torch
import torch.nn as nn

from slimformer.errors import ConfigError
from slimformer.formats import Int8Linear, load_compressed, quantized_nbytes, save_compressed
from slimformer.formats.outlier import Int8OutlierLinear
from slimformer.models import tiny_model
from slimformer.primitives.affine import QuantSpec, quantize, sqnr_db
from slimformer.quant import LLMInt8Config, W8A8Config
from slimformer.quant.llm_int8 import llm_int8_linear, outlier_columns
from slimformer.recipe import Recipe, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

W8 = QuantSpec(bits=8, symmetric=True, granularity="channel")


def _layer_and_inputs(n=48, k=64, m=37, outliers=(3, 17, 40)):
    """A linear and inputs whose ``outliers`` columns are 20-60x larger than the rest."""
    lin = nn.Linear(k, n)
    x = torch.randn(m, k)
    for j, c in enumerate(outliers):
        x[:, c] *= 20.0 + 20 * j
    absmax = x.abs().amax(0)
    return lin, x, absmax


def test_outlier_columns_from_threshold():
    a = torch.tensor([0.5, 7.0, 6.0, 6.5, -9.0, 100.0])
    assert outlier_columns(a, 6.0).tolist() == [1, 3, 5]  # strictly greater; -9 is not an absmax
    assert outlier_columns(a, 1e9).numel() == 0


def test_outlier_part_exact_and_int8_part_is_int8linear():
    lin, x, absmax = _layer_and_inputs()
    m = llm_int8_linear(lin, absmax, LLMInt8Config(threshold=6.0))
    idx = m.outlier_idx.long()
    assert idx.tolist() == [3, 17, 40]
    keep = torch.ones(64, dtype=torch.bool)
    keep[idx] = False
    with torch.no_grad():
        # outlier part: only 16-bit weight storage, fp32 compute -- no quantization at all
        w16 = lin.weight[:, idx].half()
        assert torch.equal(m.outlier_weight, w16)
        assert torch.equal(m.outlier_part(x), x[:, idx] @ w16.float().t())
        exact = x[:, idx].double() @ lin.weight[:, idx].double().t()
        assert (m.outlier_part(x).double() - exact).abs().max() <= 2e-3 * exact.abs().max()
        # regular part: exactly what Int8Linear computes on the non-outlier columns
        ref8 = Int8Linear.from_quantized(quantize(lin.weight[:, keep], W8), None)
        assert torch.equal(m.regular_part(x), ref8(x[:, keep]))
        # the module is the sum of the two parts plus the bias
        assert torch.equal(m(x), m.regular_part(x) + m.outlier_part(x) + lin.bias)
        # and that is far closer to fp32 than W8A8 over all columns (outliers set every token's scale)
        fp = lin(x)
        plain = Int8Linear.from_quantized(quantize(lin.weight, W8), lin.bias)(x)
        assert sqnr_db(fp, m(x)) > sqnr_db(fp, plain) + 10


def test_zero_outliers_is_int8linear_and_all_outliers_is_fp16():
    lin, x, _ = _layer_and_inputs()
    none = llm_int8_linear(lin, torch.zeros(64), LLMInt8Config(threshold=6.0))
    with torch.no_grad():
        assert none.outlier_idx.numel() == 0
        assert torch.equal(none(x), Int8Linear.from_quantized(quantize(lin.weight, W8), lin.bias)(x))
        every = llm_int8_linear(lin, torch.full((64,), 10.0), LLMInt8Config(threshold=6.0))
        assert every.int8 is None
        assert torch.equal(every(x), x @ lin.weight.half().float().t() + lin.bias)


def test_bytes_count_int8_and_fp16_parts():
    lin, _, absmax = _layer_and_inputs(n=96, k=128)
    m = llm_int8_linear(lin, absmax, LLMInt8Config())
    n_o = m.outlier_idx.numel()
    held, fp32 = quantized_nbytes(nn.Sequential(m))
    # int8 regular weights (+ fbgemm's column offsets) + fp16 outlier columns + indices + scales/bias
    assert held >= 96 * (128 - n_o) + 2 * 96 * n_o
    assert held < 0.3 * fp32


@pytest.mark.parametrize("bad, field", [({"threshold": -1.0}, "llm_int8.threshold"),
                                        ({"threshold": True}, "llm_int8.threshold"),
                                        ({"outlier_dtype": "float32"}, "llm_int8.outlier_dtype")])
def test_config_validation_names_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        LLMInt8Config(**bad)


def _tiny_with_outlier_channel():
    """Tiny llama whose block-0 attention input has one channel ~40x larger (a norm weight)."""
    lm = tiny_model("llama")
    lm.model.model.layers[0].input_layernorm.weight.data[5] = 40.0
    return lm


def test_engine_decides_outliers_from_calibration_and_round_trips(tmp_path):
    from slimformer.compress import compress

    ids = torch.randint(0, 256, (2, 19))
    ref_lm = _tiny_with_outlier_channel()
    with torch.no_grad():
        ref = ref_lm.model(ids).logits
    cal = {"samples": 4, "seq_len": 32}
    lm = compress(_tiny_with_outlier_channel(), load_recipe("llm-int8"), out_dir=tmp_path / "m",
                  calibration=cal, progress=False)
    q = lm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Int8OutlierLinear) and 5 in q.outlier_idx.tolist()
    # the decision is the observed activation range, not the weights: block 1 has no such channel
    assert 5 not in lm.model.model.layers[1].self_attn.q_proj.outlier_idx.tolist()
    w8 = compress(_tiny_with_outlier_channel(), W8A8Config(), calibration=cal, progress=False)
    with torch.no_grad():
        out = lm.model(ids).logits
        assert sqnr_db(ref, out) > sqnr_db(ref, w8.model(ids).logits)
        back = load_compressed(tmp_path / "m")
        assert isinstance(back.model.model.layers[0].self_attn.q_proj, Int8OutlierLinear)
        assert torch.equal(back.model(ids).logits, out)
    # a second save of the reloaded model is byte-identical on disk
    save_compressed(back, tmp_path / "again")
    assert (tmp_path / "m/model.safetensors").read_bytes() == (tmp_path / "again/model.safetensors").read_bytes()


def test_recipe_round_trip():
    r = load_recipe("llm-int8")
    assert r.needs_calibration and r.stages[0] == LLMInt8Config(threshold=6.0)
    assert Recipe.from_yaml(r.to_yaml()) == r


@pytest.mark.integration
def test_minilm_llm_int8_keeps_embeddings(minilm):
    """Real MiniLM layer 0 inputs: LLM.int8 stays close to fp32 on a few sentences."""
    import copy

    from slimformer.compress import compress

    lm = copy.deepcopy(minilm)
    enc = lm.tokenizer(["A man is playing a guitar.", "The cat sits on the mat."], return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        ref = lm.model(**enc).last_hidden_state
        q = compress(lm, "llm-int8", calibration={"samples": 8, "seq_len": 128}, progress=False)
        out = q.model(**enc).last_hidden_state
    assert sqnr_db(ref, out) > 20
