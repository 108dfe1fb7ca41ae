"""``slimformer report``: a markdown report with PNG plots from saved ``--json`` results."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from slimformer.errors import SlimformerError
from slimformer.eval.table import COUNT_KEYS, format_markdown, metric_rows, value

log = logging.getLogger(__name__)

NON_QUALITY_TASKS = {"size", "speed"}
SIZE_AXES = (("size", "disk_weight_bytes"), ("size", "disk_bytes"), ("size", "memory_bytes"),
             ("size", "params"))
LOWER_IS_BETTER = {"ppl"}


def load_results(paths: list[str | Path]) -> list[dict]:
    """Read result JSON files, failing with one line that names the bad file."""
    if not paths:
        raise SlimformerError("report needs at least one results JSON file")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise SlimformerError(f"results file '{p}' does not exist")
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SlimformerError(f"results file '{p}' is not valid JSON ({e.__class__.__name__})")
        if not isinstance(r, dict) or not isinstance(r.get("tasks"), dict):
            raise SlimformerError(f"results file '{p}' is not a slimformer eval result (no 'tasks')")
        out.append(r)
    return out


def quality_rows(results: list[dict]) -> list[tuple[str, str]]:
    return [(t, m) for t, m in metric_rows(results) if t not in NON_QUALITY_TASKS and m not in COUNT_KEYS]


def _size_axis(results: list[dict]) -> Optional[tuple[str, str]]:
    for axis in SIZE_AXES:
        if all(value(r, *axis) is not None for r in results):
            return axis
    return None


def _labels(results: list[dict]) -> list[str]:
    names = [str(r.get("model", i)) for i, r in enumerate(results)]
    return names if len(set(names)) == len(names) else [f"{n} [{i + 1}]" for i, n in enumerate(names)]


def _grid(plt, n: int, height: float):
    """A figure with up to three panels a row for ``n`` panels."""
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    return plt.subplots(nrows, cols, figsize=(4.2 * cols, height * nrows), squeeze=False)


def _save(plt, fig, axes, used: int, path: Path) -> None:
    """Blank the unused panels, write the PNG and free the figure."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(results: list[dict], path: Path) -> bool:
    """One bar chart per quality metric, one bar per run. False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = quality_rows(results)
    if not rows:
        return False
    labels = _labels(results)
    fig, axes = _grid(plt, len(rows), 3.2)
    for ax, (task, metric) in zip(axes.flat, rows):
        vals = [value(r, task, metric) for r in results]
        bars = ax.bar(range(len(vals)), [v if v is not None else 0 for v in vals], color="tab:blue")
        ax.bar_label(bars, labels=["-" if v is None else f"{v:.4g}" for v in vals], fontsize=7)
        ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
        arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{task} {metric} ({arrow})", fontsize=9)
    _save(plt, fig, axes, len(rows), path)
    return True


def plot_size_quality(results: list[dict], path: Path) -> bool:
    """Size (x) against each quality metric (y), one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = _size_axis(results)
    rows = quality_rows(results)
    if axis is None or not rows:
        return False
    labels = _labels(results)
    fig, axes = _grid(plt, len(rows), 3.4)
    scale, unit = (2 ** 20, "MiB") if axis[1].endswith("_bytes") else (1e6, "M")
    for ax, (task, metric) in zip(axes.flat, rows):
        for r, lab in zip(results, labels):
            y = value(r, task, metric)
            if y is None:
                continue
            x = value(r, *axis) / scale
            ax.scatter([x], [y])
            ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.margins(0.2)
        ax.set_xlabel(f"{axis[1]} ({unit})", fontsize=8)
        ax.set_ylabel(f"{task} {metric}", fontsize=8)
    _save(plt, fig, axes, len(rows), path)
    return True


def write_report(paths: list[str | Path], out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` (+ ``quality.png``, ``size_vs_quality.png``); return its path."""
    results = load_results(paths)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlimformerError(f"--out '{out}' exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# slimformer evaluation report", "", "| run | model | source |", "|---|---|---|"]
    for lab, r, p in zip(_labels(results), results, paths):
        lines.append(f"| {lab} | {r.get('model', '?')} | `{r.get('source', '?')}` ({Path(p).name}) |")
    lines += ["", "## Results", "", format_markdown(results), ""]
    if plot_quality(results, out / "quality.png"):
        lines += ["## Quality per run", "", "![quality per run](quality.png)", ""]
    else:
        lines += ["_No quality metrics in these results: no quality plot._", ""]
    if plot_size_quality(results, out / "size_vs_quality.png"):
        lines += ["## Size vs quality", "", "![size vs quality](size_vs_quality.png)", ""]
    else:
        lines += ["_Size vs quality needs the `size` task and a quality task in every run._", ""]
    versions = results[0].get("meta", {}).get("versions", {})
    if versions:
        lines += ["Versions (first run): " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    log.info("wrote %s", report)
    return report
