"""Every command and Python excerpt in README.md and docs/*.md runs as written.

Each document's fenced blocks tagged ``bash``, ``sh``, ``console`` or ``python`` run in order, in a
fresh working directory of their own (a document's blocks share it, and python blocks share one
namespace). Blocks tagged ``text`` or ``json`` (output samples, diagrams, file formats) are not
run; an untagged block is an error, so that nothing is left out unnoticed. A block that must not
run (a server that runs until Ctrl-C, a benchmark) has, on the line before it, a visible note that
starts with NOT_RUN, followed by the reason; the test counts those and checks every other block ran.

How the commands run, stated in each document that needs it:

- ``lorakit ...`` runs through `lorakit.cli.main` with the environment variables of the doc tests
  (FAST_ENV): a tiny random model with SmolLM2's tokenizer and a few steps (``$LORAKIT_MODEL``,
  ``$LORAKIT_MAX_STEPS`` and friends, the product's own option variables); a flag written in the
  document wins over them.
- ``runs/<name>`` (a placeholder for a run directory ``lorakit train`` wrote) is ``runs/name``, a
  run trained on the tiny model; ``my.jsonl`` and ``heldout.jsonl`` are small task-api JSONL files.
- ``make TARGET`` checks that the Makefile has the target; ``make demo`` runs its ``lorakit``
  command, ``make test`` is not run from inside the tests.
- Any other command runs in bash.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorakit.cli import main

ROOT = Path(__file__).resolve().parents[2]
RUNNABLE = ("bash", "sh", "console", "python")
NOT_RUN = "*Not run by the doc tests:"
FAST_ENV = {"LORAKIT_MAX_STEPS": "3", "LORAKIT_EVAL_EXAMPLES": "8", "LORAKIT_SCORE_EXAMPLES": "4",
            "LORAKIT_EXAMPLES": "4", "LORAKIT_MAX_NEW_TOKENS": "8", "LORAKIT_SAVE_EVERY": "2"}
RUN_NAMES = ("run", "demo-run", "a", "b")  # runs/<name> placeholders the documents use
# Blocks run and blocks not run (with a note) per document today: a block that stops being run,
# or a new runnable one, must show up here. A new document runs without an entry.
COUNTS = {"README.md": (5, 1), "INFERENCE.md": (9, 0), "PERFORMANCE.md": (0, 16), "SPEEDUP.md": (4, 0),
          "SERVING.md": (0, 3), "VARIANTS.md": (0, 0), "QLORA.md": (5, 0), "EXPORT.md": (4, 1),
          "PREFERENCE.md": (4, 1), "DATA.md": (3, 0), "TRACKING.md": (2, 5),
          "RUNS.md": (5, 0), "PLAYGROUND.md": (0, 2)}
DEADLINE_S = 300  # a documented command that runs longer (a server left running) fails the test


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence
    lang: str
    text: str
    not_run: str | None  # the reason given in the NOT_RUN note before the block, if any


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the NOT_RUN note before each, if any."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: a block that is never closed"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        reason = before[len(NOT_RUN):].strip(" *") if before.startswith(NOT_RUN) else None
        found.append(Block(path.name, i + 1, opening.group(1), "\n".join(lines[i + 1:end]), reason))
        i = end + 1
    return found


def commands(block: Block) -> list[str]:
    """The shell commands of a block: continuation lines joined, ``$ `` lines of a console."""
    text = block.text.replace("\\\n", " ")
    lines = text.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_every_block_is_tagged(path):
    untagged = [f"{b.doc}:{b.line}" for b in blocks(path) if not b.lang]
    assert not untagged, (f"untagged blocks {untagged}: tag commands bash and output text, so the "
                          "doc tests know what to run")
    for b in blocks(path):
        if b.not_run is not None:
            assert b.lang in RUNNABLE and len(b.not_run) > 10, \
                f"{b.doc}:{b.line}: a {NOT_RUN} note needs a reason, and a runnable block"


@pytest.fixture(scope="module")
def fast_run(tiny_model_dir, tmp_path_factory):
    """A run directory trained on the tiny model for 2 steps, the template of runs/<name>."""
    path = tmp_path_factory.mktemp("docs") / "template-run"
    assert main(["train", "--model", str(tiny_model_dir), "--max-steps", "2", "--train-examples", "16",
                 "--eval-examples", "8", "--score-examples", "0", "--save-every", "1", "--no-progress",
                 "--run-dir", str(path)]) == 0
    return path


@pytest.fixture
def workspace(tmp_path, fast_run, tiny_model_dir, monkeypatch):
    """The working directory a document's blocks run in, with the environment of the doc tests."""
    for name in RUN_NAMES:
        shutil.copytree(fast_run, tmp_path / "runs" / name)
    records = [{"messages": [{"role": "user", "content": f"water the plants in {n} days"},
                             {"role": "assistant", "content": json.dumps({"title": "Water the plants"})}]}
               for n in range(12)]
    for name in ("my.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAKIT_MODEL", str(tiny_model_dir))
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def run_command(command: str, where: str) -> None:
    command = re.sub(r"runs/<([\w-]+)>", r"runs/\1", command)
    argv = shlex.split(command, comments=True)
    if not argv:
        return
    if argv[0] == "make":
        run_make(argv[1:], where)
    elif argv[0] == "lorakit":
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), deadline(where, command):
            code = main(argv[1:])
        assert code == 0, f"{where}: `{command}` exited {code}:\n{out.getvalue()[-3000:]}"
    else:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{where}: `{command}` failed:\n{done.stdout}{done.stderr}"


@contextlib.contextmanager
def deadline(where: str, command: str):
    """Fail, instead of hanging, when a command runs past DEADLINE_S (e.g. a server)."""
    def expired(signum, frame):
        raise TimeoutError(f"{where}: `{command}` still running after {DEADLINE_S} s; if it runs "
                           f"until stopped, put a {NOT_RUN} note before its block")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(DEADLINE_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_make(targets: list[str], where: str) -> None:
    """``make TARGET``: the Makefile has it; ``demo``'s lorakit command runs, ``test`` is not
    run from inside the tests (it would run them again)."""
    makefile = (ROOT / "Makefile").read_text()
    for target in targets:
        recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.M)
        assert recipe, f"{where}: the Makefile has no target {target!r}"
        for line in recipe.group(1).splitlines():
            line = line.strip()
            if target != "test" and "bin/lorakit " in line:
                run_command("lorakit " + line.split("bin/lorakit ", 1)[1], f"{where} (make {target})")
            elif target == "test":
                assert "pytest" in line and "tests" in line, f"{where}: make test runs {line!r}"


def run_block(block: Block, namespace: dict) -> None:
    where = f"{block.doc}:{block.line}"
    if block.lang == "python":
        code = re.sub(r"runs/<([\w-]+)>", r"runs/\1", block.text)
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the document's own example
        return
    for command in commands(block):
        run_command(command, where)


@pytest.mark.slow
@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_every_block_runs_as_written(path, workspace, capsys):
    found = blocks(path)
    runnable = [b for b in found if b.lang in RUNNABLE]
    to_run = [b for b in runnable if b.not_run is None]
    ran, namespace = 0, {"__name__": "__doc_example__"}
    for block in to_run:
        run_block(block, namespace)
        ran += 1
    not_run = sum(b.not_run is not None for b in runnable)
    assert ran == len(runnable) - not_run
    assert (ran, not_run) == COUNTS.get(path.name, (ran, not_run)), (path.name, ran, not_run)
    with capsys.disabled():
        print(f"\n{path.name}: ran {ran} of {len(found)} blocks "
              f"({len(runnable) - ran} runnable ones not run, each with a note saying why)")
