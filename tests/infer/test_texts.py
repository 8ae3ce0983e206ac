"""Greedy texts for scoring go through the engine and equal transformers' batched greedy generate
(what `generate_texts` called before the engine was the one decode loop); the model runs as it is
set up (its active adapter, or the base model inside ``disable_adapter``)."""

import copy

import pytest
import torch

from lorakit.data.chat import chat_prompt_ids
from lorakit.errors import ConfigError
from lorakit.generation import Request, Sampling, generate_batch, generate_texts, left_pad, line_break_ids
from lorakit.infer.openai_api import Limits, RequestError, parse_chat
from lorakit.models import load_adapted

PROMPTS = ["remind me to call mum", "hi", "water the plants tomorrow, it's urgent", "x"]


def transformers_texts(model, tokenizer, prompts, max_new_tokens, one_line, breaks=()):
    """transformers' generate on the left-padded batch, stopping at EOS (and at ``breaks``)."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    stop = [tokenizer.eos_token_id] + (list(breaks) if one_line else [])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    texts = [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
    return [(t.strip().split("\n", 1)[0] if one_line else t).strip() for t in texts]


@pytest.fixture(scope="module")
def loaded(tiny_adapter):
    model, tokenizer = load_adapted(tiny_adapter)
    return model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in PROMPTS]


@pytest.mark.parametrize("one_line", [False, True])
def test_generate_texts_equals_transformers_generate(loaded, one_line):
    model, tokenizer, prompts = loaded
    breaks = line_break_ids(tokenizer)
    got = generate_texts(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, one_line=one_line,
                         line_breaks=breaks)
    assert got == transformers_texts(model, tokenizer, prompts, 8, one_line, breaks)
    with model.disable_adapter():  # as it is set up: here, the base model
        base = generate_texts(model, tokenizer, prompts, max_new_tokens=8, one_line=one_line, line_breaks=breaks)
        assert base == transformers_texts(model, tokenizer, prompts, 8, one_line, breaks)
    assert base != got  # the adapter matters on these prompts


def test_rows_that_stop_early_leave_the_others_unchanged(loaded):
    """Stop tokens taken from the rows' own answers: some rows end after a few tokens, the rest
    run on, each as transformers' generate on the whole batch has it."""
    model, tokenizer, prompts = loaded
    full = generate_batch(model, tokenizer, [Request(p, sampling=Sampling(max_new_tokens=8)) for p in prompts],
                          as_is=True)
    stops = (full[0][2], full[2][1])  # row 0 ends at its third token, row 2 at its second (or earlier)
    got = generate_texts(model, tokenizer, prompts, max_new_tokens=8, one_line=True, line_breaks=stops)
    assert got == transformers_texts(model, tokenizer, prompts, 8, True, stops)
    whole = generate_texts(model, tokenizer, prompts, max_new_tokens=8)
    assert len(got[0]) < len(whole[0]) and len(got[2]) < len(whole[2])
    with pytest.raises(ConfigError, match="as_is=True runs the model as it is"):  # no adapter choice then
        generate_batch(model, tokenizer, [Request(prompts[0], "default")], as_is=True)


def test_line_breaks_are_every_token_with_a_newline(loaded):
    _, tokenizer, _ = loaded
    breaks = line_break_ids(tokenizer)
    assert tokenizer.encode("\n", add_special_tokens=False)[0] in breaks
    assert all("\n" in tokenizer.decode([i]) for i in breaks)


def test_a_chat_the_tokenizer_cannot_render_is_a_400(loaded):
    _, tokenizer, _ = loaded
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    body = {"model": "base", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    with pytest.raises(RequestError, match="no chat template") as info:
        parse_chat(body, plain, Limits())
    assert info.value.status == 400 and info.value.code == "no_chat_template"
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RequestError, match="roles must alternate") as info:
        parse_chat(body, strict, Limits())
    assert info.value.status == 400 and info.value.param == "messages"
    assert parse_chat({"model": "base", "messages": body["messages"][1:]}, plain, Limits()).prompts == [
        plain("u")["input_ids"]]
