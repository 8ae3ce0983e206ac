"""Settings and fixtures every test folder shares: no hub access, one converted default model
per session (in a temporary cache), and a tiny model that uses the real tokenizer."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def lorakit_cache(tmp_path_factory):
    """``$LORAKIT_CACHE`` for the session, so the embedded model is converted once."""
    path = tmp_path_factory.getbasetemp() / "lorakit-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def default_model_dir(lorakit_cache):
    """The embedded SmolLM2-135M, converted from its GGUF into the session cache (about 20 s)."""
    from lorakit.models import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    """The real SmolLM2 tokenizer (ChatML template, <|im_end|> ends a turn)."""
    from lorakit.models import load_tokenizer

    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir, tmp_path_factory):
    """A model directory with a tiny random Llama (hidden 32, 2 layers) and SmolLM2's tokenizer:
    trains in milliseconds a step, and speaks the real chat template."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-model")
    for name in os.listdir(default_model_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(default_model_dir / name, path / name)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
