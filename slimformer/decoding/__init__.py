"""Fast generation: our own decode loop over a static KV cache, speculative sampling
(model drafts, prompt lookup, early-exit self-drafts) and early exit."""
from slimformer.decoding.generate import GenerationResult, generate
from slimformer.decoding.runner import CausalRunner
from slimformer.decoding.sampling import GREEDY, SamplingConfig

__all__ = ["GenerationResult", "generate", "CausalRunner", "SamplingConfig", "GREEDY"]
