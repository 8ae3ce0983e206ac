"""The frozen base stored in 4 or 8 bits (``--quantize``, QLoRA with bitsandbytes): its bytes, and
the buffer each quantized layer dequantizes its weight into.

transformers quantizes every linear layer of the decoder blocks (``nn.Linear``, GPT-2's ``Conv1D``)
and leaves the embedding, the norms and the output head in the training dtype (b bytes a value;
`lorakit.models.quantized`). For one quantized layer of n = out * in weights (bitsandbytes 0.50.2,
file:line in its package):

    nf4, fp4   codes     = ceil(n / 2)                  two 4-bit codes a byte: quantize_4bit
                                                        (functional.py:918, blocksize 64)
               constants = ceil(n / 64)                 one absmax per block of 64 weights, stored
                                                        in 8 bits by double quantization:
                                                        quantize_blockwise(absmax - offset, 256)
                                                        (functional.py:939-940)
                         + 4 * ceil(ceil(n / 64) / 256) one fp32 scale per 256 absmax values
                         + 4 * 256 + 4 * 16 + 4         the layer's own copies of the 8-bit dynamic
                                                        map (functional.py:677, copy=True) and the
                                                        4-bit code (functional.py:936), and the fp32
                                                        offset, the absmax mean (functional.py:939)
    int8       codes     = n                            LLM.int8(): one int8 a weight, and
               constants = 4 * out                      one fp32 scale per output row, SCB
                                                        (nn/modules.py:743)
    unquantized = (base_params - quantized weights) * b  embedding, norms, output head, biases

    frozen weights = sum over quantized layers of (codes + constants) + unquantized
    dequantization = max over quantized layers of
                     b * n + 4 * ceil(n / 64)           nf4, fp4: the weight in b, and the absmax
                                                        expanded to fp32 first
                     b * n + 4 * out                    int8 on CUDA, or in float32
                     (b + 8) * n + 4 * out              int8 on CPU with b < 4

The dequantization buffer is transient. Each 4-bit layer dequantizes its weight to an (out, in)
tensor in the compute dtype in its forward (backends/default/ops.py:337-341; on CPU
backends/cpu/ops.py:179 allocates it) and again for grad_input in its backward
(autograd/_functions.py:384, functional.py:1053-1054); on CUDA the forward may run a fused kernel
instead, and the backward still dequantizes. The 8-bit layer does the same from its
int8 codes, ``CB.to(dtype).mul_(SCB / 127)`` (autograd/_functions.py:264 forward, 292 backward):
an in-place product of b-byte values with fp32 scales, which PyTorch on CPU computes in fp32
through a temporary copy of the input and one of the output (8 * n bytes more) unless b is 4. Each
buffer is freed when its matmul returns, so one exists at a time: the largest layer's counts at
the peak (measured with PyTorch's memory profiler: tests/plan/test_plan_quantized.py).

The 8-bit layer also keeps its input for the backward (``ctx.A = A``, autograd/_functions.py:269),
which a 4-bit layer does not (it keeps only the packed weight, line 358): an activation, counted in
`lorakit.plan.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.checks import QUANTIZATIONS
from lorakit.plan.shapes import ModelShape

__all__ = ["QUANTIZATIONS", "QuantizedWeights", "quantized_weights", "quantized_bytes",
           "dequantization_bytes", "DESCRIPTION"]

BLOCK = 64  # weights per 4-bit absmax block (BitsAndBytesConfig's bnb_4bit_blocksize default)
NESTED_BLOCK = 256  # absmax values per fp32 scale of double quantization
DYNAMIC_MAP = 4 * 256  # the 8-bit dynamic map each 4-bit layer keeps (fp32)
CODE_4BIT = 4 * 16  # the 16 values of the NF4 or FP4 code (fp32)
OFFSET = 4  # the absmax mean, fp32
ROW_SCALE = 4  # int8: an fp32 scale per output row
ABSMAX_FP32 = 4  # 4-bit: the absmax, expanded to fp32 before the weight is dequantized
FP32_TEMPORARIES = 4 + 4  # int8 on CPU: fp32 copies of the input and output of the in-place scaling

DESCRIPTION = {  # how the plan names each storage
    "nf4": "4-bit + double-quantized constants",
    "fp4": "4-bit + double-quantized constants",
    "int8": "8-bit + fp32 row scales",
}


@dataclass(frozen=True)
class QuantizedWeights:
    """The frozen weights of a quantized base, in bytes; ``total`` is their sum."""

    quantize: str  # "nf4", "fp4" or "int8"
    codes: int  # the quantized weights: 4 or 8 bits a weight
    constants: int  # absmax (8-bit) and its fp32 scales and code tables; or int8's row scales
    unquantized: int  # embedding, norms, output head and biases, in the compute dtype
    dequantization: int  # the largest layer's transient dequantized weight (and its fp32 temporary)
    layers: int  # quantized linear layers

    @property
    def total(self) -> int:
        return self.codes + self.constants + self.unquantized


def quantized_bytes(quantize: str, out_features: int, in_features: int) -> tuple[int, int]:
    """(codes, constants) of one quantized layer: the module docstring's formula."""
    n = out_features * in_features
    if quantize == "int8":
        return n, ROW_SCALE * out_features
    blocks = _ceil_div(n, BLOCK)
    constants = blocks + 4 * _ceil_div(blocks, NESTED_BLOCK) + DYNAMIC_MAP + CODE_4BIT + OFFSET
    return _ceil_div(n, 2), constants


def dequantization_bytes(quantize: str, out_features: int, in_features: int, b: int,
                         device: str = "cpu") -> int:
    """The transient bytes of one layer's weight dequantized to ``b`` bytes a value on ``device``:
    the module docstring's formula."""
    n = out_features * in_features
    if quantize != "int8":
        return b * n + ABSMAX_FP32 * _ceil_div(n, BLOCK)
    promoted = FP32_TEMPORARIES * n if device == "cpu" and b < 4 else 0
    return b * n + promoted + ROW_SCALE * out_features


def quantized_weights(shape: ModelShape, quantize: str, b: int, device: str = "cpu") -> QuantizedWeights:
    """The frozen weights of ``shape`` with every linear layer of its blocks stored as
    ``quantize``, the rest in ``b`` bytes a value, and the largest dequantization buffer on
    ``device`` (the module docstring's formula)."""
    linear = [m for m in shape.block if m.kind in ("linear", "conv1d")]
    codes = constants = weights = 0
    for m in linear:
        c, k = quantized_bytes(quantize, m.out_features, m.in_features)
        codes, constants = codes + c, constants + k
        weights += m.in_features * m.out_features
    buffer = max((dequantization_bytes(quantize, m.out_features, m.in_features, b, device)
                  for m in linear), default=0)
    layers = shape.num_layers
    return QuantizedWeights(
        quantize=quantize, codes=layers * codes, constants=layers * constants,
        unquantized=(shape.total_params - layers * weights) * b,
        dequantization=buffer if layers else 0, layers=layers * len(linear))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
