"""Training on several processes with PyTorch's own engine (torch.distributed, started by torchrun).

    World        this process's place: rank, world size, local rank and size, device, backend
    join_world   from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...): NCCL on CUDA,
                 gloo on CPU; the CPU threads set to this rank's share of the cores
    wrap         the module a training step calls (`LossModule`: the loss sum of a batch) under
                 DDP (each rank holds the frozen model; only the adapter's gradients are reduced)
                 or FSDP2 (`fully_shard` per decoder layer, then the root: frozen weights sharded too)
    micro_step   the context of one micro-batch's forward and backward: gradients reduced on the
                 step's last micro-batch only
    rank_share   a global batch of example indices split among the ranks
    whole_state  the adapter and optimizer state gathered whole for rank 0 to save (FSDP2)
    evaluate     held-out loss and generation on the model (under FSDP2 through the root's forward)

The step's loss is the sum over every rank's label tokens divided by their global count; DDP and
FSDP2 average gradients over the ranks, so each rank's loss is scaled by the world size first.
With one process (no torchrun) `World.single()` keeps every function a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from lorakit.checks import STRATEGIES
from lorakit.errors import ConfigError
from lorakit.models.family import unwrap

__all__ = ["STRATEGIES", "World", "join_world", "leave_world", "LossModule", "wrap", "micro_step", "rank_share",
           "all_sum", "any_rank", "broadcast_text", "barrier", "evaluate", "whole_state", "shard_optimizer_state",
           "clip_grad_norm", "local_bytes"]

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective waits for a rank that has not arrived (a rank that died is seen at once:
its connections close); evaluation and scoring run on every rank in step, so no rank waits long."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @staticmethod
    def single() -> "World":
        return World(0, 1, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"${name}={value!r} is not an integer (torchrun sets it; start the job with torchrun "
                          f"or lorakit train --nproc N)") from None


def join_world() -> World:
    """This process's `World`: from torchrun's environment when it started the process with a world
    of two or more, else a single process. Initialises the process group (once)."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World.single()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        _set_threads(local_size)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    if rank != 0:  # rank 0 prints the run's lines; every rank's errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return World(rank, size, local_rank, local_size, device)


def _set_threads(local_size: int) -> None:
    """Each rank's share of the cores (two ranks that each use all cores slow each other tens of
    times); a thread count the user gave (LORAKIT_THREADS, or OMP_NUM_THREADS other than torchrun's
    default of 1) is kept."""
    if os.environ.get("LORAKIT_THREADS"):
        torch.set_num_threads(max(1, _env_int("LORAKIT_THREADS", 1)))
        return
    if os.environ.get("OMP_NUM_THREADS", "1") != "1":  # the user's (torch read it when it started)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(local_size, 1)))


def started_by_torchrun() -> bool:
    return _env_int("WORLD_SIZE", 1) > 1


def launch(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` processes of ``python argv`` on this machine as torchrun does (c10d rendezvous
    on 127.0.0.1, a free port, no restarts) and wait for them; when one fails the others are
    stopped at once. Returns 0, or the exit code of the first process that failed (1 when it was
    killed by a signal), after one line naming it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"lorakit-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        elastic_launch(config, sys.executable)(*argv)
    except SignalException as err:  # Ctrl-C / SIGTERM: passed on to the processes, which saved and stopped
        print(f"interrupted: {signal.Signals(err.sigval).name}; the processes stopped (their lines above say "
              f"where the checkpoint is)", file=sys.stderr)
        return 130
    except ChildFailedError as err:
        # the first to fail, except that a bad-input refusal (code 2, the same on every rank) is the
        # cause whenever there is one: a peer that gloo aborted as the refusing rank left may be
        # recorded first. (Code 2 is never a consequence: a lost peer is an exception, code 1.)
        failures = sorted(err.failures.items(), key=lambda item: (item[1].exitcode != 2, item[1].timestamp))
        rank, failure = failures[0]
        code = failure.exitcode
        if code < 0:
            print(f"error: rank {rank} of {nproc} was killed by {signal.Signals(-code).name}; the other processes "
                  f"were stopped", file=sys.stderr)
            return 1
        print(f"error: rank {rank} of {nproc} exited with code {code} (its error is above); the other processes "
              f"were stopped", file=sys.stderr)
        return code
    finally:  # the launcher installs its own handlers (to pass signals on): a caller's are put back
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return 0


def leave_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """The module a training step calls: ``objective(peft_model, batch)``, the step's
    ``(loss sum, units, statistics)`` (`lorakit.train.objectives`). DDP and FSDP2 act around a
    module's forward, and the loss head reaches into the model (the decoder, then the output head
    on label positions only), so this is the module they wrap."""

    def __init__(self, peft_model: nn.Module, objective: Callable):
        super().__init__()
        self.peft_model = peft_model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor] | None, work: Callable | None = None):
        """The objective of ``batch``; or ``work(peft_model)`` (`evaluate`)."""
        return self.objective(self.peft_model, batch) if work is None else work(self.peft_model)


def _decoder_layers(peft_model: nn.Module) -> list[nn.Module]:
    lm = unwrap(peft_model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    layers = list(getattr(decoder, "layers", []) or [])
    if not layers:
        raise ConfigError(f"--strategy fsdp shards a model decoder layer by decoder layer, and found no decoder "
                          f"layers in {type(lm).__name__}; use --strategy ddp")
    return layers


def wrap(peft_model: nn.Module, world: World, strategy: str, objective: Callable) -> nn.Module:
    """The module the training step calls for ``peft_model``'s loss: `LossModule` itself with one
    process, under DDP or FSDP2 with several. FSDP2 shards in place: ``peft_model``'s parameters
    become DTensors, so the optimizer is built after this."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    module = LossModule(peft_model, objective)
    if not world.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        # every trainable parameter takes part in every step (no search for unused ones); the
        # gradients are reduced in buckets while the backward runs
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False,
                                       forward_sync_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(peft_model):
        fully_shard(layer)
    fully_shard(module)  # the root: embeddings, final norm, output head and what else is left
    return module


def micro_step(trained: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch's forward and backward: gradients are reduced across the ranks
    on the step's ``last`` micro-batch only (DDP's ``no_sync``; FSDP2's gradient sync switch)."""
    if hasattr(trained, "no_sync"):
        return contextlib.nullcontext() if last else trained.no_sync()
    if hasattr(trained, "set_requires_gradient_sync"):
        trained.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def rank_share(indices: list[int], world: World) -> list[int]:
    """This rank's part of a global batch: contiguous, sizes differing by at most one (a short last
    batch can leave a rank none)."""
    n, size = len(indices), world.size
    start = world.rank * (n // size) + min(world.rank, n % size)
    return indices[start:start + n // size + (world.rank < n % size)]


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(world))
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is True on one (a stop signal seen by one rank stops all at the same step)."""
    return all_sum([float(flag)], world)[0] > 0 if world.distributed else flag


def broadcast_text(text: str, world: World) -> str:
    """Rank 0's ``text`` on every rank (no pickling: UTF-8 bytes in a tensor)."""
    if not world.distributed:
        return text
    data = torch.tensor(list(text.encode()) if world.is_main else [], dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=_comm_device(world))
    dist.broadcast(size, 0)
    buffer = torch.zeros(int(size), dtype=torch.uint8, device=_comm_device(world))
    if world.is_main:
        buffer.copy_(data)
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def _comm_device(world: World) -> torch.device:
    return world.device if world.device.type == "cuda" else torch.device("cpu")


def _fsdp_modules(trained: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in trained.modules() if isinstance(m, FSDPModule)]


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def evaluate(trained: nn.Module, work: Callable[[nn.Module], T]) -> T:
    """``work(peft_model)``: a held-out loss, a scoring by generation, anything that calls the model
    directly. Under FSDP2 it runs inside the root's forward, which gathers the root's parameters
    (embeddings, final norm, output head) for it while each decoder layer gathers its own as it
    runs: every rank must do the same work, in step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(trained, FSDPModule):
        return trained(None, work)
    return work(getattr(trained, "module", trained).peft_model)  # DDP's module, or LossModule itself


@contextlib.contextmanager
def whole_state(trained: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Inside: under FSDP2 the trainable parameters (and ``optimizer``'s state) gathered whole on
    every rank, so that rank 0 saves the whole adapter, not its own slice, and the root's parameters
    (embeddings, output head); the decoder layers' frozen weights stay sharded. Every rank must
    enter; no forward may run inside. Nothing to do otherwise."""
    modules = _fsdp_modules(trained)
    DTensor = _dtensor() if modules else None
    root = trained if any(m is trained for m in modules) else None
    swapped = []
    if root is not None:  # its frozen weights too: an adapter on a tied output head saves the head's weight
        root.unshard()
    if DTensor is not None:
        for module in trained.modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor) and param.requires_grad:
                    swapped.append((module, name, param))
                    module._parameters[name] = nn.Parameter(param.full_tensor().detach(), requires_grad=True)
        if optimizer is not None:
            for state in optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, DTensor):
                        state[key] = value.full_tensor()
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
        if root is not None:
            root.reshard()
        if DTensor is not None and optimizer is not None:
            shard_optimizer_state(optimizer)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Each whole state tensor of a DTensor parameter (gathered, or loaded from a checkpoint) made a
    DTensor laid out as its parameter: this rank's slice, no communication. Nothing to do for plain
    parameters."""
    DTensor = _dtensor()
    from torch.distributed.tensor import distribute_tensor

    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                               src_data_rank=None)


def local_bytes(model: nn.Module, trainable: bool) -> int:
    """Bytes of ``model``'s trainable (or frozen) parameters held by this process: under FSDP2 its
    slices only."""
    DTensor = _dtensor()
    total = 0
    for p in model.parameters():
        if p.requires_grad == trainable:
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.numel() * local.element_size()
    return total


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients by their global norm (over every rank's slice under FSDP2); returns the norm."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)  # a DTensor under FSDP2
