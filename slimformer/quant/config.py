"""Typed configs of the quantization stages (validated at construction, versioned).

The YAML field names are the dataclass field names; ``method`` picks the class. A config
turns into the primitives' :class:`~slimformer.primitives.affine.QuantSpec` with ``spec()``
so the math below never sees a recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from slimformer.engine.stage import StageConfig, check_bool, check_choice, check_int_range
from slimformer.errors import ConfigError

WEIGHT_FORMATS = ("int", "nf4", "fp8_e4m3")
ACTIVATION_MODES = ("dynamic", "static")


@dataclass(frozen=True)
class RTNConfig(StageConfig):
    """Round-to-nearest weight-only quantization (no calibration data).

    ``bits`` 2..8; ``group_size``: columns per scale (need not divide the row: the last group
    is partial), ``null`` for one scale per output channel; ``symmetric``: zero point fixed at
    0 (signed codes) or a per-group integer zero point; ``format``: ``int`` (affine, Eq. 4),
    ``nf4`` (4-bit QLoRA codebook) or ``fp8_e4m3``; ``double_quant`` (nf4 only): store the
    per-group scales themselves as int8 in blocks of 256 (QLoRA's double quantization).
    """

    METHOD: ClassVar[str] = "rtn"
    VERSION: ClassVar[int] = 1

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = True
    format: str = "int"
    double_quant: bool = False

    def validate(self) -> None:
        check_int_range(self.METHOD, "bits", self.bits, 2, 8)
        check_int_range(self.METHOD, "group_size", self.group_size, 1, allow_none=True)
        check_bool(self.METHOD, "symmetric", self.symmetric)
        check_choice(self.METHOD, "format", self.format, WEIGHT_FORMATS)
        check_bool(self.METHOD, "double_quant", self.double_quant)
        if self.double_quant and self.format != "nf4":
            raise ConfigError(f"{self.METHOD}.double_quant: true needs format 'nf4' (got format "
                              f"{self.format!r}); allowed: false, or format nf4")
        try:
            self.spec()
        except ConfigError as e:  # cross-field rules (nf4 needs 4 bits, ...) live in QuantSpec
            raise ConfigError(f"{self.METHOD}: {e}") from None

    def spec(self):
        from slimformer.primitives.affine import QuantSpec

        if self.group_size is None:
            return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="channel",
                             format=self.format, double_quant=self.double_quant)
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="group",
                         group_size=self.group_size, format=self.format,
                         double_quant=self.double_quant)


@dataclass(frozen=True)
class W8A8Config(StageConfig):
    """int8 weights (symmetric, one scale per output channel) and int8 activations
    (survey Eq. 5), executed by a true int8 GEMM.

    ``activations``: ``dynamic`` — one scale per token computed at run time (no calibration);
    ``static`` — one scale per layer from min/max observed on calibration data through the
    engine (cheaper at run time, needs calibration, sensitive to outliers).
    """

    METHOD: ClassVar[str] = "w8a8"
    VERSION: ClassVar[int] = 1

    activations: str = "dynamic"

    def validate(self) -> None:
        check_choice(self.METHOD, "activations", self.activations, ACTIVATION_MODES)

    def weight_spec(self):
        from slimformer.primitives.affine import QuantSpec

        return QuantSpec(bits=8, symmetric=True, granularity="channel")
