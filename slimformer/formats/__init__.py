"""What a compressed model is at run time (packed linear modules) and on disk (save/load)."""
from slimformer.formats.linear import Int8Linear, QuantLinear, linear_bias, linear_weight

__all__ = ["Int8Linear", "QuantLinear", "linear_bias", "linear_weight", "save_compressed",
           "load_compressed", "quantized_nbytes"]


def __getattr__(name):  # serialization pulls in transformers: import it only when asked
    if name in ("save_compressed", "load_compressed", "quantized_nbytes"):
        from slimformer.formats import serialize

        return getattr(serialize, name)
    raise AttributeError(name)
