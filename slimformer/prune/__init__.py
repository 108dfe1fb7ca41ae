"""Pruning: unstructured / N:M masks with sparse storage, structured (heads, FFN channels,
blocks) that physically shrinks, and token / KV-cache pruning at inference.

Importing this package registers the pruning stages with the engine (one import per module).
"""
from slimformer.prune import unstructured as _unstructured  # noqa: F401,E402  (magnitude, wanda, sparsegpt)
from slimformer.prune import structured as _structured  # noqa: F401,E402  (heads, FFN channels, blocks)
from slimformer.prune import lora as _lora  # noqa: F401,E402  (recovery fine-tune: LoRA adapters merged back)
