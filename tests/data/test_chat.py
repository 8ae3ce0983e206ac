"""The one chat renderer: prompts, conversations and labels all render through `lorakit.data.chat`,
and a tokenizer without a template (or a template that refuses) raises the one typed error."""

import copy

import pytest

from lorakit.data import Record, encode_record
from lorakit.data.chat import ChatTemplateError, chat_ids, chat_prompt_ids, render_chat
from lorakit.data.records import RecordError
from lorakit.errors import DataError, LorakitError

pytestmark = pytest.mark.slow  # needs the converted default model's tokenizer

TURN = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "call mum tomorrow"}]


@pytest.fixture
def plain(tokenizer):
    """The tokenizer without its chat template."""
    other = copy.deepcopy(tokenizer)
    other.chat_template = None
    return other


def test_a_prompt_is_the_template_with_the_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template(TURN, tokenize=False, add_generation_prompt=True)
    assert render_chat(tokenizer, TURN, generation_prompt=True) == text
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_ids(tokenizer, TURN) == expected
    assert chat_prompt_ids(tokenizer, "call mum tomorrow", system="Answer in JSON.") == expected
    assert tokenizer.decode(expected).endswith("<|im_start|>assistant\n")


def test_without_a_template_a_lone_user_message_is_plain_text(plain):
    assert chat_prompt_ids(plain, "hello there") == plain("hello there")["input_ids"]
    assert chat_ids(plain, [{"role": "user", "content": "hello there"}]) == plain("hello there")["input_ids"]


def test_without_a_template_a_conversation_is_one_typed_error(plain):
    for render in (lambda: render_chat(plain, TURN), lambda: chat_ids(plain, TURN)):
        with pytest.raises(ChatTemplateError, match="no chat template") as info:
            render()
        assert isinstance(info.value, DataError) and isinstance(info.value, LorakitError)
    with pytest.raises(RecordError, match="no chat template") as info:  # training data: a bad record
        encode_record(Record("t:1", messages=tuple(TURN) + ({"role": "assistant", "content": "{}"},)), plain)
    assert info.value.reason == "template_mismatch"


def test_a_template_that_refuses_is_the_same_error(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="refused the conversation: roles must alternate"):
        chat_ids(strict, TURN)
