"""Invariants of the quantization primitives: bit-exact packing, SQNR floors, value formats."""
import pytest
import torch

from slimformer.errors import ConfigError
from slimformer.primitives.affine import (NF4_CODEBOOK, QuantSpec, compute_qparams, dequantize,
                                          dequantize_scales, fake_quantize, fake_quantize_columns,
                                          quantize, quantize_columns, quantize_per_token_int8,
                                          quantize_scales, sqnr_db)
from slimformer.primitives.packing import pack, pack_codes, packed_cols, unpack, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 7, 8, 96, 577])
def test_pack_unpack_bit_exact(bits, cols):
    c = torch.randint(0, 1 << bits, (5, cols), dtype=torch.uint8)
    p = pack(c, bits)
    assert p.dtype == torch.uint8 and p.shape == (5, packed_cols(cols, bits))
    assert torch.equal(unpack(p, bits, cols), c)


def test_pack_layout_int4_two_per_byte():
    assert pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x43]]
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]], dtype=torch.uint8), 4)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_signed_codes_pack_round_trip(sym, bits):
    spec = QuantSpec(bits=bits, symmetric=sym, group_size=32)
    qt = quantize(torch.randn(8, 100), spec)
    assert int(qt.codes.min()) >= spec.qmin and int(qt.codes.max()) <= spec.qmax
    assert torch.equal(unpack_codes(pack_codes(qt.codes, spec), spec, 100), qt.codes)


@pytest.mark.parametrize("sym", [True, False])
def test_sqnr_floor_rises_with_bits(sym):
    w = torch.randn(128, 512)
    prev = -1.0
    for bits in range(2, 9):
        s = sqnr_db(w, fake_quantize(w, QuantSpec(bits=bits, symmetric=sym, group_size=64)))
        # uniform quantizer: ~6 dB per bit; floors leave margin for the Gaussian tails
        assert s > 6.0 * bits - 7.5, (bits, s)
        assert s > prev + 4.0, (bits, s, prev)
        prev = s


def test_asymmetric_beats_symmetric_on_shifted_data():
    w = torch.rand(64, 256)  # all positive: symmetric wastes half its codes
    sym = sqnr_db(w, fake_quantize(w, QuantSpec(bits=4, symmetric=True, group_size=64)))
    asym = sqnr_db(w, fake_quantize(w, QuantSpec(bits=4, symmetric=False, group_size=64)))
    assert asym > sym + 4.0
    qt = quantize(w, QuantSpec(bits=4, symmetric=False, group_size=64))
    assert qt.zero is not None and qt.codes.dtype == torch.uint8
    assert quantize(w, QuantSpec(bits=4)).zero is None


@pytest.mark.parametrize("cols,g", [(96, 64), (576, 128), (100, 7)])
def test_partial_last_group(cols, g):
    w = torch.randn(16, cols)
    w[:, -1] = 50.0  # a huge value in the partial last group must only affect that group
    spec = QuantSpec(bits=4, group_size=g)
    scale, zero = compute_qparams(w, spec)
    n = -(-cols // g)
    assert scale.shape == (16, n) and zero is None
    deq = dequantize(quantize(w, spec))
    assert deq.shape == w.shape
    head = (n - 1) * g
    assert sqnr_db(w[:, :head], deq[:, :head]) > 17.0
    assert torch.allclose(deq[:, -1], w[:, -1], rtol=0.07)


@pytest.mark.parametrize("gran", ["tensor", "channel", "token", "group"])
def test_granularity_shapes(gran):
    w = torch.randn(6, 40)
    s, _ = compute_qparams(w, QuantSpec(bits=8, granularity=gran, group_size=16))
    assert s.shape == {"tensor": (1, 1), "channel": (6, 1), "token": (6, 1), "group": (6, 3)}[gran]
    assert sqnr_db(w, fake_quantize(w, QuantSpec(bits=8, granularity=gran, group_size=16))) > 35


def test_symmetric_scales_are_exact_minmax():
    w = torch.randn(32, 128) * 1e-3
    spec = QuantSpec(bits=4, group_size=32)
    s, _ = compute_qparams(w, spec)
    amax = w.abs().reshape(32, 4, 32).amax(-1)
    assert torch.equal(s, amax / 7.5)  # no rounding of the scale (ties must stay ties)


def test_ties_round_half_to_even_not_toward_zero():
    # weights on a grid whose points fall exactly on rounding ties (as in GGUF-derived models):
    # an unbiased rounding keeps the mean magnitude; a rounded-up scale would shrink them all
    s = 2.0 ** -6  # a power of two: every w / s below is an exact tie k + 0.5
    w = (torch.arange(-7, 8, dtype=torch.float32) + 0.5).repeat(4, 1)[:, :14] * s
    w[:, 0] = -7.5 * s  # absmax -> scale exactly s
    qt = quantize(w, QuantSpec(bits=4, granularity="channel"))
    assert torch.equal(qt.scale, torch.full((4, 1), s))
    bias = (dequantize(qt).abs() - w.abs()).mean()
    assert abs(float(bias)) < 0.1 * s


def test_column_helpers_match_full_quantization():
    w = torch.randn(8, 200)
    spec = QuantSpec(bits=3, symmetric=False, group_size=64)
    qt = quantize(w, spec)
    full = dequantize(qt)
    parts = [quantize_columns(w[:, a:a + 50], qt.scale, qt.zero, spec, a, 200) for a in range(0, 200, 50)]
    assert torch.equal(torch.cat(parts, 1), qt.codes)
    fq = fake_quantize_columns(w[:, 130:170], qt.scale, qt.zero, spec, 130, 200)
    assert torch.equal(fq, full[:, 130:170])


def test_nf4_codebook_and_double_quant():
    assert NF4_CODEBOOK.shape == (16,) and NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[15] == 1
    assert NF4_CODEBOOK[7] == 0 and bool((NF4_CODEBOOK.diff() > 0).all())
    w = torch.randn(64, 512)
    qt = quantize(w, QuantSpec(format="nf4", group_size=64))
    assert torch.equal(dequantize(qt)[qt.codes == 7], torch.zeros(int((qt.codes == 7).sum())))
    s_nf4 = sqnr_db(w, dequantize(qt))
    s_int4 = sqnr_db(w, fake_quantize(w, QuantSpec(bits=4, group_size=64)))
    assert s_nf4 > s_int4  # NF4 is the better 4-bit grid for Gaussian weights
    dq = quantize(w, QuantSpec(format="nf4", group_size=64, double_quant=True))
    assert dq.dq_scale["codes"].dtype == torch.int8
    assert torch.equal(dequantize_scales(dq.dq_scale), dq.scale)  # storage reproduces it exactly
    rel = ((dq.scale - qt.scale).abs() / qt.scale).max()
    assert rel < 0.02 and sqnr_db(w, dequantize(dq)) > s_nf4 - 0.3
    again = quantize_scales(torch.rand(3, 700) + 0.1)
    assert again["absmax"].numel() == 9


def test_fp8_round_trip():
    w = torch.randn(32, 128)
    qt = quantize(w, QuantSpec(bits=8, format="fp8_e4m3", granularity="channel"))
    deq = dequantize(qt)
    assert sqnr_db(w, deq) > 28
    exact = qt.codes.view(torch.float8_e4m3fn).float() * qt.scale
    assert torch.equal(deq, exact)
    # a value already on the fp8 grid survives unchanged
    g = torch.tensor([[448.0, -2.0, 0.5, 0.0]])
    assert torch.equal(dequantize(quantize(g, QuantSpec(bits=8, format="fp8_e4m3", granularity="channel"))), g)


def test_per_token_int8():
    x = torch.randn(16, 96)
    x[3] *= 100  # one outlier token
    q, s = quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and s.shape == (16, 1)
    assert sqnr_db(x[0], (q * s)[0]) > 38  # other tokens keep their resolution


@pytest.mark.parametrize("bad,field", [({"bits": 1}, "bits"), ({"bits": 9}, "bits"),
                                       ({"group_size": 0}, "group_size"),
                                       ({"format": "int3"}, "format"),
                                       ({"granularity": "row"}, "granularity"),
                                       ({"format": "nf4", "bits": 3}, "bits"),
                                       ({"double_quant": True}, "double_quant")])
def test_bad_spec_names_field(bad, field):
    with pytest.raises(ConfigError, match=f"QuantSpec.{field}"):
        QuantSpec(**bad)


def test_spec_dict_round_trip():
    s = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=96)
    assert QuantSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="bitz"):
        QuantSpec.from_dict({"bitz": 4})


def test_nan_is_named():
    from slimformer.errors import SlimformerError

    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(SlimformerError, match="NaN"):
        quantize(w, QuantSpec(bits=4, group_size=8))
