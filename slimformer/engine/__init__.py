"""The layer-by-layer engine every calibration method runs through (see runner.py)."""
from slimformer.engine.activations import ActivationCache
from slimformer.engine.runner import (BlockStatistics, EngineOptions, EngineResult, block_forward,
                                      capture_block_inputs, collect_statistics, plan_stages, run)
from slimformer.engine.stage import (STAGES, BlockContext, StageConfig, ModelContext, StageMethod, register_stage,
                                     stage_method)
from slimformer.engine.streaming import SafetensorsSource, build_meta_model
from slimformer.engine.targets import StagePlan, resolve

__all__ = ["ActivationCache", "BlockStatistics", "collect_statistics", "EngineOptions", "EngineResult", "block_forward", "capture_block_inputs",
           "plan_stages", "run", "STAGES", "BlockContext", "StageConfig", "StageMethod", "register_stage",
           "stage_method", "SafetensorsSource", "build_meta_model", "StagePlan", "resolve"]
