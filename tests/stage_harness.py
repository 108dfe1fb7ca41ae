"""Run one stage on block 0 of a tiny model the way the engine does (observers -> calibrate ->
apply), for tests that compare a block's output before and after a method."""
import torch

from slimformer.engine import ActivationCache, block_forward
from slimformer.engine.runner import _calibrate, capture_block_inputs
from slimformer.engine.stage import BlockContext, method_of


def block0(lm, n=4, seq=16, batch=2):
    """Block 0 of ``lm``, its captured calibration hidden states and the other forward args."""
    samples = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))
    cache = ActivationCache(None)
    with torch.no_grad():
        rest = capture_block_inputs(lm, samples, batch, cache)
    return lm.arch.get_blocks(lm.model)[0], list(cache), rest


def block_outputs(block, states, rest):
    with torch.no_grad():
        return torch.cat([block_forward(block, h, a, kw) for h, (a, kw) in zip(states, rest)])


def apply_to_block0(lm, block, states, rest, cfg):
    """``cfg``'s stage on every default target of block 0."""
    from slimformer.engine.targets import default_target_names

    method = method_of(cfg)
    base = lm.arch.block_path(lm.model) + ".0."
    targets = {n[len(base):]: cfg for n in default_target_names(lm.model, lm.arch) if n.startswith(base)}
    ctx = BlockContext(index=0, name=base[:-1], block=block, arch=lm.arch, config=lm.model.config,
                       targets=targets)
    kinds = {rel: tuple(method.observers(c)) for rel, c in targets.items()}
    with torch.no_grad():
        if any(kinds.values()):
            ctx.stats = _calibrate(block, kinds, states, rest)
        method.apply(ctx, cfg)
