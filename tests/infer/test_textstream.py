"""`TextStream`: token ids to text as they come, cut at the first stop string; the pieces joined
are the whole text (cut), and no piece holds half a character or the start of a stop string."""

import pytest

from lorakit.infer.textstream import TextStream


@pytest.mark.parametrize("text,stops", [("naïve café ☕ 日本語の文 🎉🎉 done", ()),
                                        ("one, two; three: four. five", (": f", "!")),
                                        ("abc abd abe", ("abe", "abd"))])
def test_text_stream_pieces_join_to_the_cut_text(tokenizer, text, stops):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [2]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [whole.find(s) for s in stops if s in whole]
    expected_text = whole[:min(cuts)] if cuts else whole
    stream = TextStream(tokenizer, stops)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == expected_text == stream.text
    assert not any("\ufffd" in p for p in pieces)
    assert stream.stopped == bool(cuts)


def test_text_held_back_for_a_possible_stop_string_is_released_when_it_is_none(tokenizer):
    stream = TextStream(tokenizer, ("world peace",))
    ids = tokenizer("hello world wide web", add_special_tokens=False)["input_ids"]  # hello| world| wide| web
    assert [stream.push(i) for i in ids] == ["hello", " ", "world wide", " web"]  # "world" waited for " wide"
    assert stream.finish() == "" and stream.text == "hello world wide web" and not stream.stopped
