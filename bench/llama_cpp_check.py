"""llama.cpp itself runs what `lorakit export` writes: greedy completions compared with lorakit's own.

Held-out task-api requests (their chat prompts as token ids, the same ids for every engine), each
completed greedily for up to --max-new-tokens tokens by:

  lorakit          the base model with the adapter, fp32 (`lorakit.generation.generate_batch`)
  adapter (f32)    llama.cpp: the base as an f32 GGUF (written by `lorakit.export.gguf_model`) with
                   the adapter from `lorakit export --format gguf-adapter` (``--lora``)
  adapter (Q4_1)   llama.cpp: the GGUF the default model ships as (Q4_1) with the same adapter
  merged (f32)     llama.cpp: `lorakit export --format gguf --outtype f32`
  merged (q8_0)    llama.cpp: `lorakit export --format gguf --outtype q8_0`

and reports, per llama.cpp run, how many completions equal lorakit's token for token. llama.cpp is
not a lorakit dependency: install llama-cpp-python (it compiles llama.cpp; about 20 minutes on 2
cores) in the environment that runs this script.

    python bench/llama_cpp_check.py --adapter runs/<run>/adapter
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine, write_result  # noqa: E402  (bench/machine.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a task-api adapter of the default model (a run's adapter/)")
    p.add_argument("--requests", type=int, default=10, help="held-out task-api requests")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="bench/results/llama_cpp_check.json")
    return p.parse_args(argv)


def lorakit_completions(adapter: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    from lorakit.generation import Request, Sampling, generate_batch
    from lorakit.models import load_adapted

    model, tokenizer = load_adapted(adapter)
    requests = [Request(p, adapter="default", sampling=Sampling(max_new_tokens=max_new)) for p in prompts]
    return [list(ids) for ids in generate_batch(model, tokenizer, requests)]


def llama_cpp_completions(model_path: Path, prompts: list[list[int]], max_new: int, threads: int,
                          lora: Path | None = None) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=threads,
                n_batch=512, verbose=False, seed=0)
    out = []
    for prompt in prompts:
        llm.reset()
        ids = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            ids.append(int(token))
            if token == llm.token_eos() or len(ids) >= max_new:
                break
        out.append(ids)
    return out


def main(argv=None) -> None:
    import torch

    from lorakit.data.chat import chat_prompt_ids
    from lorakit.data.task_api.generate import SYSTEM, generate
    from lorakit.export.exporting import export_adapter
    from lorakit.export.gguf_model import write_model_gguf
    from lorakit.models import embedded_gguf_path, load_model, resolve_model_dir

    args = parse_args(argv)
    adapter = Path(args.adapter)
    model_dir = resolve_model_dir()
    _, tokenizer = load_model(model_dir)
    val = generate().val[: args.requests]
    prompts = [chat_prompt_ids(tokenizer, ex.request, system=SYSTEM) for ex in val]
    started = time.perf_counter()
    reference = lorakit_completions(adapter, prompts, args.max_new_tokens)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_adapter(adapter, tmp / "lora", "gguf-adapter")
        base, base_tokenizer = load_model(model_dir, dtype=torch.float32)
        write_model_gguf(base, base_tokenizer, model_dir, tmp / "base-f32.gguf", outtype="f32")
        del base
        for outtype in ("f32", "q8_0"):
            export_adapter(adapter, tmp / f"merged-{outtype}", "gguf", outtype=outtype)
        engines = {
            "adapter (f32 base)": (tmp / "base-f32.gguf", tmp / "lora" / "adapter.gguf"),
            "adapter (Q4_1 base, as shipped)": (embedded_gguf_path("smollm2-135m"), tmp / "lora" / "adapter.gguf"),
            "merged (f32)": (tmp / "merged-f32" / "model-f32.gguf", None),
            "merged (q8_0)": (tmp / "merged-q8_0" / "model-q8_0.gguf", None),
        }
        for name, (model_path, lora) in engines.items():
            got = llama_cpp_completions(model_path, prompts, args.max_new_tokens, args.threads, lora)
            same = [g == r[: len(g)] and (len(g) == len(r) or r[len(g) - 1] == tokenizer.eos_token_id)
                    for g, r in zip(got, reference)]
            texts_equal = [tokenizer.decode(g, skip_special_tokens=True) == tokenizer.decode(r, skip_special_tokens=True)
                           for g, r in zip(got, reference)]
            runs[name] = {"same_tokens": sum(same), "same_text": sum(texts_equal), "requests": len(prompts),
                          "first_difference": next(({"request": val[i].request,
                                                     "lorakit": tokenizer.decode(reference[i]),
                                                     "llama.cpp": tokenizer.decode(got[i])}
                                                    for i, t in enumerate(texts_equal) if not t), None)}
            print(f"{name:<34} same text as lorakit: {sum(texts_equal)} of {len(prompts)} "
                  f"(same tokens: {sum(same)})", flush=True)
    import llama_cpp

    write_result(args.json, {"benchmark": "llama_cpp_check", "machine": machine(), "llama_cpp_python": llama_cpp.__version__,
                             "adapter": str(adapter), "requests": len(prompts),
                             "max_new_tokens": args.max_new_tokens, "runs": runs,
                             "lorakit_answers": [tokenizer.decode(r, skip_special_tokens=True) for r in reference],
                             "wall_s": time.perf_counter() - started})


if __name__ == "__main__":
    main()
