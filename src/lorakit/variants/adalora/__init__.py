"""AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512): SVD-form adapters whose ranks
are reallocated during training by the importance of each singular triplet. PEFT-compatible.

    config.py        AdaLoraConfig (peft_type "ADALORA"): the schedule and the final rank_pattern
    layer.py         SVDAdapter (lora_A, lora_E, lora_B, ranknum), SVDLinear, inject_adalora
    allocator.py     RankAllocator: importance EMAs, the cubic budget schedule, masking
    regularizer.py   the orthogonal regulariser on A and B
    model.py         AdaLoraModel: base_model with update_and_allocate and the regularised loss

    config = AdaLoraConfig(init_r=12, target_r=8, total_step=1000, target_modules=["q_proj", "v_proj"])
    model = lorakit.get_peft_model(base, config)       # model.base_model is an AdaLoraModel
"""

from lorakit.variants.adalora.allocator import RankAllocator, budget_schedule
from lorakit.variants.adalora.config import AdaLoraConfig
from lorakit.variants.adalora.layer import SVDAdapter, SVDLinear
from lorakit.variants.adalora.regularizer import orthogonal_regularizer

__all__ = ["AdaLoraConfig", "AdaLoraModel", "RankAllocator", "SVDAdapter", "SVDLinear", "budget_schedule",
           "orthogonal_regularizer"]


def __getattr__(name: str):
    # AdaLoraModel imports lorakit.model, which imports this package through io: load it on use.
    if name == "AdaLoraModel":
        from lorakit.variants.adalora.model import AdaLoraModel
        return AdaLoraModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
