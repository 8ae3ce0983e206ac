"""`compare_adapters` and `lorakit compare`: each column equals scoring that model alone with the
trainer's evaluation; disagreements are listed; the base model is loaded once; bad input exits 2."""

import contextlib
import json

import pytest

import lorakit.models.adapters
from lorakit.cli import main
from lorakit.data import Collator, load_data
from lorakit.errors import AdapterFormatError, CompatibilityError, ConfigError
from lorakit.infer import load_adapted
from lorakit.evaluation import evaluate_adapter, heldout_loss, score_examples
from lorakit.infer.compare import compare_adapters, parse_adapter_specs
from lorakit.models import load_model

from .conftest import make_adapter

N, TOKENS = 6, 4
MATCHED_BY_A = (0, 2, 3)


def write_data(path, completions):
    path.write_text("".join(json.dumps({"prompt": f"question {i}: what is {i} plus {i}?", "completion": c}) + "\n"
                            for i, c in enumerate(completions)))
    return path


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Adapters A and B (different random updates) and a data file whose references are A's own
    answers on examples 0, 2 and 3: A matches exactly those, B none."""
    root = tmp_path_factory.mktemp("compare")
    a = make_adapter(tiny_model_dir, root / "a", seed=0, targets=("q_proj", "v_proj", "lm_head"))
    b = make_adapter(tiny_model_dir, root / "b", seed=1, targets=("q_proj", "v_proj", "lm_head"))
    probe = write_data(root / "probe.jsonl", ["x"] * N)
    answers = compare_adapters({"A": a}, data=str(probe), max_new_tokens=TOKENS).column("A").predictions
    completions = [answers[i] if i in MATCHED_BY_A else "no match" for i in range(N)]
    return a, b, write_data(root / "data.jsonl", completions)


def test_each_column_equals_scoring_that_model_alone(setup, tiny_model_dir, monkeypatch):
    a, b, data = setup
    loads = []
    real = lorakit.models.adapters.load_model  # what the one loader calls
    monkeypatch.setattr(lorakit.models.adapters, "load_model", lambda *args, **kw: loads.append(args) or real(*args, **kw))
    result = compare_adapters([("A", a), ("B", b)], include_base=True, data=str(data), max_new_tokens=TOKENS)
    assert len(loads) == 1  # the base model is loaded once; the adapters are swapped on it
    monkeypatch.undo()

    assert [m.name for m in result.models] == ["base", "A", "B"] and result.n == N
    assert result.column("A").matched == [i in MATCHED_BY_A for i in range(N)]
    assert result.column("A").exact == pytest.approx(3 / N) and result.column("B").exact == 0.0
    for name, adapter in (("A", a), ("B", b)):
        alone = evaluate_adapter(adapter, data=str(data), examples=N, max_new_tokens=TOKENS)
        assert result.column(name).exact == alone.exact and result.column(name).fields == alone.fields
        model, tokenizer = load_adapted(adapter)
        examples = load_data(str(data), tokenizer=tokenizer, max_length=None).train.examples
        loss = heldout_loss(model, examples, Collator(tokenizer.pad_token_id), 32, contextlib.nullcontext)
        assert result.column(name).heldout_loss == pytest.approx(loss, rel=1e-5)

    base, tokenizer = load_model(tiny_model_dir)
    examples = load_data(str(data), tokenizer=tokenizer, max_length=None).train.examples
    alone = score_examples(base, tokenizer, examples, scorer="exact", max_new_tokens=TOKENS, keep_samples=N)
    assert result.column("base").predictions == [s["prediction"] for s in alone.samples]


def test_disagreements_list_each_answer_and_which_matched(setup):
    a, b, data = setup
    result = compare_adapters({"A": a, "B": b}, data=str(data), max_new_tokens=TOKENS)
    a_answers, b_answers = result.column("A").predictions, result.column("B").predictions
    differ = [i for i in range(N) if a_answers[i] != b_answers[i]]
    assert len(result.disagreements) == len(differ) > 0
    first = result.disagreements[0]
    i = differ[0]
    assert first.source.endswith(f"data.jsonl:{i + 1}") and f"question {i}" in first.prompt
    assert first.outputs == {"A": a_answers[i], "B": b_answers[i]}
    assert first.matched == {"A": i in MATCHED_BY_A, "B": False}
    # one adapter against itself never disagrees
    assert compare_adapters({"A": a, "A2": a}, data=str(data), max_new_tokens=TOKENS).disagreements == []


def test_the_command_prints_a_table_or_one_json_object(setup, capsys):
    a, b, data = setup
    args = ["compare", "--adapter", f"A={a}", "--adapter", f"B={b}", "--data", str(data),
            "--max-new-tokens", str(TOKENS)]
    assert main(args + ["--include-base", "--show", "1"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "base" in line and "A" in line and "B" in line)
    assert header.split() == ["base", "A", "B"]
    assert "exact match" in out and "held-out loss" in out and "50.0%" in out
    assert "disagreements:" in out and "more (--show N" in out

    assert main(args + ["--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["examples"] == N and document["models"]["A"]["matched"] == 3
    assert document["models"]["B"]["exact"] == 0.0
    assert document["disagreement_count"] == len(document["disagreements"])


def test_bad_adapter_specs_are_typed_errors_and_exit_2(setup, tmp_path, capsys):
    a, b, data = setup
    with pytest.raises(ConfigError, match="not NAME=DIR"):
        parse_adapter_specs([str(a)])
    with pytest.raises(ConfigError, match="given twice"):
        compare_adapters([("A", a), ("A", b)])
    with pytest.raises(AdapterFormatError, match="B=.*missing"):
        compare_adapters([("A", a), ("B", tmp_path / "missing")])
    with pytest.raises(ConfigError, match="base model's column"):
        compare_adapters([("base", a)], include_base=True)

    other = tmp_path / "other"
    other.mkdir()
    for f in a.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "some-other-model"}))
    with pytest.raises(CompatibilityError, match="different base models"):
        compare_adapters([("A", a), ("O", other)])

    for specs, expected in ([[f"{a}"], "not NAME=DIR"], [["=x"], "not NAME=DIR"], [[f"A={a}", f"A={b}"], "given twice"],
                            [[f"A={a}", f"bad/name={b}"], "not allowed"], [[f"A={tmp_path}/nope"], "no such adapter"],
                            [[f"A={a}", f"O={other}"], "different base models"]):
        argv = ["compare", "--data", str(data)] + [x for s in specs for x in ("--adapter", s)]
        assert main(argv) == 2, specs
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
