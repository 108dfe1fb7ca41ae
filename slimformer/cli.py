"""Command-line interface: a thin adapter over the Python API.

Each package contributes its commands through a ``register(group)`` function in its own
``cli`` module, so this file stays a frame: global flags, logging, and the error policy
(one line on stderr and a non-zero exit for user errors; a traceback only with ``--debug``).
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from slimformer.errors import SlimformerError

# modules that contribute commands (each defines register(group))
COMMAND_MODULES = (
    "slimformer.eval.cli",
    "slimformer.engine.cli",
    "slimformer.decoding.cli",
    "slimformer.distill.cli",
)

_DEBUG = {"on": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logging.")
@click.option("-v", "--verbose", is_flag=True, help="Info-level logging.")
@click.version_option(package_name="slimformer")
def cli(debug: bool, verbose: bool) -> None:
    """slimformer: compress transformer models on a CPU, with measured quality loss."""
    _DEBUG["on"] = debug
    level = logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("slimformer").setLevel(level)


for _mod in COMMAND_MODULES:
    try:
        importlib.import_module(_mod).register(cli)
    except ModuleNotFoundError as e:  # a package not written yet must not break the others
        if e.name != _mod:
            raise


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG["on"] = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="slimformer", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except SlimformerError as e:
        if _DEBUG["on"]:
            raise
        click.echo(f"error: {e}", err=True)
        return 2
    except Exception as e:  # unexpected: still one line unless --debug
        if _DEBUG["on"]:
            raise
        msg = str(e).strip().split("\n")[0][:300]
        click.echo(f"error: {type(e).__name__}: {msg} (run with --debug for the traceback)", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
