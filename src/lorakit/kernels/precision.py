"""Whether a device multiplies bf16 natively: the one answer behind every ``precision: auto``
(the trainer's, `lorakit.models.speedup.resolve_precision`, and the decoder's,
`lorakit.generation.decoder.decode_dtype`)."""

from __future__ import annotations

import torch

__all__ = ["native_bf16"]


def native_bf16(device: torch.device | str) -> bool:
    """A CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
