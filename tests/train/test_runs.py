"""`lorakit runs`: real runs of a tiny model (finished, interrupted by a signal, failed on a NaN loss,
killed with SIGKILL, resumed) listed, sorted and compared, each row checked against the run's own
files; and status.json, which the trainer writes, read back."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml
from matplotlib.image import imread

import lorakit.train.loop as loop
import lorakit.train.objectives as objectives
from lorakit import LoraConfig
from lorakit.cli import main
from lorakit.errors import TrainingError, TrainingInterrupted
from lorakit.train import TrainConfig, train
from lorakit.train.compare import compare_runs, comparison_figure
from lorakit.train.runs import RunRow, format_table, read_run
from lorakit.train.status import read_status

KILL_AT_STEP_3 = textwrap.dedent("""
    import os, signal, sys
    import lorakit.train.loop as loop
    from lorakit.train import TrainConfig, train

    real = loop.lr_at

    def lr_at(step, **kwargs):
        if step == 2:  # computing the third step, after the checkpoint of step 2
            os.kill(os.getpid(), signal.SIGKILL)
        return real(step, **kwargs)

    loop.lr_at = lr_at
    train(TrainConfig.from_settings(**eval(sys.argv[1])), progress=False)
""")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A directory of runs: finished, interrupted, failed, killed, resumed (from a copy of the
    interrupted one), a spoiled copy of the finished one, and a directory that is no run."""
    root = tmp_path_factory.mktemp("runs")

    def config(name, **overrides):
        values = dict(model=str(tiny_model_dir), data="task-api", train_examples=48, batch_size=8, max_steps=6,
                      learning_rate=3e-2, r=4, target_modules=["q_proj", "v_proj", "lm_head"], eval_every=3,
                      eval_examples=16, score_examples=4, max_new_tokens=6, save_every=2, log_every=1,
                      precision="fp32", run_dir=str(root / name), name=name)
        return TrainConfig.from_settings(**{**values, **overrides})

    train(config("finished"), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        real_lr = loop.lr_at

        def lr_at(step, **kwargs):  # SIGINT while computing the third step
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return real_lr(step, **kwargs)

        mp.setattr(loop, "lr_at", lr_at)
        with pytest.raises(TrainingInterrupted, match="step 3"):
            train(config("interrupted", r=8, learning_rate=1e-2), progress=False)
    shutil.copytree(root / "interrupted", root / "resumed")
    train(config("resumed", r=8, learning_rate=1e-2), resume=True, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        real_loss, calls = objectives.loss_sum, []

        def poisoned(model, batch):  # the second step's loss is NaN
            calls.append(1)
            loss, count = real_loss(model, batch)
            return (loss * float("nan"), count) if len(calls) == 2 else (loss, count)

        mp.setattr(objectives, "loss_sum", poisoned)
        with pytest.raises(TrainingError, match="step 2"):
            train(config("failed", score_examples=0), progress=False)
    fields = {k: v for k, v in config("killed", score_examples=0).to_dict().items() if k != "extra"}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP_3, repr(fields)], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    shutil.copytree(root / "finished", root / "spoiled")
    (root / "spoiled" / "config.yaml").write_text("lora: [r: 4\n")
    with open(root / "spoiled" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line cut short
    (root / "notes").mkdir()
    (root / "notes" / "ideas.txt").write_text("not a run")
    return root


def run_cli(capsys, *argv):
    code = main(["runs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def own_files(run_dir):
    """What a row should say, read here from the run's own files."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    lora = {**LoraConfig().to_dict(), **config["lora"]}  # config.yaml keeps the fields that are not defaults
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [m for m in records if m["kind"] == "train"]
    evals = [m for m in records if m["kind"] == "eval"]
    scores = {m["phase"]: m["exact"] for m in records if m["kind"] == "score"}
    checkpoints = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    return {"model": config["model"], "data": config["data"], "r": lora["r"],
            "lora_alpha": lora["lora_alpha"], "target_modules": sorted(lora["target_modules"]),
            "steps": max([train_steps[-1]["step"], *checkpoints]), "train_seconds": train_steps[-1]["elapsed_s"],
            "heldout_before": evals[0]["eval_loss"],
            "heldout_after": evals[-1]["eval_loss"] if len(evals) > 1 else None,
            "score_before": scores.get("before"), "score_after": scores.get("after")}


def test_the_trainer_records_how_each_run_ended(runs):
    here = socket.gethostname()
    finished, interrupted, failed = (json.loads((runs / n / "status.json").read_text())
                                     for n in ("finished", "interrupted", "failed"))
    assert (finished["status"], finished["pid"], finished["hostname"], finished["planned_steps"]) == \
        ("finished", os.getpid(), here, 6)
    assert finished["ended"] >= finished["started"] and finished["message"] is None
    assert interrupted["status"] == "interrupted" and interrupted["message"].startswith("SIGINT at step 3")
    assert failed["status"] == "failed"
    assert failed["message"].startswith("TrainingError: the training loss became nan at step 2")
    killed = json.loads((runs / "killed" / "status.json").read_text())
    assert killed["status"] == "running" and killed["pid"] != os.getpid()  # it never wrote how it ended
    assert read_status(runs / "killed").status == "killed"
    resumed = json.loads((runs / "resumed" / "status.json").read_text())
    assert (resumed["status"], resumed["resumes"], resumed["started"]) == ("finished", 1, interrupted["started"])


def test_json_fields_come_from_each_runs_own_files(runs, capsys):
    code, out, _ = run_cli(capsys, "--dir", str(runs), "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"finished", "interrupted", "resumed", "failed", "killed", "spoiled"}  # notes/ is no run
    expected = {"finished": ("finished", 6), "interrupted": ("interrupted", 6), "resumed": ("finished", 6),
                "failed": ("failed", 6), "killed": ("killed", 6)}
    for name, (status, planned) in expected.items():
        row = rows[name]
        assert row | own_files(runs / name) == row, name  # every field read from the files, as they hold it
        assert (row["status"], row["planned_steps"], row["problem"]) == (status, planned, None), name
        assert row["date"] == json.loads((runs / name / "status.json").read_text())["started"]
    assert [rows[n]["steps"] for n in ("finished", "interrupted", "failed", "killed")] == [6, 3, 1, 2]
    assert rows["interrupted"]["message"].startswith("SIGINT at step 3; checkpoint saved")
    assert re.fullmatch(r"process \d+ ended without recording how \(killed, .*\); continue from step 2 with: "
                        rf"lorakit train --resume {re.escape(str(runs / 'killed'))}", rows["killed"]["message"])
    assert rows["failed"]["heldout_after"] is None and rows["failed"]["score_after"] is None


def test_a_spoiled_run_is_shown_with_its_problem(runs, capsys):
    code, out, _ = run_cli(capsys, "--dir", str(runs), "--json")
    spoiled = next(r for r in json.loads(out) if r["name"] == "spoiled")
    assert "config.yaml" in spoiled["problem"] and "metrics.jsonl: 1 line(s)" in spoiled["problem"]
    assert spoiled["model"] is None and spoiled["status"] == "finished"  # from its status.json
    assert spoiled["steps"] == own_files(runs / "finished")["steps"]  # the metrics that read are used
    code, out, _ = run_cli(capsys, "--dir", str(runs))
    notes = [line for line in out.splitlines() if line.startswith("spoiled ")]
    assert len(notes) == 2  # its table row, then the note saying where the YAML breaks
    assert "config.yaml is not valid YAML (line 2, column 1: expected ',' or ']'" in notes[1]


def test_the_table_has_a_row_per_run_and_aligned_columns(runs, capsys):
    code, out, _ = run_cli(capsys, "--dir", str(runs))
    lines = out.splitlines()
    header, rows = lines[0], {line.split()[0]: line for line in lines[1:7]}
    assert header.split()[:3] == ["RUN", "STARTED", "MODEL"] and header.endswith("STATUS")
    status_at = header.index("STATUS")
    assert {name: line[status_at:] for name, line in rows.items()} == {
        "finished": "finished", "interrupted": "interrupted", "resumed": "finished", "failed": "failed",
        "killed": "killed", "spoiled": "finished"}
    cells = re.split(r"\s{2,}", rows["finished"])
    files = own_files(runs / "finished")
    assert cells[2:8] == [os.path.basename(files["model"]), "task-api", "4", "4", "lm_head,q_proj,v_proj", "6/6"]
    assert cells[9] == f"{files['heldout_before']:.4g} -> {files['heldout_after']:.4g}"
    failed = own_files(runs / "failed")
    assert re.split(r"\s{2,}", rows["failed"])[7:10] == [
        "1/6", f"{round(failed['train_seconds'])}s", f"{failed['heldout_before']:.4g} -> ?"]
    notes = out.split("\n\n", 1)[1]
    assert "failed: TrainingError: the training loss became nan" in notes
    assert "lorakit train --resume" in notes  # the interrupted run's note says how to continue


def test_sorting_by_a_column_and_reversed(runs, capsys):
    def order(*flags):
        code, out, _ = run_cli(capsys, "--dir", str(runs), "--json", *flags)
        assert code == 0
        return [(r["name"], r["date"], r["steps"], r["heldout_after"]) for r in json.loads(out)]

    by_date = order()
    assert [(d, n) for n, d, _, _ in by_date] == sorted((d, n) for n, d, _, _ in by_date)  # oldest first
    assert order("--reverse") == sorted(by_date, key=lambda r: (r[1], r[0]), reverse=True)
    assert [s for _, _, s, _ in order("--sort", "steps")] == [1, 2, 3, 6, 6, 6]
    losses = order("--sort", "loss", "--reverse")
    assert {name for name, *_ in losses[-2:]} == {"failed", "killed"}  # no held-out loss after a step: last
    assert [loss for *_, loss in losses[:-2]] == sorted((loss for *_, loss in losses[:-2]), reverse=True)
    with pytest.raises(SystemExit):
        main(["runs", "--sort", "lr"])  # not a column: argparse lists the choices
    assert "invalid choice" in capsys.readouterr().err


def test_compare_shows_the_settings_that_differ_and_plots_both_runs(runs, capsys, tmp_path):
    plot = tmp_path / "both.png"
    code, out, _ = run_cli(capsys, "--dir", str(runs), "--compare", "finished", str(runs / "interrupted"),
                           "--plot", str(plot))
    assert code == 0
    section = out.split("settings that differ")[1].split("results")[0]
    differing = {line.split()[0]: line.split()[1:] for line in section.strip().splitlines()}
    assert differing == {"learning_rate": ["0.03", "0.01"], "lora.lora_alpha": ["4", "8"], "lora.r": ["4", "8"],
                         "name": ["finished", "interrupted"]}
    results = out.split("results")[1]
    assert re.search(r"steps\s+6/6\s+3/6", results) and re.search(r"status\s+finished\s+interrupted", results)
    assert f"plot: {plot}" in out
    assert imread(plot).shape == (450, 800, 4)  # a PNG of the figure's size

    figure = comparison_figure(compare_runs(runs / "finished", runs / "interrupted"))
    lines = {line.get_label(): list(zip(*line.get_data())) for line in figure.axes[0].lines}
    for name in ("finished", "interrupted"):
        records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert lines[f"{name}: training"] == [(m["step"], m["loss"]) for m in records if m["kind"] == "train"]
        assert lines[f"{name}: held-out"] == [(m["step"], m["eval_loss"]) for m in records if m["kind"] == "eval"]

    code, out, _ = run_cli(capsys, "--dir", str(runs), "--compare", "finished", "resumed", "--plot", str(plot))
    assert "lora.r" in out and "max_steps" not in out  # equal settings are not listed


def test_compare_takes_run_names_and_lists_the_runs_when_one_is_unknown(runs, capsys):
    code, _, err = run_cli(capsys, "--dir", str(runs), "--compare", "finished", "nosuchrun")
    assert code == 2
    assert "no run 'nosuchrun'" in err and "failed, finished, interrupted, killed, resumed, spoiled" in err
    code, _, err = run_cli(capsys, "--dir", str(runs), "--compare", "finished", "e")  # in several names
    assert code == 2 and "matches" in err and "give one's full name" in err
    code, out, _ = run_cli(capsys, "--dir", str(runs), "--compare", "finish", "kill")
    assert code == 0 and (runs / "compare-finished-killed.png").is_file()  # by default beside the runs


def test_a_missing_or_empty_directory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--dir", str(tmp_path / "nowhere"))
    assert code == 2 and "no such directory" in err and "--dir" in err
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path))
    assert code == 0 and out.startswith(f"no runs under {tmp_path}")
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path), "--json")
    assert json.loads(out) == []


def test_a_run_whose_process_is_alive_is_running(runs, tmp_path):
    shutil.copytree(runs / "killed", tmp_path / "alive")
    status = json.loads((tmp_path / "alive" / "status.json").read_text())
    (tmp_path / "alive" / "status.json").write_text(json.dumps({**status, "pid": os.getpid()}))
    row = read_run(tmp_path / "alive")
    assert (row.status, row.message, row.steps, row.planned_steps) == ("running", None, 2, 6)
    (tmp_path / "alive" / "status.json").write_text(json.dumps({**status, "hostname": "elsewhere"}))
    assert read_run(tmp_path / "alive").status == "running"  # another machine's process: not checked from here


def test_long_values_are_shortened_and_an_older_run_is_inferred_from_its_files(tmp_path):
    row = RunRow(name="20261207-014143-" + "x" * 40, path="p", model="/models/" + "m" * 40, r=16, lora_alpha=32,
                 target_modules=["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    header, line = format_table([row]).splitlines()
    cells = re.split(r"\s{2,}", line)
    assert len(cells[0]) == 34 and "..." in cells[0] and len(cells[2]) == 24 and cells[2].startswith("mmm")
    assert cells[6] == "down_proj,gate_proj,+5"
    old = tmp_path / "20250101-120000-old"
    (old / "checkpoints" / "step-000004").mkdir(parents=True)
    (old / "config.yaml").write_text("name: old\n")
    row = read_run(old)
    assert (row.status, row.steps, row.date) == ("interrupted", 4, "2025-01-01T12:00:00")
    assert "no status.json" in row.message and f"lorakit train --resume {old}" in row.message
    (old / "status.json").write_text('{"status": "running", "pid": "me"}')
    row = read_run(old)
    assert row.status == "interrupted" and "status.json cannot be read (not a status record" in row.problem
