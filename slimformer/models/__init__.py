"""Model loading and the architecture registry."""
from slimformer.models.loading import BUNDLED, DEFAULT_MODEL, LoadedModel, load
from slimformer.models.registry import (ARCHITECTURES, ArchSpec, arch_for_config, arch_for_model,
                                        get_module, set_module)
from slimformer.models.tiny import tiny_config, tiny_model

__all__ = ["BUNDLED", "DEFAULT_MODEL", "LoadedModel", "load", "ARCHITECTURES", "ArchSpec",
           "arch_for_config", "arch_for_model", "get_module", "set_module", "tiny_config", "tiny_model"]
