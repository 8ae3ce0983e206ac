"""`lorakit train` on several processes (torch.distributed, gloo on this CPU, 2 processes on
127.0.0.1): DDP and FSDP2 give the run of one process with the whole batch; rank 0 alone writes the
run; the adapter is whole and loads in PEFT; two nodes on loopback; a rank killed mid-run, resumed."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import TrainConfig, train
from lorakit.train import distributed
from lorakit.train.distributed import World, rank_share

# one thread per process: two processes that each use both cores slow each other tens of times
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _settings(model_dir, run_dir, **overrides):
    values = dict(model=str(model_dir), data="task-api", train_examples=40, batch_size=8, grad_accum=2, max_steps=3,
                  learning_rate=3e-2, r=4, target_modules=["q_proj", "v_proj", "lm_head"], eval_every=0,
                  eval_examples=8, score_examples=0, log_every=1, save_every=0, precision="fp32",
                  run_dir=str(run_dir), name="dist", warmup_ratio=0.0)
    values.update(overrides)
    return values


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        # --rank, not --r: torchrun's parser takes "--r" for an abbreviation of its own options
        flag = {"learning_rate": "--lr", "r": "--rank"}.get(key, "--" + key.replace("_", "-"))
        out += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return out


def _lorakit(*args, timeout=300, check=True):
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_run(got: Path, want: Path, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(_losses(got)), torch.tensor(_losses(want)), rtol=rtol, atol=atol)
    a, b = _adapter(got), _adapter(want)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One process, batch 8: the run that 2 processes x batch 4 must reproduce."""
    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    train(TrainConfig.from_settings(**_settings(tiny_model_dir, run_dir)), progress=False)
    return run_dir


def test_a_global_batch_is_split_among_the_ranks_without_loss_or_overlap():
    for n in range(0, 12):
        for size in (1, 2, 3, 4):
            parts = [rank_share(list(range(n)), World(r, size, r, size, torch.device("cpu"))) for r in range(size)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_of_batch_4_train_as_one_of_batch_8(strategy, reference, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = _lorakit("train", "--nproc", "2", "--strategy", strategy, "--no-progress",
                    *_flags(_settings(tiny_model_dir, run_dir, batch_size=4)))
    _assert_same_run(run_dir, reference)
    assert "2 processes" in done.stdout and done.stdout.count("adapter:") == 1  # rank 0 alone prints the run
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in reference.iterdir() if not p.name.startswith("."))
    report = (run_dir / "report.md").read_text()
    assert "x 2 processes" in report and strategy in report
    # DDP: each process holds the whole frozen model; FSDP2: half of it
    held = float(re.search(r"frozen weights held by each process: ([\d.,]+) MiB", done.stdout).group(1))
    from transformers import AutoModelForCausalLM

    whole = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert held == pytest.approx(whole / 2**20 / (2 if strategy == "fsdp" else 1), abs=0.06)
    if strategy == "fsdp":  # the adapter gathered whole (not one rank's slice), a PEFT directory
        peft = pytest.importorskip("peft")
        from transformers import AutoModelForCausalLM

        from lorakit import PeftModel

        ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                str(run_dir / "adapter")).eval()
        ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         str(run_dir / "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


DDP_SYNC = """
import json, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
sys.path.insert(0, sys.argv[1])
from core.tiny import tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.train import distributed
from lorakit.train.objectives import SupervisedObjective

world = distributed.join_world()
torch.manual_seed(0)
trained = distributed.wrap(get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"])), world, "ddp",
                           SupervisedObjective())
reductions = []
trained.register_comm_hook(None, lambda group, bucket: reductions.append(bucket.index()) or allreduce_hook(group, bucket))
ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(world.rank))
seen = []
for micro in range(3):  # one optimizer step of 3 micro-batches
    with distributed.micro_step(trained, last=micro == 2):
        loss, _, _ = trained({"input_ids": ids, "labels": ids})
        loss.backward()
    seen.append(len(reductions))
grads = [p.grad.clone() for p in trained.parameters() if p.requires_grad]
totals = distributed.all_sum([float(sum(g.sum() for g in grads))], world)
if world.is_main:
    print(json.dumps({"seen": seen, "grad_sum": float(sum(g.sum() for g in grads)), "all": totals[0]}))
distributed.barrier(world)
distributed.leave_world()  # as the trainer does: a process that exits with its group open may abort in gloo
"""


def test_ddp_reduces_the_adapter_gradients_once_per_optimizer_step(tmp_path):
    script = tmp_path / "ddp_sync.py"
    script.write_text(DDP_SYNC)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(Path(__file__).parents[1])], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # no reduction on the first two micro-batches; the last one reduces every bucket once
    assert result["seen"][:2] == [0, 0] and result["seen"][2] >= 1
    # after it every rank holds the same (averaged) gradient
    assert result["all"] == pytest.approx(2 * result["grad_sum"], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_one_adapter(reference, tiny_model_dir, tmp_path):
    run_dir, port = tmp_path / "run", _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", "lorakit-test", "-m", "lorakit", "train",
                               "--no-progress", *_flags(_settings(tiny_model_dir, run_dir, batch_size=4))],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    _assert_same_run(run_dir, reference)


def _workers(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the processes the launcher started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), None)
        if ppid == launcher.pid and rank is not None:
            found[int(rank)] = int(entry.name)
    return found


def test_a_rank_killed_mid_run_ends_the_job_and_the_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    settings = _settings(tiny_model_dir, tmp_path / "run", batch_size=4, max_steps=12, save_every=1,
                         keep_checkpoints=2, train_examples=40)
    whole = _settings(tiny_model_dir, tmp_path / "whole", batch_size=4, max_steps=12, train_examples=40)
    _lorakit("train", "--nproc", "2", "--no-progress", *_flags(whole))

    launcher = subprocess.Popen([sys.executable, "-m", "lorakit", "train", "--nproc", "2", "--no-progress",
                                 *_flags(settings)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    checkpoints = Path(settings["run_dir"]) / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints / "step-000003").is_dir():  # a condition polled, not a guess at a duration
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.01)
    workers = _workers(launcher)
    assert sorted(workers) == [0, 1]
    for pid in workers.values():
        os.kill(pid, signal.SIGSTOP)  # hold both mid-run, then kill one
    os.kill(workers[1], signal.SIGKILL)
    os.kill(workers[0], signal.SIGCONT)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "rank 1 of 2 was killed by SIGKILL" in err
    assert not (Path(settings["run_dir"]) / "adapter").exists()

    resumed = _lorakit("train", "--nproc", "2", "--resume", settings["run_dir"], "--no-progress")
    assert "resuming from" in resumed.stdout
    a, b = _adapter(Path(settings["run_dir"])), _adapter(Path(whole["run_dir"]))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert _losses(Path(settings["run_dir"])) == pytest.approx(_losses(Path(whole["run_dir"])), rel=1e-5)


def test_ctrl_c_stops_every_rank_after_the_same_step_with_one_checkpoint(tiny_model_dir, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (the launcher passes it on too)."""
    settings = _settings(tiny_model_dir, tmp_path / "run", batch_size=4, max_steps=400)
    launcher = subprocess.Popen([sys.executable, "-m", "lorakit", "train", "--nproc", "2", "--no-progress",
                                 *_flags(settings)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    metrics = Path(settings["run_dir"]) / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and '"train"' in metrics.read_text()):  # training has started
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.01)
    os.killpg(launcher.pid, signal.SIGINT)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err[-2000:]
    saved = sorted((Path(settings["run_dir"]) / "checkpoints").iterdir())
    assert len(saved) == 1  # once, by rank 0, at the step every rank stopped after
    lines = [line for line in err.splitlines() if line.startswith("interrupted (rank")]
    assert len(lines) == 2 and all(f"checkpoint saved to {saved[0]}" in line for line in lines)
    assert "--nproc 2" in lines[0]
    step = int(saved[0].name.split("-")[1])
    assert step < 400 and json.loads((saved[0] / "state.json").read_text())["step"] == step


def test_nproc_called_from_python_puts_back_the_callers_signal_handlers(tiny_model_dir, tmp_path, monkeypatch):
    from lorakit.cli import main

    monkeypatch.setenv("LORAKIT_THREADS", "1")
    wanted = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    settings = _settings(tiny_model_dir, tmp_path / "run", batch_size=4, max_steps=1)
    assert main(["train", "--nproc", "2", "--no-progress", *_flags(settings)]) == 0
    assert {s: signal.getsignal(s) for s in wanted} == wanted
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_resuming_on_another_number_of_processes_says_how(tiny_model_dir, tmp_path):
    settings = _settings(tiny_model_dir, tmp_path / "run", batch_size=4, max_steps=4, save_every=2)
    _lorakit("train", "--nproc", "2", "--no-progress", *_flags(settings))
    done = _lorakit("train", "--resume", settings["run_dir"], "--no-progress", check=False)
    assert done.returncode == 2
    assert "written by a run on 2 processes, resumed on one process" in done.stderr
    assert "--nproc 2" in done.stderr


def test_an_error_on_every_rank_is_one_line_each_and_the_exit_code_of_a_bad_input(tiny_model_dir, tmp_path):
    done = _lorakit("train", "--nproc", "2", "--no-progress", "--data", str(tmp_path / "missing.jsonl"),
                    "--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "(rank 0 of 2)" in done.stderr and "missing.jsonl" in done.stderr
    assert "exited with code 2" in done.stderr


def test_ddp_on_a_4bit_base_trains_as_one_process_and_fsdp_is_refused(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    one = tmp_path / "one"
    train(TrainConfig.from_settings(**_settings(tiny_model_dir, one, quantize="nf4")), progress=False)
    two = tmp_path / "two"
    _lorakit("train", "--nproc", "2", "--no-progress", *_flags(_settings(tiny_model_dir, two, batch_size=4,
                                                                             quantize="nf4")))
    _assert_same_run(two, one)
    done = _lorakit("train", "--nproc", "2", "--strategy", "fsdp", "--no-progress",
                    *_flags(_settings(tiny_model_dir, tmp_path / "fsdp", batch_size=4, quantize="nf4")), check=False)
    assert done.returncode == 2
    assert "FSDP2 does not shard bitsandbytes' quantized weights; use --strategy ddp" in done.stderr


def test_dpo_on_two_processes_trains_as_one_and_fsdp_is_refused(tiny_model_dir, tmp_path):
    """The reference forward runs inside the step on every rank; the pairs of a global batch are split."""
    prefs = dict(method="dpo", data="task-api-prefs", learning_rate=1e-2, target_modules=["q_proj", "v_proj"])
    one = tmp_path / "one"
    train(TrainConfig.from_settings(**_settings(tiny_model_dir, one, **prefs)), progress=False)
    two = tmp_path / "two"
    _lorakit("train", "--nproc", "2", "--no-progress", *_flags(_settings(tiny_model_dir, two, batch_size=4, **prefs)))
    _assert_same_run(two, one)
    done = _lorakit("train", "--nproc", "2", "--strategy", "fsdp", "--no-progress",
                    *_flags(_settings(tiny_model_dir, tmp_path / "fsdp", batch_size=4, **prefs)), check=False)
    assert done.returncode == 2 and "--strategy ddp" in done.stderr


def test_the_exit_code_reported_is_the_failing_process_not_a_peer_aborted_as_it_left(monkeypatch, capsys):
    """Both ranks refuse a bad option (code 2); one is aborted by gloo (SIGABRT) as its peer leaves,
    and is recorded first: the launcher still reports the refusal's code 2. A rank killed first,
    whose peer then fails on the lost connection (code 1), is reported as killed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failure(rank, code, when):
        done = ProcessFailure(local_rank=rank, pid=10 + rank, exitcode=code, error_file="")
        done.timestamp = when
        return done

    failures = {}

    def launcher(config, entrypoint):
        def run(*args):
            raise ChildFailedError("lorakit", dict(failures))
        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", launcher)
    failures.update({1: failure(1, -int(signal.SIGABRT), 100), 0: failure(0, 2, 101)})
    assert distributed.launch(2, ["-m", "lorakit", "train"]) == 2
    assert "rank 0 of 2 exited with code 2" in capsys.readouterr().err
    failures.update({1: failure(1, -int(signal.SIGKILL), 100), 0: failure(0, 1, 101)})
    assert distributed.launch(2, ["-m", "lorakit", "train"]) == 1
    assert "rank 1 of 2 was killed by SIGKILL" in capsys.readouterr().err
