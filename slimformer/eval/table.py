"""Turn result dicts into rows and render them as a terminal or markdown table.

Rows are ``task.metric``, columns are runs; with exactly two runs a last column compares the
second with the first: a ratio for size/speed (what "2.1x smaller" means) and a difference
for quality metrics (what "-0.8 points" means).
"""
from __future__ import annotations

from typing import Optional

HIDDEN = {"nll", "tokens", "window", "threads", "decode_tokens", "prefill_tokens", "sentences",
          "train_n"}
RATIO_SUFFIXES = ("_bytes", "_ms", "_tok_s", "sentences_s", "_mb", "params")
COUNT_KEYS = {"n", "windows"}


def metric_rows(results: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs with a numeric value in any run, in first-seen order.

    With several runs the ``baseline_*`` speed keys are left out: the baseline has its own
    column then.
    """
    rows: list[tuple[str, str]] = []
    for r in results:
        for task, metrics in r.get("tasks", {}).items():
            for key, v in metrics.items():
                if key in HIDDEN or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if len(results) > 1 and key.startswith("baseline_"):
                    continue
                if (task, key) not in rows:
                    rows.append((task, key))
    return rows


def value(result: dict, task: str, metric: str) -> Optional[float]:
    v = result.get("tasks", {}).get(task, {}).get(metric)
    return None if isinstance(v, bool) or not isinstance(v, (int, float)) else v


def fmt(metric: str, v: Optional[float]) -> str:
    """Human formatting: bytes in MiB, counts with separators, floats at useful precision."""
    if v is None:
        return "-"
    if metric.endswith("_bytes"):
        return f"{v / 2 ** 20:,.1f} MiB"
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a >= 1e7:
        return f"{v:.3e}"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def compare(metric: str, a: Optional[float], b: Optional[float]) -> str:
    """Second run vs first: ``x ratio`` for size/speed, signed difference for quality."""
    if a is None or b is None or metric in COUNT_KEYS:
        return ""
    if metric.endswith(RATIO_SUFFIXES) or metric.endswith("_speedup"):
        return f"x{b / a:.3f}" if a else ""
    d = b - a
    return ("+" if d >= 0 else "") + fmt(metric, d)


def _headers(results: list[dict]) -> list[str]:
    names = [str(r.get("model", f"run{i}")) for i, r in enumerate(results)]
    if len(set(names)) < len(names):
        names = [f"{n} [{i + 1}]" for i, n in enumerate(names)]
    return names


def table_cells(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["task", "metric"] + _headers(results)
    two = len(results) == 2
    if two:
        header.append("B vs A")
    body = []
    for task, metric in metric_rows(results):
        vals = [value(r, task, metric) for r in results]
        row = [task, metric] + [fmt(metric, v) for v in vals]
        if two:
            row.append(compare(metric, vals[0], vals[1]))
        body.append(row)
    return header, body


def format_table(results: list[dict] | dict) -> str:
    """A fixed-width table for the terminal."""
    results = [results] if isinstance(results, dict) else results
    header, body = table_cells(results)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    numeric = [i >= 2 for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in body])


def format_markdown(results: list[dict]) -> str:
    header, body = table_cells(results)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)
