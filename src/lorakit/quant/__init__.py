"""Quantized frozen bases (QLoRA) in pure PyTorch: int8 and 4-bit NF4 / FP4 with double
quantization, on CPU or GPU.

`codes` holds the storage formats as plain tensor functions, `layer` the `QuantLinear` module and
the model-level functions, `experts` a mixture of experts' fused 3-D expert tensors
(`QuantExperts`), `load` quantizing while a checkpoint is read.
"""

from lorakit.quant.experts import QuantExperts
from lorakit.quant.layer import (
    DEFAULT_SKIP,
    METHODS,
    QuantLinear,
    dequantize_model,
    merge_into_quantized,
    model_nbytes,
    prepare_model_for_kbit_training,
    quantize_model,
)
from lorakit.quant.load import load_quantized

__all__ = [
    "DEFAULT_SKIP",
    "METHODS",
    "QuantExperts",
    "QuantLinear",
    "dequantize_model",
    "load_quantized",
    "merge_into_quantized",
    "model_nbytes",
    "prepare_model_for_kbit_training",
    "quantize_model",
]
