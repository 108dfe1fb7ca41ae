"""``evaluate(lm, tasks)``: run named tasks on a loaded model and return a JSON-able dict.

Tasks are data in ``TASKS`` (name -> which model kinds it fits, and the function to run), so a
new task is one entry. A task name may carry a variant after a colon (``wikitext2:full``).
"""
from __future__ import annotations

import datetime as _dt
import logging
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from slimformer.errors import SlimformerError
from slimformer.eval import encoders, ppl, size, speed, zeroshot
from slimformer.eval.common import check_limit

log = logging.getLogger(__name__)

CAUSAL, ENCODER, VISION = "causal-lm", "encoder", "vision"


@dataclass(frozen=True)
class Task:
    kinds: tuple[str, ...]
    run: Callable[..., dict]  # (lm, limit, baseline, show_progress) -> metrics
    about: str


def _mc(name: str) -> Task:
    return Task((CAUSAL,), lambda lm, limit, base, show: zeroshot.multiple_choice(lm, name, limit, show),
                f"{name}: zero-shot multiple choice, acc and acc_norm")


TASKS: dict[str, Task] = {
    "wikitext2:quick": Task((CAUSAL,), lambda lm, limit, base, show: ppl.wikitext2(lm, "quick", limit, show),
                            "WikiText-2 test perplexity, first 16 windows of 2048 tokens"),
    "wikitext2:full": Task((CAUSAL,), lambda lm, limit, base, show: ppl.wikitext2(lm, "full", limit, show),
                           "WikiText-2 test perplexity, all windows"),
    **{name: _mc(name) for name in zeroshot.PROMPTS},
    "lambada": Task((CAUSAL,), lambda lm, limit, base, show: zeroshot.lambada(lm, limit, show),
                    "LAMBADA (OpenAI) greedy last-word accuracy"),
    "stsb": Task((ENCODER,), lambda lm, limit, base, show: encoders.stsb(lm, limit, show_progress=show),
                 "STS-B test Spearman x100 of cosine of mean-pooled embeddings"),
    "sst2": Task((ENCODER,), lambda lm, limit, base, show: encoders.sst2(lm, limit, show_progress=show),
                 "SST-2 dev accuracy of a seeded logistic-regression probe"),
    "size": Task((CAUSAL, ENCODER, VISION), lambda lm, limit, base, show: size.size_metrics(lm),
                 "parameters, bytes in memory, bytes on disk"),
    "speed": Task((CAUSAL, ENCODER), lambda lm, limit, base, show: speed.speed_metrics(lm, base, show_progress=show),
                  "prefill latency, decode tokens/s or sentences/s, peak RSS (ratios to --baseline)"),
}
ALIASES = {"wikitext2": "wikitext2:quick", "lambada_openai": "lambada"}
DEFAULT_TASKS = {CAUSAL: ("wikitext2:quick",), ENCODER: ("stsb",), VISION: ("size",)}


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Normalise ``"a,b"`` or ``["a", "b"]`` into known task names (order kept, duplicates dropped)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for raw in items:
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in TASKS:
            raise SlimformerError(f"unknown task '{raw.strip()}'; known tasks: {', '.join(TASKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise SlimformerError(f"no task given; known tasks: {', '.join(TASKS)}")
    return out


def default_tasks(lm) -> list[str]:
    return list(DEFAULT_TASKS.get(lm.kind, ("size",)))


def _versions() -> dict:
    import transformers

    from importlib.metadata import PackageNotFoundError, version

    try:
        slim = version("slimformer")
    except PackageNotFoundError:
        slim = "unknown"
    return {"slimformer": slim, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def evaluate(lm, tasks: str | Iterable[str], limit: Optional[int] = None, baseline=None,
             progress: bool = True) -> dict:
    """Run ``tasks`` on a :class:`~slimformer.models.LoadedModel`.

    ``limit`` keeps the first N items of item-based tasks (and at most N perplexity windows);
    ``baseline`` is only used by ``speed``, which times it alongside ``lm``. Every task is
    checked against the model kind before anything runs, so a bad request fails in
    milliseconds, not after an hour of perplexity.
    """
    names = parse_tasks(tasks)
    check_limit(limit)
    for name in names:
        if lm.kind not in TASKS[name].kinds:
            raise SlimformerError(f"task '{name}' runs on {' or '.join(TASKS[name].kinds)} models, but "
                                  f"'{lm.name}' is a {lm.kind} model")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name in names:
        log.info("%s: running %s", lm.name, name)
        t0 = time.perf_counter()
        results[name] = TASKS[name].run(lm, limit, baseline, progress)
        seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("%s: %s done in %.1fs: %s", lm.name, name, seconds[name], results[name])
    return {
        "model": lm.name,
        "source": str(lm.source),
        "kind": lm.kind,
        "arch": lm.arch.name,
        "tasks": results,
        "meta": {"started": started, "seconds": seconds, "limit": limit, "threads": torch.get_num_threads(),
                 "versions": _versions(), "model_meta": _jsonable(lm.meta)},
    }


def _jsonable(obj):
    """Best-effort JSON-safe copy of model meta (a recipe may hold paths or dataclasses)."""
    import json

    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))
