"""Kill `lorakit train` at random moments, spoil its checkpoints, and resume: the adapter it ends
with must be bitwise the one an uninterrupted run writes, no spoiled checkpoint may be loaded,
and no unfinished write (``.tmp-*``) may be left behind.

    OMP_NUM_THREADS=1 python bench/hostile/kill_resume.py            # about 5-10 minutes on 1 core
    OMP_NUM_THREADS=1 python bench/hostile/kill_resume.py --kills 3 --signals 2 --steps 12   # quicker

What it does, all with one tiny seeded random Llama (hidden 32, 2 layers, the default model's
tokenizer) on task-api, through the command line (`python -m lorakit.cli train`) in a subprocess:

1. an uninterrupted run of ``--steps`` steps saving a checkpoint every step (keeping 2), so
   that much of a run's time is spent writing checkpoints; when its files appear, and its adapter;
2. ``--kills`` runs, each SIGKILLed at a seeded random moment: one in five during the start
   (imports, config.yaml, the model, the data), two in five while a random checkpoint is being
   written (0-3 ms after its ``.tmp-step-*`` directory appears), the others anywhere in the rest
   of the run, timed from the first checkpoint's appearance (steps, writes, the final adapter), then
   resumed with ``lorakit train --resume RUN`` until done; where the run reports that it never
   started or has no checkpoint yet, the command its error gives is run instead;
3. ``--signals`` runs stopped by SIGINT / SIGTERM (alternately) at a random moment of the
   training loop (they save a checkpoint and exit 130), then resumed;
4. checkpoints spoiled on purpose in a copy of the uninterrupted run (its final adapter removed):
   a truncated file, a flipped byte, manifest ``[1, 2]``, manifest ``{}``, a missing file, and
   both checkpoints spoiled; each is resumed and must start from a checkpoint that was not spoiled.

Every run ends compared bitwise with the uninterrupted adapter, and its directory searched for
``.tmp-*`` leftovers. A table of the figures is printed last; the exit status is 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]


class Campaign:
    def __init__(self, args, work: Path, model: Path):
        self.args, self.work, self.model = args, work, model
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.rows: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self.baseline: dict | None = None

    # -- running lorakit -------------------------------------------------------------------------
    def flags(self, run_dir: Path) -> list[str]:
        a = self.args
        return ["--model", str(self.model), "--data", "task-api", "--train-examples", "48", "--batch-size", "8",
                "--max-steps", str(a.steps), "--save-every", "1", "--keep-checkpoints", "2", "--lr", "0.03",
                "--r", "4", "--lora-dropout", "0.1", "--target-modules", "q_proj", "v_proj", "--eval-every", "0",
                "--eval-examples", "4", "--score-examples", "0", "--log-every", "1", "--precision", "fp32",
                "--seed", str(a.seed), "--run-dir", str(run_dir), "--name", "kill", "--no-progress"]

    def lorakit(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lorakit.cli", *argv], env=self.env, cwd=self.work,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        proc = self.lorakit(argv)
        out, err = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def stop_at(self, argv: list[str], run_dir: Path, after: float, signum: int, *,
                anchor: str | None = None) -> tuple[int, str, str]:
        """Start lorakit and send it ``signum`` ``after`` seconds later: counted from the start,
        or from the moment a path matching ``anchor`` (a glob in the run directory) appears: the
        first checkpoint, so that a slow start on a busy machine does not shift the moment out of
        the training loop, or the temporary directory of one checkpoint's write."""
        proc = self.lorakit(argv)
        started = time.perf_counter()
        if anchor:
            while not next(iter(run_dir.glob(anchor)), None) and proc.poll() is None:
                time.sleep(0.001)
            started = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - started < after:
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=600)
        return proc.returncode, out, err

    def finish(self, run_dir: Path, label: str) -> dict:
        """Resume ``run_dir`` until it completes, following the advice of each error."""
        record = {"resumes": 0, "restarts": 0, "resumed_from": [], "warnings": [], "errors": []}
        argv = ["train", "--resume", str(run_dir), "--no-progress"]
        for _ in range(6):
            proc = self.run(argv)
            record["resumed_from"] += re.findall(r"resuming from (\S+) \(step (\d+)\)", proc.stdout)
            record["warnings"] += re.findall(r"checkpoint (\S+) is not usable \(([^)]*)", proc.stderr)
            if proc.returncode == 0:
                return record
            record["errors"].append(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
            advice = re.search(r"again with: (lorakit train .*?)\)?$", proc.stderr, re.M)
            if advice is None:
                self.failures.append(f"{label}: resume failed with exit {proc.returncode}: {proc.stderr[-1500:]}")
                return record
            if "<the options" in advice.group(1):  # the run never wrote its config: the options it was given
                argv = ["train", *self.flags(run_dir)]
            else:
                argv = shlex.split(advice.group(1))[1:] + ["--no-progress"]
            record["restarts"] += 1
        self.failures.append(f"{label}: did not complete after 6 tries")
        return record

    # -- checks ----------------------------------------------------------------------------------
    def adapter_bytes(self, run_dir: Path) -> dict[str, bytes] | None:
        from safetensors.torch import load_file

        path = run_dir / "adapter" / "adapter_model.safetensors"
        if not path.is_file():
            return None
        return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items()}

    def equal_to_baseline(self, run_dir: Path) -> bool:
        return self.adapter_bytes(run_dir) == self.baseline["tensors"]

    @staticmethod
    def leftovers(run_dir: Path) -> list[Path]:
        return [p for p in run_dir.rglob(".tmp-*")] if run_dir.exists() else []

    @staticmethod
    def phase(run_dir: Path) -> str:
        """Where a kill landed, read from what it left."""
        if not (run_dir / "config.yaml").is_file():
            return "before config.yaml"
        if (run_dir / "adapter").is_dir() and (run_dir / "report.md").is_file():
            return "after the run finished"
        tmp = [p.name for p in Leftover.scan(run_dir)]
        if any(name.startswith(".tmp-adapter") for name in tmp):
            return "writing the final adapter"
        if tmp:
            return "writing a checkpoint"
        if (run_dir / "adapter").is_dir():
            return "after the final adapter"
        if not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").glob("step-*")):
            return "before the first checkpoint"
        return "between checkpoint writes"

    # -- the parts of the campaign ---------------------------------------------------------------
    def uninterrupted(self) -> None:
        """The reference run, watched: when its config.yaml, first checkpoint and adapter appear."""
        run_dir = self.work / "uninterrupted"
        proc = self.lorakit(["train", *self.flags(run_dir)])
        started = time.perf_counter()
        marks: dict[str, float] = {}
        watched = {"config": run_dir / "config.yaml", "first": run_dir / "checkpoints" / "step-000001",
                   "adapter": run_dir / "adapter"}
        while proc.poll() is None:
            for key, path in watched.items():
                if key not in marks and path.exists():
                    marks[key] = time.perf_counter() - started
            time.sleep(0.005)
        out, err = proc.communicate()
        wall = time.perf_counter() - started
        if proc.returncode != 0 or len(marks) < 3:
            raise SystemExit(f"the uninterrupted run failed ({marks}):\n{err}")
        self.baseline = {"dir": run_dir, "wall": wall, "tensors": self.adapter_bytes(run_dir), **marks}
        self.rows.append(("uninterrupted run", f"{self.args.steps} steps, {self.args.steps - 1} checkpoint writes; "
                                               f"config.yaml at {marks['config']:.1f} s, first checkpoint at "
                                               f"{marks['first']:.1f} s, adapter at {marks['adapter']:.1f} s, "
                                               f"exit at {wall:.1f} s"))

    def kills(self, rng: random.Random) -> None:
        n, b = self.args.kills, self.baseline
        # one in five during the start (imports, the run directory, the model, the data), two in
        # five during the write of a random checkpoint (0-3 ms after its temporary directory
        # appears), the rest anywhere from the first checkpoint to the exit
        starts, writes = max(1, n // 5), (2 * n) // 5
        first = "checkpoints/step-000001"
        moments = [(rng.uniform(0.0, b["first"]), None) for _ in range(starts)] + \
                  [(rng.uniform(0.0, 0.003), f"checkpoints/.tmp-step-{rng.randint(2, self.args.steps - 1):06d}-*")
                   for _ in range(writes)] + \
                  [(rng.uniform(0.0, b["wall"] - b["first"]), first) for _ in range(n - starts - writes)]
        equal = clean = 0
        phases: dict[str, int] = {}
        resumes = restarts = 0
        for i, (at, anchor) in enumerate(moments):
            run_dir = self.work / f"kill-{i}"
            code, _, err = self.stop_at(["train", *self.flags(run_dir)], run_dir, at, signal.SIGKILL, anchor=anchor)
            where = self.phase(run_dir) if code == -signal.SIGKILL else "after the run finished"
            phases[where] = phases.get(where, 0) + 1
            half = len(Leftover.scan(run_dir))
            record = self.finish(run_dir, f"kill {i} at {at:.2f} s")
            resumes += len(record["resumed_from"])
            restarts += record["restarts"]
            ok = self.equal_to_baseline(run_dir)
            left = self.leftovers(run_dir)
            equal += ok
            clean += not left
            print(f"  kill {i}: SIGKILL {f'{at * 1000:.1f} ms' if at < 0.1 else f'{at:.2f} s'} after {Path(anchor).name if anchor else 'the start'} ({where}; {half} unfinished write(s) left), "
                  f"resumed {len(record['resumed_from'])}x, restarted {record['restarts']}x: "
                  f"{'bitwise equal' if ok else 'DIFFERENT'}, {len(left)} .tmp left", flush=True)
            if not ok:
                self.failures.append(f"kill {i}: the adapter differs from the uninterrupted run's")
            if left:
                self.failures.append(f"kill {i}: leftovers {left}")
        self.rows.append(("kill -9 at random moments", f"{equal} of {n} bitwise equal"))
        self.rows.append(("  where the kills landed", ", ".join(f"{k}: {v}" for k, v in sorted(phases.items()))))
        self.rows.append(("  resumes / restarts (as the error advised)", f"{resumes} / {restarts}"))
        self.rows.append(("  kill -9 runs with .tmp dirs left after resume", f"{n - clean} of {n}"))

    def signals(self, rng: random.Random) -> None:
        n, b = self.args.signals, self.baseline
        equal = clean = saved = 0
        for i in range(n):
            signum = (signal.SIGINT, signal.SIGTERM)[i % 2]
            at = rng.uniform(0.0, b["adapter"] - b["first"])  # in the training loop
            run_dir = self.work / f"signal-{i}"
            code, _, err = self.stop_at(["train", *self.flags(run_dir)], run_dir, at, signum,
                                        anchor="checkpoints/step-000001")
            saved += "checkpoint saved to" in err
            record = self.finish(run_dir, f"{signum.name} {i}")
            ok = self.equal_to_baseline(run_dir)
            left = self.leftovers(run_dir)
            equal += ok
            clean += not left
            said = err.strip().splitlines()[-1][:150] if err.strip() else ""
            print(f"  signal {i}: {signum.name} {at:5.2f} s after step-000001, exit {code} ({said}), "
                  f"resumed {len(record['resumed_from'])}x: {'bitwise equal' if ok else 'DIFFERENT'}", flush=True)
            if not ok:
                self.failures.append(f"signal {i}: the adapter differs")
            if left:
                self.failures.append(f"signal {i}: leftovers {left}")
        self.rows.append(("SIGINT / SIGTERM at random moments", f"{equal} of {n} bitwise equal "
                                                                f"({saved} saved a checkpoint on the signal)"))
        self.rows.append(("  signalled runs with .tmp dirs left after resume", f"{n - clean} of {n}"))

    def corruptions(self) -> None:
        base = self.baseline["dir"]
        newest, older = sorted((base / "checkpoints").glob("step-*"))[-1].name, \
            sorted((base / "checkpoints").glob("step-*"))[-2].name

        def truncate(ck: Path):
            path = ck / "optimizer.safetensors"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

        def flip(ck: Path):
            path = ck / "adapter" / "adapter_model.safetensors"
            data = bytearray(path.read_bytes())
            data[len(data) - 7] ^= 0x01
            path.write_bytes(bytes(data))

        def manifest_list(ck: Path):
            (ck / "manifest.json").write_text("[1, 2]")

        def manifest_empty(ck: Path):
            (ck / "manifest.json").write_text("{}")

        def missing(ck: Path):
            (ck / "state.json").unlink()

        kinds = {"truncated optimizer.safetensors": truncate, "one flipped bit in the adapter": flip,
                 "manifest [1, 2]": manifest_list, "manifest {}": manifest_empty, "state.json missing": missing}
        cases = [(name, fn, [newest]) for name, fn in kinds.items()]
        cases.append(("both checkpoints spoiled (flipped bit, manifest {})", None, [newest, older]))
        loaded_spoiled = equal = clean = 0
        for i, (name, fn, spoiled) in enumerate(cases):
            run_dir = self.work / f"spoiled-{i}"
            shutil.copytree(base, run_dir)
            shutil.rmtree(run_dir / "adapter")
            (run_dir / "report.md").unlink()
            if fn is None:
                flip(run_dir / "checkpoints" / newest)
                manifest_empty(run_dir / "checkpoints" / older)
            else:
                fn(run_dir / "checkpoints" / spoiled[0])
            record = self.finish(run_dir, f"spoiled: {name}")
            used = [Path(p).name for p, _ in record["resumed_from"]]
            bad = [u for u in used if u in spoiled]
            warned = sorted({Path(p).name for p, _ in record["warnings"]})
            loaded_spoiled += bool(bad)
            ok = self.equal_to_baseline(run_dir)
            left = self.leftovers(run_dir)
            equal += ok
            clean += not left
            how = (f"resumed from {used[0]}" if used else "no usable checkpoint: restarted as advised") \
                if not bad else f"LOADED {bad}"
            print(f"  spoiled {i}: {name}: warned about {warned}; {how}: "
                  f"{'bitwise equal' if ok else 'DIFFERENT'}", flush=True)
            if bad or not ok or left or sorted(spoiled) != warned:
                self.failures.append(f"spoiled {name}: used {used}, warned {warned}, equal {ok}, leftovers {left}")
        n = len(cases)
        self.rows.append(("spoiled checkpoints loaded", f"{loaded_spoiled} of {n}"))
        self.rows.append(("  spoiled, then resumed: bitwise equal", f"{equal} of {n}"))
        self.rows.append(("  spoiled runs with .tmp dirs left after resume", f"{n - clean} of {n}"))


class Leftover:
    @staticmethod
    def scan(run_dir: Path) -> list[Path]:
        """The unfinished writes a kill left: temporary directories in the run directory (the
        final adapter's) and in checkpoints/ (a checkpoint's), not those nested inside them."""
        return [p for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.glob(".tmp-*") if p.is_dir()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLed runs")
    p.add_argument("--signals", type=int, default=4, help="runs stopped by SIGINT / SIGTERM")
    p.add_argument("--steps", type=int, default=40, help="steps of each run (a checkpoint after each)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the training and the kill moments")
    p.add_argument("--work", type=Path, help="where the runs go (default: a temporary directory, removed)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lorakit-kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        campaign = Campaign(args, work, tiny_model(work / "tiny-model", seed=args.seed))
        rng = random.Random(args.seed)
        print("uninterrupted run ...", flush=True)
        campaign.uninterrupted()
        print(f"kill -9 x{args.kills} ...", flush=True)
        campaign.kills(rng)
        print(f"SIGINT / SIGTERM x{args.signals} ...", flush=True)
        campaign.signals(rng)
        print("spoiled checkpoints ...", flush=True)
        campaign.corruptions()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    campaign.rows.append(("failures", str(len(campaign.failures))))
    campaign.rows.append(("campaign wall time", f"{time.perf_counter() - started:.0f} s"))
    width = max(len(k) for k, _ in campaign.rows)
    print("\nfigures")
    for key, value in campaign.rows:
        print(f"  {key:<{width}}  {value}")
    for failure in campaign.failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(dict(campaign.rows), indent=2) + "\n")
    return 1 if campaign.failures else 0


if __name__ == "__main__":
    sys.exit(main())
