"""Evaluation: perplexity, zero-shot tasks, sentence embeddings, size and speed.

``evaluate(lm, tasks)`` is the entry point; the task functions are importable on their own
for code that wants one number (``perplexity(model, ids)``, ``spearman(x, y)``).
"""
from slimformer.eval.common import check_limit, max_positions
from slimformer.eval.encoders import embed, mean_pool, predict_logistic, train_logistic_probe
from slimformer.eval.harness import DEFAULT_TASKS, TASKS, default_tasks, evaluate, parse_tasks
from slimformer.eval.metrics import pearson, rankdata, spearman
from slimformer.eval.ppl import perplexity, tokenize_wikitext2
from slimformer.eval.size import memory_bytes, parameter_count, size_metrics
from slimformer.eval.speed import SpeedConfig, speed_metrics
from slimformer.eval.table import format_markdown, format_table
from slimformer.eval.zeroshot import Request, encode_pair, score_requests

__all__ = ["check_limit", "max_positions", "embed", "mean_pool", "predict_logistic",
           "train_logistic_probe", "DEFAULT_TASKS", "TASKS", "default_tasks", "evaluate", "parse_tasks",
           "pearson", "rankdata", "spearman", "perplexity", "tokenize_wikitext2", "memory_bytes",
           "parameter_count", "size_metrics", "SpeedConfig", "speed_metrics", "format_markdown",
           "format_table", "Request", "encode_pair", "score_requests"]
