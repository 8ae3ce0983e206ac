"""Serving speed: lorakit's decoder against transformers + PEFT and llama.cpp on the same weights, in one run.

The default model (SmolLM2-135M) with a task-api adapter (a run's adapter/), held-out task-api
requests as chat prompts (the same token ids for every engine), greedy, --max-new-tokens at most:

- **single stream**, request by request, the engines taking turns on each request: time to first
  token (the prefill and one token) and decode tokens/s (tokens after the first / time after it):
  lorakit's decoder (bf16 where the CPU multiplies bf16 natively, and fp32; prefix cache off; in
  bf16 also with the adapter run as its own A and B products instead of merged),
  transformers ``generate`` + PEFT (fp32), and llama.cpp through llama-cpp-python (the base as f32
  and bf16 GGUFs written by `lorakit.export.gguf_model`, the adapter from ``lorakit export --format
  gguf-adapter``; skipped with a note where llama_cpp does not import);
- **batches** of 1, 4, 16 and 64 requests at once: prefill (all prompts) and decode time, total
  generated tokens/s, for lorakit's continuous batch and transformers' padded ``generate``;
- **time to first token for a 300-token prompt** (a long system prompt and a request), cold, and for
  lorakit also with the system prompt in its prefix cache (a second request with the same system prompt);
- **`lorakit serve`** (in-process, --precision auto): requests one after another, then
  --concurrency at once (one thread each): generated tokens/s of each, and the ratio;
- **same tokens**: each engine's answers against transformers + PEFT fp32's; for lorakit bf16, each
  answer that differs is checked to differ first at a near tie (the fp32 logits of the two tokens
  closer than twice the bf16 rounding of the logits there) and counted.

llama-cpp-python compiles llama.cpp from its sdist (cmake and a C++ compiler, minutes); it is not a
lorakit dependency and `make test` never needs it.

    python bench/decode.py --adapter runs/<run>/adapter
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine, write_result  # noqa: E402  (bench/machine.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a task-api adapter of the default model (a run's adapter/)")
    p.add_argument("--requests", type=int, default=10, help="held-out requests for the single-stream runs")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,4,16,64", help="batch sizes, comma-separated")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent requests through lorakit serve")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (torch uses its own setting)")
    p.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    p.add_argument("--json", default="bench/results/decode.json")
    return p.parse_args(argv)


# -- the engines: each completes one prompt and says when its first and last tokens came
class LorakitEngine:
    """The fast decoder as `lorakit serve` runs it: one `Batcher`, kept warm."""

    def __init__(self, model, tokenizer, dtype, slots: int, prefix_cache: bool = False, merge: bool = True):
        from lorakit.generation.batcher import Batcher
        from lorakit.generation.decoder import Decoder

        self.decoder = Decoder(model, slots=slots, dtype=dtype, prefix_cache_bytes=(256 << 20) if prefix_cache else 0,
                               merge=merge)
        self.batcher = Batcher(model, tokenizer, self.decoder)

    def run(self, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], float, float]:
        """Every prompt at once; (ids per prompt, seconds to the first step's end, seconds after)."""
        from lorakit.generation.engine import Request, Sampling

        out = [[] for _ in prompts]
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            self.batcher.add(i, Request(p, "default", Sampling(max_new_tokens=max_new)))
        first = None
        while len(self.batcher):
            for key, token, _ in self.batcher.step():
                out[key].append(token)
            first = first or time.perf_counter()
        return out, first - start, time.perf_counter() - first


class TransformersEngine:
    """transformers ``generate`` with PEFT's LoRA, fp32; a streamer times the steps."""

    def __init__(self, adapter: Path):
        import peft

        from lorakit.models import load_model, resolve_model_dir

        base, self.tokenizer = load_model(resolve_model_dir())
        self.model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()

    def run(self, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], float, float]:
        import torch

        from lorakit.generation.engine import left_pad

        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad(prompts, pad)
        times = []

        class Clock:
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=pad, streamer=Clock())
        end = time.perf_counter()
        eos = self.tokenizer.eos_token_id
        answers = []
        for row in out[:, ids.shape[1]:].tolist():
            answers.append(row[:row.index(eos) + 1] if eos in row else row)
        return answers, times[1] - start, end - times[1]  # times[0]: the prompt, times[1]: the first tokens


class LlamaCppEngine:
    def __init__(self, gguf: Path, lora: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), lora_path=str(lora), n_ctx=1024, n_threads=threads, n_batch=512,
                         verbose=False, seed=0)

    def run(self, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], float, float]:
        (prompt,) = prompts
        self.llm.reset()
        ids, start, first = [], time.perf_counter(), None
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            first = first or time.perf_counter()
            ids.append(int(token))
            if token == self.llm.token_eos() or len(ids) >= max_new:
                break
        return [ids], first - start, time.perf_counter() - first


# -- the measurements
def single_stream(engines: dict, prompts: list[list[int]], max_new: int) -> tuple[dict, dict]:
    """Each engine on each prompt alone, taking turns (the order rotating); per engine the median
    time to first token, decode tokens/s over all requests, and the answers."""
    stats = {name: {"ttft": [], "tokens": 0, "decode_s": 0.0, "answers": []} for name in engines}
    names = list(engines)
    for i, prompt in enumerate(prompts):
        for name in names[i % len(names):] + names[:i % len(names)]:
            (ids,), ttft, decode = engines[name].run([prompt], max_new)
            s = stats[name]
            s["ttft"].append(ttft)
            s["tokens"] += len(ids) - 1
            s["decode_s"] += decode
            s["answers"].append(ids)
    table = {name: {"ttft_ms": 1e3 * statistics.median(s["ttft"]), "decode_tokens_per_s": s["tokens"] / s["decode_s"]}
             for name, s in stats.items()}
    return table, {name: s["answers"] for name, s in stats.items()}


def batched(engine, prompts: list[list[int]], max_new: int) -> dict:
    answers, prefill, decode = engine.run(prompts, max_new)
    tokens = sum(len(a) for a in answers)
    return {"requests": len(prompts), "prefill_s": prefill, "decode_s": decode, "generated_tokens": tokens,
            "tokens_per_s": tokens / (prefill + decode), "decode_tokens_per_s": (tokens - len(prompts)) / decode}


def near_ties(model, prompts, reference, answers) -> dict:
    """How many answers equal the reference's, and of the others, how many differ first at a near
    tie (fp32 gap of the two tokens <= 2 x the bf16 rounding of the logits there)."""
    import torch

    from lorakit.generation.decoder import Decoder

    exact, rounded = Decoder(model, slots=1, dtype=torch.float32), Decoder(model, slots=1, dtype=torch.bfloat16)
    same = ties = 0
    for prompt, want, got in zip(prompts, reference, answers):
        if got == want:
            same += 1
            continue
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        if at == min(len(want), len(got)):
            continue
        logits = exact.prefill(0, prompt + want[:at], "default")
        rounding = (rounded.prefill(0, prompt + want[:at], "default") - logits).abs().max().item()
        ties += (logits[want[at]] - logits[got[at]]).item() <= 2 * rounding
    return {"same": same, "near_ties": ties, "other": len(prompts) - same - ties}


def long_prompt(tokenizer, examples, request: str, tokens: int = 300) -> list[int]:
    """A system prompt of instructions and worked examples, as few as make the chat at least
    ``tokens`` long, and ``request``."""
    from lorakit.data.chat import chat_prompt_ids
    from lorakit.data.task_api.generate import SYSTEM

    def prompt(count):
        shots = "\n".join(f"Request: {ex.request}\nJSON: {ex.answer}" for ex in examples[:count])
        return chat_prompt_ids(tokenizer, request, system=f"{SYSTEM}\nExamples:\n{shots}")

    count = next((c for c in range(1, len(examples) + 1) if len(prompt(c)) >= tokens), len(examples))
    return prompt(count)


def through_serve(adapter: Path, prompts_text: list[str], max_new: int, concurrency: int) -> dict:
    """`lorakit serve` in this process: the requests one after another, then ``concurrency`` at once."""
    import json
    import urllib.request

    from lorakit.data.task_api.generate import SYSTEM
    from lorakit.infer.server import load_server

    server = load_server(adapters=[("task", adapter)], port=0, max_batch=max(concurrency, 1), max_tokens=max_new,
                         precision="auto").start()

    def ask(text):
        body = {"model": "task", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                "max_tokens": max_new, "temperature": 0}
        request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)["usage"]["completion_tokens"]

    try:
        ask(prompts_text[0])  # warm: the decoder packs its weights on the first request
        start = time.perf_counter()
        alone = sum(ask(t) for t in prompts_text[:concurrency])
        alone_s = time.perf_counter() - start
        counts = [0] * concurrency
        threads = [threading.Thread(target=lambda i=i: counts.__setitem__(i, ask(prompts_text[i])))
                   for i in range(concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together_s = time.perf_counter() - start
    finally:
        server.close()
    single, many = alone / alone_s, sum(counts) / together_s
    return {"requests": concurrency, "single_stream_tokens_per_s": single, "concurrent_tokens_per_s": many,
            "ratio": many / single}


def main(argv=None) -> None:
    import torch

    from lorakit.data.chat import chat_prompt_ids
    from lorakit.data.task_api.generate import SYSTEM, generate
    from lorakit.generation.decoder import decode_dtype
    from lorakit.models import load_adapted

    args = parse_args(argv)
    adapter, n = Path(args.adapter), args.max_new_tokens
    sizes = [int(b) for b in args.batches.split(",")]
    data = generate()
    started = time.perf_counter()
    model, tokenizer = load_adapted(adapter)
    val = data.val[:max(sizes + [args.requests])]
    prompts = [chat_prompt_ids(tokenizer, ex.request, system=SYSTEM) for ex in val]
    bf16 = decode_dtype("cpu")
    label = "bf16" if bf16 == torch.bfloat16 else "fp32, no native bf16"
    engines = {f"lorakit ({label})": LorakitEngine(model, tokenizer, bf16, max(sizes)),
               f"lorakit ({label}, adapter not merged)": LorakitEngine(model, tokenizer, bf16, 1, merge=False),
               "lorakit (fp32)": LorakitEngine(model, tokenizer, torch.float32, max(sizes)),
               "transformers + PEFT (fp32)": TransformersEngine(adapter)}
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_llama_cpp:
            notes += add_llama_cpp(engines, adapter, Path(tmp), args.threads)
        for engine in engines.values():  # warm: first calls pay for allocation and packing
            engine.run([prompts[0]], 4)
        single, answers = single_stream(engines, prompts[:args.requests], n)
        long = long_prompt(tokenizer, data.train[:20], val[0].request)
        other = long_prompt(tokenizer, data.train[:20], val[1].request)
        ttft = {name: 1e3 * engine.run([long], 2)[1] for name, engine in engines.items()}
        cached = LorakitEngine(model, tokenizer, bf16, 1, prefix_cache=True)
        cached.run([long], 2)
        ttft["lorakit, system prompt cached"] = 1e3 * cached.run([other], 2)[1]
    reference = answers["transformers + PEFT (fp32)"]
    agreement = {name: sum(a == r for a, r in zip(got, reference)) for name, got in answers.items()}
    ties = near_ties(model, prompts[:args.requests], reference, answers[next(iter(engines))])
    batches = {}
    for size in sizes:
        batches[size] = {"lorakit": batched(engines[next(iter(engines))], prompts[:size], n),
                         "transformers + PEFT (fp32)": batched(engines["transformers + PEFT (fp32)"], prompts[:size], n)}
        print(f"batch {size:>3}: lorakit {batches[size]['lorakit']['tokens_per_s']:.1f} tokens/s, transformers + PEFT "
              f"{batches[size]['transformers + PEFT (fp32)']['tokens_per_s']:.1f}", flush=True)
    serve = through_serve(adapter, [ex.request for ex in val], n, args.concurrency)
    report(single, ttft, agreement, ties, batches, serve, len(long), args.requests, notes)
    import lorakit

    write_result(args.json, {"benchmark": "decode", "machine": machine(), "adapter": str(adapter),
                             "requests": args.requests, "max_new_tokens": n, "prompt_tokens_300": len(long),
                             "single_stream": single, "ttft_300_ms": ttft, "same_tokens_as_transformers": agreement,
                             "bf16_differences": ties, "batches": batches, "serve": serve, "notes": notes,
                             "lorakit": lorakit.__version__, "wall_s": time.perf_counter() - started})


def add_llama_cpp(engines: dict, adapter: Path, tmp: Path, threads: int) -> list[str]:
    try:
        import llama_cpp
    except ImportError:
        return ["llama.cpp left out: llama-cpp-python is not installed (pip install llama-cpp-python builds it)"]
    import torch

    from lorakit.export.exporting import export_adapter
    from lorakit.export.gguf_model import write_model_gguf
    from lorakit.models import load_model, resolve_model_dir

    export_adapter(adapter, tmp / "lora", "gguf-adapter")
    model_dir = resolve_model_dir()
    base, tokenizer = load_model(model_dir, dtype=torch.float32)
    for outtype in ("f32", "bf16"):
        write_model_gguf(base, tokenizer, model_dir, tmp / f"base-{outtype}.gguf", outtype=outtype)
        engines[f"llama.cpp (base {outtype})"] = LlamaCppEngine(tmp / f"base-{outtype}.gguf",
                                                                tmp / "lora" / "adapter.gguf", threads)
    return [f"llama-cpp-python {llama_cpp.__version__}, {threads} threads"]


def report(single, ttft, agreement, ties, batches, serve, long_tokens, requests, notes) -> None:
    print(f"\nsingle stream ({requests} requests): time to first token (median), decode tokens/s, same tokens as "
          "transformers + PEFT")
    for name, row in single.items():
        print(f"  {name:<32} {row['ttft_ms']:7.1f} ms {row['decode_tokens_per_s']:8.1f} tokens/s "
              f"{agreement[name]:>3}/{requests}")
    print(f"  bf16 answers that differ: {ties['near_ties']} at a near tie, {ties['other']} otherwise")
    print(f"time to first token, {long_tokens}-token prompt: "
          + ", ".join(f"{name} {ms:.0f} ms" for name, ms in ttft.items()))
    print(f"lorakit serve: {serve['single_stream_tokens_per_s']:.1f} tokens/s one at a time, "
          f"{serve['concurrent_tokens_per_s']:.1f} with {serve['requests']} at once ({serve['ratio']:.1f}x)")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
