"""``slimformer compress`` and ``slimformer recipes``: thin adapters over
:func:`slimformer.compress.compress` and :mod:`slimformer.recipe`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import click

from slimformer.errors import SlimformerError

log = logging.getLogger(__name__)


@click.command("compress")
@click.option("--model", "-m", default=None, metavar="M",
              help="Bundled name, HF folder or .gguf file (default: the bundled default model).")
@click.option("--recipe", "-r", default=None, metavar="R",
              help="Named recipe (see `slimformer recipes`) or a YAML file (default: w4-g64).")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (refused if it exists, unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once done).")
@click.option("--eval", "eval_tasks", default=None, metavar="a,b,c",
              help="Evaluate the original and the compressed model and print a before/after table.")
@click.option("--limit", type=int, default=None, help="With --eval: first N items of each task.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the before/after results (or the compression summary) as JSON.")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--calib-len", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calib-source", default="wikitext2", show_default=True, help="Calibration text source.")
@click.option("--seed", type=int, default=0, show_default=True, help="Calibration sampling seed.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration batch size.")
@click.option("--offload", is_flag=True, help="Keep calibration activations on disk between blocks.")
@click.option("--stream", is_flag=True,
              help="Stream weights block by block from an HF safetensors folder (models larger than RAM).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def compress_cmd(model: Optional[str], recipe: Optional[str], out_dir: Path, overwrite: bool,
                 eval_tasks: Optional[str], limit: Optional[int], json_path: Optional[Path],
                 calib_samples: int, calib_len: int, calib_source: str, seed: int, batch_size: int,
                 offload: bool, stream: bool, no_progress: bool) -> None:
    """Compress a model with a recipe and save it (optionally with a before/after table)."""
    from slimformer.compress import CalibrationConfig, check_output_dir, compress
    from slimformer.models import DEFAULT_MODEL
    from slimformer.recipe import DEFAULT_RECIPE, load_recipe

    name = model or DEFAULT_MODEL
    rec = load_recipe(recipe or DEFAULT_RECIPE)  # cheap checks first: recipe, calibration, output
    cal = CalibrationConfig(samples=calib_samples, seq_len=calib_len, source=calib_source, seed=seed,
                            batch_size=batch_size, offload=offload)
    check_output_dir(out_dir.expanduser().resolve(), overwrite)
    tasks = None
    evaluate = format_table = None
    if eval_tasks is not None:
        try:
            from slimformer.eval import evaluate, format_table, parse_tasks
        except ImportError as e:  # eval is optional for compression
            raise SlimformerError(f"--eval needs slimformer.eval, which failed to import: {e}")
        tasks = parse_tasks(eval_tasks)
        if limit is not None:
            from slimformer.eval import check_limit

            check_limit(limit)
    show = not no_progress
    before = base_lm = None
    if tasks is not None:
        from slimformer.models import load

        base_lm = load(name)
        base_tasks = [t for t in tasks if t != "speed"]
        before = evaluate(base_lm, base_tasks, limit=limit, progress=show) if base_tasks else {
            "model": base_lm.name, "source": str(base_lm.source), "tasks": {}, "meta": {}}
    lm = compress(name, rec, out_dir=out_dir, calibration=cal, overwrite=overwrite, stream=stream,
                  progress=show)
    click.echo(f"compressed {name} with {rec.name or (recipe or 'recipe')} -> {out_dir}", err=True)
    summary = {"model": name, "recipe": rec.to_dict(), "out": str(out_dir),
               "engine_seconds": lm.meta.get("engine_seconds")}
    if tasks is not None:
        after = evaluate(lm, tasks, limit=limit, baseline=base_lm, progress=show)
        sp = after["tasks"].get("speed")
        if sp is not None:  # the baseline's speed comes from the same interleaved timing
            before["tasks"]["speed"] = {k[len("baseline_"):]: v for k, v in sp.items()
                                        if k.startswith("baseline_")}
        click.echo(format_table([before, after]))
        summary = {"before": before, "after": after, **summary}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")


@click.command("recipes")
@click.argument("name", required=False)
def recipes_cmd(name: Optional[str]) -> None:
    """List the named recipes, or print one as YAML."""
    from slimformer.recipe import DEFAULT_RECIPE, load_recipe, named_recipes

    if name:
        click.echo(load_recipe(name).to_yaml(), nl=False)
        return
    for n in named_recipes():
        r = load_recipe(n)
        desc = ", ".join(f"{s.METHOD}" for s in r.stages)
        click.echo(f"{n:14s} {desc}{'  (default)' if n == DEFAULT_RECIPE else ''}")


def register(group: click.Group) -> None:
    group.add_command(compress_cmd)
    group.add_command(recipes_cmd)
