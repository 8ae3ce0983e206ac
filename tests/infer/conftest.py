"""Adapters on the tiny model (tests/conftest.py's ``tiny_model_dir``) with known, non-zero weights."""

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.models import load_model


def make_adapter(model_dir, out_dir, *, seed=0, targets=("q_proj", "v_proj"), b_scale=None):
    """Save an adapter with random A and B (``init_lora_weights=False``: a non-zero update); with
    ``b_scale``, B is scaled by it (a tiny update for the rounding tests)."""
    base, _ = load_model(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    model = get_peft_model(base, config)
    if b_scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(b_scale)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """q_proj, v_proj and the (tied) lm_head adapted."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter-a"),
                        targets=("q_proj", "v_proj", "lm_head"))
