"""Tensor math shared by the method families: affine quantization, bit packing, rotary positions."""
from slimformer.primitives.affine import (FORMATS, GRANULARITIES, NF4_CODEBOOK, QuantizedTensor,
                                          QuantSpec, compute_qparams, dequantize, fake_quantize,
                                          quantize, quantize_per_token_int8, sqnr_db)

__all__ = ["FORMATS", "GRANULARITIES", "NF4_CODEBOOK", "QuantizedTensor", "QuantSpec",
           "compute_qparams", "dequantize", "fake_quantize", "quantize", "quantize_per_token_int8",
           "sqnr_db"]
