"""The observer layer against direct computations over all tokens."""
import torch
import torch.nn as nn

from slimformer.observers import (AbsMeanObserver, ChannelNormObserver, HessianObserver, MinMaxObserver,
                                  attach)


def _chunks(x, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(x[i:i + s])
        i += s
    return out


def test_hessian_is_2xtx_over_n_for_any_batching():
    torch.manual_seed(0)
    x = torch.randn(10, 13, 24) * torch.linspace(0.1, 5, 24)  # [batch, seq, in]
    flat = x.reshape(-1, 24).double()
    want = (2 * flat.T @ flat / flat.shape[0]).float()
    for sizes in ([10], [1] * 10, [3, 7], [2, 5, 3]):
        h = HessianObserver()
        for part in _chunks(x, sizes):
            h.observe(part)
        torch.testing.assert_close(h.result(), want, rtol=1e-5, atol=1e-5)
        assert h.tokens == 130


def test_hessian_scale_independent_of_sample_count():
    torch.manual_seed(0)
    x = torch.randn(4000, 8)
    a, b = HessianObserver(), HessianObserver()
    a.observe(x[:400])
    b.observe(x)
    # the same distribution: a mean, not a sum, so 10x the data gives the same scale
    assert abs(a.result().diag().mean() / b.result().diag().mean() - 1) < 0.1


def test_channel_stats_match_direct():
    torch.manual_seed(1)
    x = torch.randn(3, 11, 16) * 3 - 1
    flat = x.reshape(-1, 16)
    n, am, mm = ChannelNormObserver(), AbsMeanObserver(), MinMaxObserver()
    for part in (x[:1], x[1:]):
        for o in (n, am, mm):
            o.observe(part)
    torch.testing.assert_close(n.result(), flat.norm(dim=0))
    torch.testing.assert_close(am.result(), flat.abs().mean(0))
    r = mm.result()
    assert torch.equal(r["min"], flat.amin(0)) and torch.equal(r["max"], flat.amax(0))
    assert r["absmax"] == flat.abs().max()


def test_half_inputs_accumulate_in_fp32():
    x = torch.randn(64, 8)
    h16, h32 = HessianObserver(), HessianObserver()
    h16.observe(x.half())
    h32.observe(x.half().float())
    assert h16.result().dtype == torch.float32
    torch.testing.assert_close(h16.result(), h32.result())


def test_attach_hooks_and_detach():
    lin = nn.Linear(6, 4)
    x = torch.randn(2, 5, 6)
    with attach({"l": lin}, {"l": ("hessian", "minmax")}) as obs:
        lin(x)
        res = obs.results()["l"]
    assert not lin._forward_pre_hooks  # detached on exit
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(res["hessian"], 2 * flat.T @ flat / 10)
    lin(x)  # no observer left behind
