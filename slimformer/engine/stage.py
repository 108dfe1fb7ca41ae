"""Stages: what one compression method tells the engine.

A method is three things (DESIGN.md "a config dataclass, a pure function, one registry
entry"):

* a frozen :class:`StageConfig` subclass — typed, validated in ``__post_init__`` (a bad value
  raises :class:`~slimformer.errors.ConfigError` naming the field and the allowed values),
  versioned and serialisable to a plain dict;
* an ``apply(ctx: BlockContext, cfg) -> None`` function that compresses the target linears of
  one block in place (replacing modules through :meth:`BlockContext.replace`) using only the
  statistics the engine collected for it;
* one :func:`register_stage` call naming the observers the method needs.

The engine never knows what GPTQ or Wanda is: it reads ``StageMethod.observers`` to decide
which statistics to collect (and whether a calibration forward is needed at all) and hands the
block over. Methods that must re-run the block (AWQ's scale search, OmniQuant) read
``ctx.forward_inputs`` and call ``ctx.run_block``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from slimformer.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# validation helpers: one message shape everywhere ("<method>.<field>: ... allowed: ...")


def check_choice(owner: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{owner}.{name}: invalid value {value!r}; allowed: "
                          + ", ".join(repr(a) for a in allowed))


def check_int_range(owner: str, name: str, value: Any, lo: int, hi: Optional[int] = None,
                    allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f"integers {lo}..{hi}" if hi is not None else f"integers >= {lo}"
        if allow_none:
            rng += " or null"
        raise ConfigError(f"{owner}.{name}: invalid value {value!r}; allowed: {rng}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name}: invalid value {value!r}; allowed: true, false")


def check_float_range(owner: str, name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"{owner}.{name}: invalid value {value!r}; allowed: numbers in [{lo}, {hi}]")


def config_from_dict(cls, d: dict, owner: str):
    """Build the frozen config dataclass ``cls`` from a plain dict (YAML), checking the
    ``version`` key and naming unknown fields — for configs outside the stage registry."""
    d = dict(d)
    version = d.pop("version", cls.VERSION)
    if version != cls.VERSION:
        raise ConfigError(f"{owner}.version: invalid value {version!r}; allowed: {cls.VERSION}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{owner}: unknown field(s) {', '.join(unknown)}; allowed: " + ", ".join(sorted(names)))
    return cls(**d)


# ---------------------------------------------------------------------------------------------
# module name patterns

REGEX_PREFIX = "re:"


def compile_pattern(owner: str, name: str, pattern: Any) -> Callable[[str], bool]:
    """Matcher for an exact module name or ``re:<regex>`` (``re.fullmatch`` over the name)."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{owner}.{name}: invalid pattern {pattern!r}; allowed: a module name "
                          "or 're:<regex>'")
    if pattern.startswith(REGEX_PREFIX):
        try:
            rx = re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as e:
            raise ConfigError(f"{owner}.{name}: invalid regex {pattern!r}: {e}")
        return lambda s: rx.fullmatch(s) is not None
    return lambda s: s == pattern


# ---------------------------------------------------------------------------------------------
# the base config


@dataclass(frozen=True)
class StageConfig:
    """Fields every stage shares: which modules it touches.

    ``targets``: exact module names or ``re:`` regexes (full match); ``None`` means every
    linear inside the transformer blocks (never embeddings or the head unless named).
    ``ignore``: names/regexes removed from the targets. ``overrides``: ``{pattern: {field:
    value}}`` applied in order to the modules a pattern matches (mixed precision); each
    override is validated by building the overridden config.
    """

    METHOD: ClassVar[str] = "base"
    VERSION: ClassVar[int] = 1
    # fields that describe targeting, not the method; overrides may not touch these
    TARGETING: ClassVar[tuple[str, ...]] = ("targets", "ignore", "overrides")

    targets: Optional[tuple[str, ...]] = None
    ignore: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = self.METHOD
        if self.targets is not None:
            if isinstance(self.targets, str):
                object.__setattr__(self, "targets", (self.targets,))
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets:
                raise ConfigError(f"{owner}.targets: empty list; allowed: null (all block linears) "
                                  "or module names / 're:' regexes")
            for t in self.targets:
                compile_pattern(owner, "targets", t)
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for t in self.ignore:
            compile_pattern(owner, "ignore", t)
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"{owner}.overrides: must be a mapping {{pattern: {{field: value}}}}")
        tunable = [f for f in self.field_names() if f not in self.TARGETING]
        for pat, over in self.overrides.items():
            compile_pattern(owner, "overrides", pat)
            if not isinstance(over, dict) or not over:
                raise ConfigError(f"{owner}.overrides[{pat!r}]: must be a non-empty mapping of fields")
            for k in over:
                if k not in tunable:
                    raise ConfigError(f"{owner}.overrides[{pat!r}].{k}: unknown field; allowed: "
                                      + ", ".join(tunable))
            dataclasses.replace(self, overrides={}, **over)  # validates the overridden values
        self.validate()

    # subclasses check their own fields here (called after the common checks)
    def validate(self) -> None:  # pragma: no cover - trivial
        pass

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def for_module(self, name: str) -> "StageConfig":
        """The config that applies to module ``name`` after the matching overrides."""
        merged: dict = {}
        for pat, over in self.overrides.items():
            if compile_pattern(self.METHOD, "overrides", pat)(name):
                merged.update(over)
        return dataclasses.replace(self, overrides={}, **merged) if merged else self

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain dict (lists, not tuples) with ``method`` first: what the YAML holds."""
        out: dict = {"method": self.METHOD}
        fields = dataclasses.fields(self)
        # the method's own fields first, then targeting: reads like the recipe a person writes
        for f in [f for f in fields if f.name not in self.TARGETING] + [f for f in fields if f.name in self.TARGETING]:
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = {k: dict(o) for k, o in v.items()}
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        d = dict(d)
        d.pop("method", None)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"{cls.METHOD}.version: unsupported version {version!r}; allowed: {cls.VERSION}")
        allowed = cls.field_names()
        for k in d:
            if k not in allowed:
                raise ConfigError(f"{cls.METHOD}.{k}: unknown field; allowed: " + ", ".join(allowed))
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# what a stage sees for one block


@dataclass
class BlockContext:
    """One block handed to a stage's ``apply``.

    ``targets`` maps the block-relative name of each target linear to its effective config
    (overrides applied); ``stats`` maps the same names to ``{observer_name: result}``.
    ``forward_inputs`` yields ``(args, kwargs)`` for every calibration batch (hidden states
    first) for methods that re-run the block; ``None`` when the recipe has no calibration.
    """

    index: int
    name: str  # full dotted name of the block, e.g. "model.layers.3"
    block: nn.Module
    arch: Any  # ArchSpec
    config: Any  # the HF config
    targets: dict[str, StageConfig]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    forward_inputs: Optional[Callable[[], Iterator[tuple[tuple, dict]]]] = None

    def module(self, rel: str) -> nn.Module:
        from slimformer.models.registry import get_module

        return get_module(self.block, rel)

    def replace(self, rel: str, new: nn.Module) -> None:
        from slimformer.models.registry import set_module

        set_module(self.block, rel, new)

    def run_block(self, args: tuple, kwargs: dict) -> torch.Tensor:
        out = self.block(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class StageMethod:
    name: str
    config_cls: type
    apply: Callable[[BlockContext, StageConfig], None]
    # observer names to collect on every target linear's input (see slimformer.observers);
    # a function of the config so e.g. W8A8 collects min/max only for static activations
    observers: Callable[[StageConfig], tuple[str, ...]] = lambda cfg: ()
    # True when apply() re-runs the block on calibration inputs (needs them without observers)
    needs_block_inputs: Callable[[StageConfig], bool] = lambda cfg: False
    about: str = ""
    # A MODEL-LEVEL stage (structured pruning that changes shapes or depth, distillation /
    # fine-tuning that trains the whole model) sets ``apply_model(mctx: ModelContext, cfg)``
    # instead of working block by block; ``apply`` is then never called. The engine runs the
    # recipe in order: consecutive block-level stages share one layer-by-layer pass, a model
    # stage runs alone between such passes.
    apply_model: Optional[Callable[["ModelContext", StageConfig], None]] = None
    # model stages: True when the stage needs calibration samples / the uncompressed teacher
    needs_samples: Callable[[StageConfig], bool] = lambda cfg: False
    needs_teacher: Callable[[StageConfig], bool] = lambda cfg: False
    # True when the method may compress a block's linears group by group, each calibrated on
    # the outputs of the already-compressed linears before it (slimformer.engine.sequential):
    # apply() must use only the observers' statistics of the targets it is handed
    sequential: Callable[[StageConfig], bool] = lambda cfg: False

    @property
    def model_level(self) -> bool:
        return self.apply_model is not None

    def needs_calibration(self, cfg: StageConfig) -> bool:
        if self.model_level:
            return bool(self.needs_samples(cfg))
        return bool(self.observers(cfg)) or self.needs_block_inputs(cfg)


@dataclass
class ModelContext:
    """What a model-level stage sees: the whole LoadedModel (``lm.model``, ``lm.arch``,
    ``lm.tokenizer``; replace ``lm.model`` or edit it in place), the calibration samples
    ([n, seq] token ids or images; ``None`` when no stage asked for them), the uncompressed
    model as it was before the recipe's first stage (``teacher``; only when the stage's
    ``needs_teacher`` said so) and the engine options (seed, batch size, progress)."""

    lm: Any
    samples: Optional[torch.Tensor]
    teacher: Optional[nn.Module]
    options: Any


STAGES: dict[str, StageMethod] = {}


def register_stage(method: StageMethod) -> StageMethod:
    """Add a method to the registry (its config class's METHOD must equal its name)."""
    if method.config_cls.METHOD != method.name:
        raise ValueError(f"config {method.config_cls.__name__}.METHOD != registry name {method.name}")
    STAGES[method.name] = method
    return method


# the modules whose import registers the built-in methods (one line per method family)
BUILTIN_STAGE_MODULES: tuple[str, ...] = (
    "slimformer.quant",
    "slimformer.distill",
    "slimformer.prune",
)


def load_builtin_stages() -> None:
    """Import the method families so their ``register_stage`` calls run."""
    import importlib

    for mod in BUILTIN_STAGE_MODULES:
        importlib.import_module(mod)


def stage_method(name: str) -> StageMethod:
    load_builtin_stages()
    if name not in STAGES:
        raise ConfigError(f"stage.method: unknown method {name!r}; allowed: " + ", ".join(sorted(STAGES)))
    return STAGES[name]


def method_of(cfg: StageConfig) -> StageMethod:
    return stage_method(cfg.METHOD)
