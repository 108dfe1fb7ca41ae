"""``slimformer eval`` and ``slimformer report``: thin adapters over :mod:`slimformer.eval`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import click

from slimformer.errors import SlimformerError

log = logging.getLogger(__name__)


def _write_json(obj: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise SlimformerError(f"cannot write results to '{path}': {e.strerror or e}")


def _baseline_json_path(path: Path) -> Path:
    return path.with_name(path.stem + ".baseline" + (path.suffix or ".json"))


@click.command("eval")
@click.argument("model_arg", metavar="[DIR_OR_NAME]", required=False)
@click.option("--model", "-m", "model_opt", metavar="M",
              help="Bundled model name (smollm2-135m, minilm-l6), HF folder, .gguf file or slimformer folder.")
@click.option("--tasks", "-t", default=None, metavar="a,b,c",
              help="Comma-separated tasks (default: wikitext2:quick for causal LMs, stsb for encoders).")
@click.option("--limit", "-n", type=int, default=None, help="Only the first N items of each task (N > 0).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results as JSON here (the baseline's next to it as *.baseline.json).")
@click.option("--baseline", "-b", default=None, metavar="M2",
              help="Also evaluate this model; speed is timed against it in the same process.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--list-tasks", is_flag=True, help="List the tasks and exit.")
def eval_cmd(model_arg: Optional[str], model_opt: Optional[str], tasks: Optional[str], limit: Optional[int],
             json_path: Optional[Path], baseline: Optional[str], no_progress: bool, list_tasks: bool) -> None:
    """Evaluate a model and print a results table."""
    from slimformer.eval import TASKS, check_limit, default_tasks, evaluate, format_table, parse_tasks
    from slimformer.models import DEFAULT_MODEL, load

    if list_tasks:
        for name, task in TASKS.items():
            click.echo(f"{name:16s} {'/'.join(task.kinds):24s} {task.about}")
        return
    if model_arg and model_opt and model_arg != model_opt:
        raise SlimformerError(f"two models given ('{model_arg}' and --model '{model_opt}'); give one")
    name = model_arg or model_opt or DEFAULT_MODEL
    # validate cheap inputs before spending seconds loading weights
    check_limit(limit)
    task_list = parse_tasks(tasks) if tasks is not None else None
    show = not no_progress
    lm = load(name)
    task_list = task_list or default_tasks(lm)
    runs = []
    base_lm = None
    if baseline:
        base_lm = load(baseline)
        base_tasks = [t for t in task_list if t != "speed"]
        base_res = evaluate(base_lm, base_tasks, limit=limit, progress=show) if base_tasks else {
            "model": base_lm.name, "source": str(base_lm.source), "tasks": {}, "meta": {}}
        runs.append(base_res)
    res = evaluate(lm, task_list, limit=limit, baseline=base_lm, progress=show)
    if base_lm is not None:
        sp = res["tasks"].get("speed")
        if sp is not None:  # the baseline's own speed row comes from the same interleaved timing
            runs[0]["tasks"]["speed"] = {k[len("baseline_"):]: v for k, v in sp.items()
                                         if k.startswith("baseline_")}
    runs.append(res)
    click.echo(format_table(runs))
    if json_path is not None:
        _write_json(res, json_path)
        if base_lm is not None:
            _write_json(runs[0], _baseline_json_path(json_path))


@click.command("report")
@click.argument("results", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("report"),
              show_default=True, help="Folder for report.md and the PNG plots.")
def report_cmd(results: tuple[Path, ...], out_dir: Path) -> None:
    """Write a markdown report with plots from eval --json files."""
    from slimformer.eval.report import write_report

    path = write_report(list(results), out_dir)
    click.echo(str(path))


def register(group: click.Group) -> None:
    group.add_command(eval_cmd)
    group.add_command(report_cmd)
