"""Encoder early exit: our block-by-block pass equals HF's, thresholds behave, heads distill."""
import pytest
import torch

from slimformer.decoding.early_exit import (ExitHeads, distill_exit_heads, early_exit_predict,
                                            pooled_layer_states)
from slimformer.errors import SlimformerError
from slimformer.eval import train_logistic_probe
from slimformer.models import tiny_model

SENTS = ["a fine film", "dull and long", "x", "the best thing this year, truly", "bad"] * 4


def test_pooled_states_match_hf_hidden_states():
    lm = tiny_model("bert")
    ours = pooled_layer_states(lm, SENTS, batch_size=7)
    enc = lm.tokenizer(SENTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hs = lm.model(**enc, output_hidden_states=True).hidden_states[1:]
    m = enc["attention_mask"][..., None].float()
    ref = torch.stack([(h * m).sum(1) / m.sum(1) for h in hs])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_thresholds_and_distilled_heads():
    lm = tiny_model("bert")
    states = pooled_layer_states(lm, SENTS)
    y = torch.tensor([1, 0, 0, 1, 0] * 4)
    w, b = train_logistic_probe(states[-1], y)
    heads = distill_exit_heads(states, w, b, train_logistic_probe)
    L = states.shape[0]
    full, ex = early_exit_predict(lm, heads, SENTS, threshold=1.01)
    assert (ex == L - 1).all()
    assert torch.equal(full, (heads.prob(L - 1, states[-1]) > 0.5).long())
    _, ex = early_exit_predict(lm, heads, SENTS, threshold=0.5)
    assert (ex == 0).all()
    # a distilled head agrees with the final probe on its training data better than chance
    agree = ((heads.prob(0, states[0]) > 0.5) == (heads.prob(L - 1, states[-1]) > 0.5)).double().mean()
    assert agree > 0.6
    with pytest.raises(SlimformerError, match="threshold"):
        early_exit_predict(lm, heads, SENTS, threshold=0.3)
    with pytest.raises(SlimformerError, match="encoder"):
        pooled_layer_states(tiny_model("llama"), SENTS)
