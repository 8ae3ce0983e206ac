#!/usr/bin/env bash
# bench/train_step.py on a GPU machine that the default model's file cannot travel to.
#
#   bash bench/gpu.sh prepare   here: copy the default model's config and tokenizer files
#                               (not its weights) from lorakit's cache into .gpu/ (git-ignored)
#   bash bench/gpu.sh run       on the GPU machine, from the repo root, with .gpu/ carried:
#                               build the model with seeded random weights (bench/random_model.py)
#                               and run the train-step benchmark; results go to $OUT (or bench/results/)
#   bash bench/gpu.sh run-distributed
#                               the same model, bench/distributed.py with one process per GPU (DDP and
#                               FSDP2 beside one GPU: tokens/s, scaling efficiency, memory per GPU)
#
# PYTHON picks the interpreter (default python3); extra arguments after `run` go to train_step.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
case "${1:-}" in
  prepare)
    src=$("$PYTHON" -c 'from lorakit.models import resolve_model_dir; print(resolve_model_dir("smollm2-135m"))')
    mkdir -p .gpu/smollm2-135m
    for f in "$src"/*; do
      case "$f" in *.safetensors) ;; *) cp "$f" .gpu/smollm2-135m/ ;; esac
    done
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    du -sh .gpu
    ;;
  run)
    shift
    out=${OUT:-bench/results}
    model=${TMPDIR:-/tmp}/lorakit-smollm2-135m-random
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    "$PYTHON" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "", "transformers", transformers.__version__,
          "peft", peft.__version__)'
    "$PYTHON" bench/random_model.py .gpu/smollm2-135m "$model"
    "$PYTHON" bench/train_step.py --model "$model" --json "$out/train_step-gpu.json" "$@" 2>&1 | tee "$out/train_step-gpu.log"
    ;;
  run-distributed)
    # bench/distributed.py with one process per GPU: DDP and FSDP2 scaling beside one GPU
    shift
    out=${OUT:-bench/results}
    model=${TMPDIR:-/tmp}/lorakit-smollm2-135m-random
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    "$PYTHON" bench/random_model.py .gpu/smollm2-135m "$model"
    "$PYTHON" bench/distributed.py --model "$model" --nproc "$gpus" --json "$out/distributed-gpu.json" "$@" 2>&1 \
      | tee "$out/distributed-gpu.log"
    ;;
  *)
    echo "usage: bash bench/gpu.sh prepare | run [train_step.py arguments] | run-distributed [distributed.py arguments]" >&2
    exit 2
    ;;
esac
