"""Token ids and labels, checked token by token against the real SmolLM2 chat template."""

import pytest

from lorakit.data import IGNORE_INDEX, Record, encode_record, tokenize_records
from lorakit.data.records import RecordError
from lorakit.errors import DataError

pytestmark = pytest.mark.slow  # needs the converted default model's tokenizer

CHAT = (
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+5, please?"},
    {"role": "assistant", "content": "It is 8."},
)


def _runs(labels):
    """Contiguous [start, end) runs of labelled positions."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_chat_labels_are_exactly_the_assistant_turns_and_their_end_of_turn(tokenizer):
    example = encode_record(Record("t:1", messages=CHAT), tokenizer)
    # the ids are the template's own tokenization of the conversation
    rendered = tokenizer.apply_chat_template(list(CHAT), tokenize=True, return_dict=True)
    assert example.input_ids == rendered["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    runs = _runs(example.labels)
    assert len(runs) == 2
    for (start, end), message in zip(runs, [CHAT[2], CHAT[4]]):
        turn = example.input_ids[start:end]
        assert turn[-1] == end_of_turn
        assert turn[:-1] == tokenizer(message["content"], add_special_tokens=False)["input_ids"]
        assert example.input_ids[start - len(header):start] == header  # header masked
        assert example.input_ids[end] == tokenizer("\n", add_special_tokens=False)["input_ids"][0]  # masked
        assert example.labels[start:end] == turn
    masked = [i for i, label in enumerate(example.labels) if label == IGNORE_INDEX]
    assert len(masked) + sum(end - start for start, end in runs) == len(example.input_ids)
    assert all(example.labels[i] == example.input_ids[i] for i in range(len(example.labels)) if i not in masked)


def test_default_system_prompt_is_masked(tokenizer):
    messages = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    example = encode_record(Record("t:1", messages=messages), tokenizer)
    text = tokenizer.decode(example.input_ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # the template adds it
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "hello<|im_end|>"


def test_prompt_completion_learns_completion_and_eos(tokenizer):
    example = encode_record(Record("t:1", prompt="Capital of France:", completion=" Paris"), tokenizer)
    prompt = tokenizer("Capital of France:")["input_ids"]
    completion = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + completion + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion + [tokenizer.eos_token_id]


def test_text_learns_every_token_and_eos(tokenizer):
    example = encode_record(Record("t:1", text="Hello world"), tokenizer)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels == example.input_ids
    assert example.num_loss_tokens == len(example) - 1  # the first position predicts nothing


def test_conversation_the_template_cannot_split_is_a_bad_record(tokenizer):
    # A leading assistant turn has no prefix the template can render (transformers refuses an
    # empty conversation; SmolLM2's template would put its default system prompt first).
    messages = ({"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "hi"})
    with pytest.raises(RecordError) as info:
        encode_record(Record("t:4", messages=messages), tokenizer)
    assert info.value.reason == "template_mismatch"
    data = tokenize_records(
        [Record("t:4", messages=messages), Record("t:5", text="fine")], tokenizer, skip_bad_records=True
    )
    assert data.skipped == {"template_mismatch": 1} and len(data) == 1
    with pytest.raises(DataError, match=r"^t:4: the chat template .*start with a system or user message"):
        tokenize_records([Record("t:4", messages=messages)], tokenizer)
