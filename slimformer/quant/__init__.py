"""Quantization methods: configs (config.py) and their apply steps, registered as stages."""
from slimformer.quant.config import RTNConfig, W8A8Config
from slimformer.quant import rtn as _rtn  # noqa: F401  (registers the stage)
from slimformer.quant import omniquant as _omniquant  # noqa: F401
from slimformer.quant import w8a8 as _w8a8  # noqa: F401
from slimformer.quant.smoothquant import SmoothQuantConfig
from slimformer.quant.gptq import GPTQConfig
from slimformer.quant.awq import AWQConfig
from slimformer.quant.llm_int8 import LLMInt8Config
from slimformer.quant.mixed import HessianSensitivityConfig, MixedPrecisionConfig

__all__ = ["AWQConfig", "GPTQConfig", "HessianSensitivityConfig", "LLMInt8Config", "MixedPrecisionConfig", "RTNConfig", "SmoothQuantConfig", "W8A8Config"]
