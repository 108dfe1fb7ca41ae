"""Recipes: an ordered list of stages, YAML <-> objects.

A recipe file looks like::

    version: 1
    stages:
      - method: rtn
        bits: 4
        group_size: 64
        symmetric: true
        ignore: ["re:.*\\.0\\.mlp\\..*"]
        overrides:
          "re:.*down_proj": {bits: 8}

``Recipe.from_yaml(text).to_yaml()`` is the canonical text (every field written, defaults
included), and ``Recipe.from_yaml(r.to_yaml()) == r`` for every recipe. Named recipes ship
in ``slimformer/recipes/<name>.yaml`` and are found by name (``load_recipe("w8a8")``).

``head: int8`` (optional, causal LMs) quantizes the LM head after the stages: int8 weights with
one scale per vocabulary row, fp32 activations (:func:`slimformer.quant.head.quantize_head`). A
small model reads its vocabulary projection on every decode step; for SmolLM2 it is half the
bytes a W8A8 step streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import yaml

from slimformer.engine.stage import StageConfig, load_builtin_stages, stage_method
from slimformer.errors import ConfigError

RECIPE_VERSION = 1
# the README's default: W4 g64 makes the quantized linears ~7x smaller (the point of
# "compress"); W8A8 is the one that makes the model faster at ~no quality cost
# (benchmarks/RESULTS.md). Both are one word away: --recipe w8a8.
DEFAULT_RECIPE = "w4-g64"


@dataclass(frozen=True)
class Recipe:
    """Ordered, validated stages. Equality is field-by-field (YAML round trips compare equal)."""

    VERSION: ClassVar[int] = RECIPE_VERSION
    stages: tuple[StageConfig, ...]
    name: str = ""
    head: Optional[str] = None  # LM head format after the stages (quant.head.FORMATS), None = as is

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ConfigError("recipe.stages: empty; allowed: a list of one or more stages")
        from slimformer.quant.head import FORMATS as HEAD_FORMATS

        if self.head is not None and self.head not in HEAD_FORMATS:
            raise ConfigError(f"recipe.head: invalid value {self.head!r}; allowed: "
                              f"{', '.join(HEAD_FORMATS)} or null")
        for i, s in enumerate(self.stages):
            if not isinstance(s, StageConfig):
                raise ConfigError(f"recipe.stages[{i}]: not a stage config ({type(s).__name__})")

    # ---- dict / YAML -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": RECIPE_VERSION}
        if self.name:
            d["name"] = self.name
        d["stages"] = [s.to_dict() for s in self.stages]
        if self.head is not None:
            d["head"] = self.head
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        if not isinstance(d, dict):
            raise ConfigError(f"recipe: must be a mapping with 'stages', got {type(d).__name__}")
        unknown = sorted(set(d) - {"version", "name", "stages", "head"})
        if unknown:
            raise ConfigError(f"recipe.{unknown[0]}: unknown field; allowed: version, name, stages, head")
        version = d.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"recipe.version: unsupported version {version!r}; allowed: {RECIPE_VERSION}")
        stages = d.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ConfigError("recipe.stages: missing or empty; allowed: a list of stages")
        out = []
        for i, s in enumerate(stages):
            if not isinstance(s, dict) or "method" not in s:
                raise ConfigError(f"recipe.stages[{i}].method: missing; allowed: {', '.join(stage_names())}")
            method = stage_method(s["method"])
            out.append(method.config_cls.from_dict(s))
        name = d.get("name", "")
        if not isinstance(name, str):
            raise ConfigError(f"recipe.name: must be a string, got {name!r}")
        return cls(stages=tuple(out), name=name, head=d.get("head"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe: invalid YAML: {str(e).splitlines()[0]}")
        return cls.from_dict(data)

    @property
    def needs_calibration(self) -> bool:
        """True when some stage observes activations (a per-module override may also switch
        a layer to a calibrated variant; the engine decides per module)."""
        return any(stage_method(s.METHOD).needs_calibration(s) for s in self.stages)


def stage_names() -> list[str]:
    from slimformer.engine.stage import STAGES

    load_builtin_stages()
    return sorted(STAGES)


def named_recipes() -> list[str]:
    folder = resources.files("slimformer.recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(recipe: "str | Path | Recipe | StageConfig | Sequence[StageConfig] | dict") -> Recipe:
    """A :class:`Recipe` from a built-in name, a YAML file path, YAML text, a dict, one stage
    config or a list of them."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, StageConfig):
        return Recipe(stages=(recipe,))
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (list, tuple)):
        return Recipe(stages=tuple(recipe))
    s = str(recipe)
    if s in named_recipes():
        text = resources.files("slimformer.recipes").joinpath(s + ".yaml").read_text(encoding="utf-8")
        return Recipe.from_yaml(text)
    p = Path(s).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file '{s}' does not exist")
        return Recipe.from_yaml(p.read_text(encoding="utf-8"))
    if "\n" in s or "stages" in s:
        return Recipe.from_yaml(s)
    raise ConfigError(f"recipe: unknown name {s!r}; allowed: {', '.join(named_recipes())} or a .yaml file")
