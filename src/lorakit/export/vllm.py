"""`--format vllm`: an adapter directory checked against what vLLM's LoRA loader accepts.

vLLM reads PEFT adapter directories (``vllm serve BASE --enable-lora --lora-modules NAME=DIR``), so
the files are the adapter's own; what can go wrong is an adapter vLLM refuses at load time or,
worse, serves differently. Its loader (``vllm/lora/peft_helper.py``, ``PEFTHelper``) refuses DoRA,
``modules_to_save`` (but a classifier head), LoRA biases (``bias`` other than "none",
``lora_bias``), initialisations that rewrite the base weights (PiSSA, OLoRA, ...) and a rank above
``--max-lora-rank``; recent releases apply ``rank_pattern`` / ``alpha_pattern`` and rsLoRA's scale
as PEFT does (older ones read ``r`` and ``lora_alpha`` alone, so such an adapter gets a warning).
vLLM adds LoRA to the linear layers it fuses (q/k/v, gate/up), the other projections, the
embedding and the output head of the architectures it supports.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lorakit import io
from lorakit.config import CONFIG_NAME
from lorakit.errors import CompatibilityError
from lorakit.variants.inits import uses_base_weight

__all__ = ["VLLM_RANKS", "VllmCheck", "check_for_vllm", "write_for_vllm"]

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` takes (``LoRAConfig.max_lora_rank``)."""
_LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                  "lm_head"}


@dataclass
class VllmCheck:
    """What vLLM will make of an adapter."""

    max_rank: int
    max_lora_rank: int
    """The smallest ``--max-lora-rank`` value that admits it."""
    targets: list[str]
    warnings: list[str] = field(default_factory=list)


def check_for_vllm(adapter_dir: Path) -> VllmCheck:
    """Refuse, in one `CompatibilityError` listing every reason, an adapter vLLM refuses to load;
    else what the serve command needs and any warnings."""
    config, tensors = io.read_adapter(adapter_dir)
    problems = []
    if config.peft_type != "LORA":
        problems.append(f"it is a {config.peft_type} adapter; vLLM serves LoRA adapters only")
    if config.use_dora or any(k.endswith("lora_magnitude_vector") for k in tensors):
        problems.append("it is a DoRA adapter (vLLM does not support DoRA)")
    if config.modules_to_save:
        problems.append(f"it saves whole modules ({', '.join(config.modules_to_save)}: modules_to_save), which "
                        "vLLM refuses")
    if config.bias != "none" or getattr(config, "lora_bias", False):
        problems.append(f"it trains biases (bias={config.bias!r}), which vLLM does not support")
    init = config.init_lora_weights
    if uses_base_weight(init):
        problems.append(f"init_lora_weights={init!r} rewrote the base weights, which vLLM does not do; convert it "
                        "into a plain LoRA adapter first (save_pretrained(..., "
                        "path_initial_model_for_weight_conversion=...))")
    ranks = [config.r, *config.rank_pattern.values()]
    max_rank = max(ranks)
    if max_rank > VLLM_RANKS[-1]:
        problems.append(f"its rank {max_rank} is above vLLM's largest --max-lora-rank, {VLLM_RANKS[-1]}")
    if problems:
        raise CompatibilityError(f"{adapter_dir}: vLLM cannot serve this adapter: {'; '.join(problems)}. Merge it "
                                 "into the base model instead (lorakit merge --adapter DIR --out MODEL) and serve "
                                 "MODEL with vLLM")
    targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) \
        else [config.target_modules]
    check = VllmCheck(max_rank=max_rank, max_lora_rank=next(r for r in VLLM_RANKS if r >= max_rank),
                      targets=targets)
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in _LLAMA_TARGETS]
    if unknown:
        check.warnings.append(f"targets {unknown} are outside the Llama-family layers vLLM adds LoRA to "
                              f"({', '.join(sorted(_LLAMA_TARGETS))}); check that vLLM supports them for this model")
    if config.rank_pattern or config.alpha_pattern:
        check.warnings.append("rank_pattern / alpha_pattern: vLLM releases before their support apply r and "
                              "lora_alpha to every layer; use a recent vLLM, or merge the adapter")
    return check


def write_for_vllm(adapter_dir: Path, out_dir: Path) -> VllmCheck:
    """Check the adapter (`check_for_vllm`) and copy its two files into ``out_dir``."""
    check = check_for_vllm(adapter_dir)
    for name in (CONFIG_NAME, io.WEIGHTS_NAME):
        shutil.copyfile(adapter_dir / name, out_dir / name)
    return check
