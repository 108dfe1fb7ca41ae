"""Pruning: unstructured / N:M masks with sparse storage, structured (heads, FFN channels,
blocks) that physically shrinks, and token / KV-cache pruning at inference.

Importing this package registers the pruning stages with the engine (one import per module).
"""
from slimformer.prune import unstructured as _unstructured  # noqa: F401,E402  (magnitude, wanda, sparsegpt)
