"""`lorakit generate` through `lorakit.cli.main` on the tiny model, against each adapter alone."""

import json

import pytest

from lorakit.cli import main
import torch

from lorakit.data.chat import chat_prompt_ids
from lorakit.generation.engine import Sampling
from lorakit.infer import complete, load_adapted
from lorakit.infer.prompting import complete_prompts
from lorakit.models import load_model

from .conftest import make_adapter


@pytest.fixture(scope="module")
def adapter_b(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter-b"), seed=1, targets=("k_proj", "up_proj"))


def reference(adapter_dir, model_dir, prompt, system=None, max_new_tokens=5):
    """transformers' greedy generate with this adapter alone (None: the base model), as text; and
    `complete`, lorakit's greedy text through its engine, gives the same."""
    model, tokenizer = load_adapted(adapter_dir) if adapter_dir else load_model(model_dir)
    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt, system)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert complete(model, tokenizer, [prompt], system=system, max_new_tokens=max_new_tokens) == [text]
    return text


def test_one_prompt_streams_the_adapters_completion(tiny_model_dir, tiny_adapter, capsys):
    code = main(["generate", "--adapter", str(tiny_adapter), "--system", "Be brief.", "--prompt", "hello there",
                 "--max-new-tokens", "5", "--precision", "fp32"])  # fp32: the reference's precision
    assert code == 0
    expected = reference(tiny_adapter, tiny_model_dir, "hello there", system="Be brief.")
    assert capsys.readouterr().out.strip() == expected


def test_prompts_with_their_adapters_are_labelled(tiny_model_dir, tiny_adapter, adapter_b, capsys):
    code = main(["generate", "--adapter", f"a={tiny_adapter}", "--adapter", f"b={adapter_b}",
                 "--prompt-for", "b", "remind me to call mom", "--prompt-for", "base", "hi",
                 "--prompt", "hello", "--max-new-tokens", "5", "--precision", "fp32"])
    assert code == 0
    out = capsys.readouterr().out
    expected = [("b", adapter_b, "remind me to call mom"), ("base", None, "hi"),
                ("a", tiny_adapter, "hello"), ("b", adapter_b, "hello")]  # a plain --prompt: every adapter
    blocks = [f"[{i}] {name}: {prompt}\n{reference(directory, tiny_model_dir, prompt)}"
              for i, (name, directory, prompt) in enumerate(expected, 1)]
    assert out == "\n\n".join(blocks) + "\n"


def test_json_with_seeded_sampling(tiny_model_dir, tiny_adapter, capsys):
    argv = ["generate", "--adapter", f"a={tiny_adapter}", "--prompt", "hello", "--prompt-for", "base", "hello",
            "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "5", "--max-new-tokens", "4",
            "--json", "--precision", "fp32"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first  # the seed makes it repeatable
    assert first["sampling"] == {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 5, "max_new_tokens": 4,
                                 "stop_token_ids": []}
    assert [(c["adapter"], c["prompt"]) for c in first["completions"]] == [("a", "hello"), ("base", "hello")]

    model, tokenizer = load_adapted([("a", tiny_adapter)])
    sampling = Sampling(temperature=0.8, top_k=50, top_p=0.9, seed=5, max_new_tokens=4)
    for c, prompt in zip(first["completions"], [("a", "hello"), ("base", "hello")]):
        alone = complete_prompts(model, tokenizer, [prompt], sampling=sampling)[0]  # the prompt alone
        assert (c["text"], c["tokens"], c["finish_reason"]) == (alone.text, len(alone.token_ids), alone.finish_reason)


def test_streamed_pieces_make_the_completion(tiny_adapter):
    model, tokenizer = load_adapted([("a", tiny_adapter)])
    pieces = []
    done = complete_prompts(model, tokenizer, [("a", "hello"), ("base", "hi")], sampling=Sampling(max_new_tokens=6),
                            on_text=lambda i, piece: pieces.append((i, piece)))
    for i, c in enumerate(done):
        assert "".join(p for j, p in pieces if j == i) == c.text
    assert len(pieces) > len(done)  # piece by piece, not one block per completion


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "a=", "--prompt", "x"], "is not NAME=DIR"),
    (["--adapter", "DIR1", "--adapter", "DIR2", "--prompt", "x"], "a bare DIR works only for a lone adapter"),
    (["--adapter", "a=MISSING", "--prompt", "x"], "no such adapter directory: a="),
    (["--adapter", "a=ADAPTER", "--prompt-for", "zzz", "x"], "'zzz', which is not loaded; choose one of base, a"),
    (["--adapter", "base=ADAPTER", "--prompt", "x"], "means the base model"),
    (["--adapter", "a=ADAPTER"], "give at least one --prompt"),
    (["--prompt", "x", "--temperature", "-1", "--top-p", "2"], "temperature must be >= 0"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, tiny_adapter, tmp_path, capsys):
    argv = [a.replace("MISSING", str(tmp_path / "missing")).replace("ADAPTER", str(tiny_adapter)) for a in argv]
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
