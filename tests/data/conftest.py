"""Fixtures for data tests: the real SmolLM2 tokenizer, from a per-session temporary cache."""

import pytest

from lorakit.models import resolve_model_dir


@pytest.fixture(scope="session")
def lorakit_cache(tmp_path_factory):
    """``$LORAKIT_CACHE`` for the session; tests/data uses the same folder, so it converts once."""
    path = tmp_path_factory.getbasetemp() / "lorakit-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def default_model_dir(lorakit_cache):
    """The embedded SmolLM2-135M, converted from its GGUF into the session cache (about 20 s)."""
    return resolve_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    """The real SmolLM2 tokenizer (ChatML template, <|im_end|> ends a turn)."""
    from lorakit.models import load_tokenizer

    return load_tokenizer(default_model_dir)
