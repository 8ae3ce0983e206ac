"""A hostile-client campaign against `lorakit serve`, rerunnable with one command:

    PYTHONPATH=src python bench/hostile/server.py            # a tiny random model, about a minute
    PYTHONPATH=src python bench/hostile/server.py --model smollm2-135m --trials 3

It starts `lorakit serve` as a subprocess (with --api-key, --adapter-dir and a short
--idle-timeout) and, as an attacker and as an unlucky user would:

1. poison: for each trial, sends good requests (greedy, so each has one right answer, taken from a
   quiet run first) and poison ones (seed 2**80, -1 and 2**63, a body nested 100,000 deep and one
   41 deep, wrong types, max_tokens of 10**30 and beyond the context, a 5,000-digit number,
   temperature 10**400, top_k 2**80, token ids beyond the vocabulary) all at once, and counts good
   requests that failed or changed (must be 0), poison requests that got a 500 (must be 0) and the
   statuses the poison got;
2. auth: every endpoint without a key, with a wrong one and with the right one;
3. adapters: names that try to leave --adapter-dir (.., absolute paths, a symlink pointing out,
   an existing directory elsewhere and a missing one) must be refused alike, and no server path may
   appear in any answer;
4. connections: 80 idle connections held open, then a real request (must be served), then how many
   of the 80 the server closed (the oldest for room, the rest after --idle-timeout);
5. drain: a long streamed request in flight, SIGTERM, with --drain-timeout 60 (the stream must end
   complete) and 0 (it must end with a clean 503 event); the exit code (must be 0) and whether
   "terminate called" appeared.

It prints one table of figures and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.models import load_model
from tiny import tiny_model

KEY = "campaign-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_adapter(model_dir, out: Path, seed: int) -> Path:
    base, _ = load_model(model_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(out)
    return out


class Client:
    def __init__(self, port: int):
        self.port = port

    def call(self, method, path, body=None, raw=None, headers=AUTH, timeout=300):
        """(status, parsed body or text); status 0 when the connection failed."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=data, headers={"Content-Type": "application/json", **headers})
            response = connection.getresponse()
            text = response.read().decode()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text
        except OSError as err:
            return 0, repr(err)
        finally:
            connection.close()


def start(args, model: str, shelf: Path, extra=()) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--model", model, "--port", "0", "--quiet",
               "--api-key", KEY, "--adapter-dir", str(shelf), "--idle-timeout", str(args.idle_timeout),
               "--max-batch", "8", "--max-tokens", "64", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if " on http://" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line}{process.stderr.read()}")
    return process, int(line.split(" on http://")[1].split("/")[0].rsplit(":", 1)[1])


def poison_bodies(context: int) -> list:
    good = {"model": "base", "prompt": "hi", "max_tokens": 4}
    return [{**good, "seed": 2 ** 80}, {**good, "seed": -1}, {**good, "seed": 2 ** 63},
            b'{"model": "base", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"model": "base", "prompt": "hi", "x": ' + b"[" * 41 + b"]" * 41 + b"}",
            {**good, "max_tokens": 10 ** 30}, {**good, "max_tokens": context + 1}, {**good, "max_tokens": "4"},
            b'{"model": "base", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
            {**good, "temperature": 10 ** 400}, {**good, "top_k": -(2 ** 80)}, {**good, "prompt": [2 ** 80]},
            {**good, "prompt": [[1], {"a": 1}]}, {**good, "stop": [["x"]]}, {**good, "stream": "yes"},
            {**good, "model": ["base"]}, {**good, "n": 2 ** 80}, b"{not json", b"[1, 2]",
            {"model": "base", "messages": [{"role": "user", "content": {"x": 1}}]}]


def campaign_poison(client: Client, args, rows: dict) -> None:
    goods = [{"model": m, "prompt": p, "max_tokens": 12, "temperature": 0}
             for m in ("base", "a", "b") for p in ("The quick brown fox", "Once upon a time")]
    goods.append({"model": "a", "prompt": "hi", "max_tokens": 12, "temperature": 0.8, "top_k": 2 ** 80, "seed": 5})
    want = [client.call("POST", "/v1/completions", g)[1]["choices"][0]["text"] for g in goods]  # alone, quietly
    poison = poison_bodies(512)
    good_failed = poison_500 = poison_sent = 0
    statuses: dict[int, int] = {}
    for _ in range(args.trials):
        jobs = [("good", i, g) for i, g in enumerate(goods)] + [("poison", i, p) for i, p in enumerate(poison)]
        results = [None] * len(jobs)

        def send(k):
            kind, _, body = jobs[k]
            path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
            raw = body if isinstance(body, bytes) else None
            results[k] = client.call("POST", path, None if raw else body, raw=raw)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (kind, i, _), (status, answer) in zip(jobs, results):
            if args.verbose and (status in (0, 500) or kind == "good" and answer["choices"][0]["text"] != want[i]):
                print(kind, i, status, str(answer)[:300], file=sys.stderr)
            if kind == "good":
                good_failed += status != 200 or answer["choices"][0]["text"] != want[i]
            else:
                poison_sent += 1
                poison_500 += status >= 500 or status == 0
                statuses[status] = statuses.get(status, 0) + 1
    rows["good requests among poison"] = (f"{len(goods) * args.trials} in {args.trials} trials", good_failed == 0,
                                          f"{good_failed} failed or changed")
    rows["poison requests"] = (poison_sent, poison_500 == 0,
                               f"{poison_500} got 5xx; statuses {dict(sorted(statuses.items()))}")


def campaign_auth(client: Client, rows: dict) -> None:
    checks = []
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions",
                                                             {"model": "base", "prompt": "x", "max_tokens": 1}),
                               ("POST", "/v1/adapters", {"name": "a"}), ("DELETE", "/v1/adapters/a", None),
                               ("GET", "/nothing", None)]:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
            status, answer = client.call(method, path, body, headers=headers)
            checks.append(status == 401 and answer["error"]["code"] == "invalid_api_key")
    right = client.call("GET", "/v1/models")[0] == 200 and client.call("GET", "/health", headers={})[0] == 200
    rows["auth: no, wrong, unprefixed key"] = (len(checks), all(checks) and right,
                                               f"{sum(checks)} got 401; right key 200: {right}")


def campaign_adapters(client: Client, shelf: Path, outside: Path, rows: dict) -> None:
    names = ["..", ".", "../x", "/etc", str(outside), str(outside.parent / "missing"), "a/../a", "escape",
             "x" * 300, "missing", "a\\..", ""]
    answers = [client.call("POST", "/v1/adapters", {"name": "new", "adapter": n}) for n in names]
    refused = sum(s in (400, 404) for s, _ in answers)
    messages = {a["error"]["message"].replace(repr(n), "NAME") for n, (s, a) in zip(names, answers) if s == 404}
    leaks = [n for n, (_, a) in zip(names, answers) if str(shelf.parent) in json.dumps(a)]
    loaded = client.call("POST", "/v1/adapters", {"name": "c", "adapter": "c"})[0] == 200
    listing = json.dumps(client.call("GET", "/v1/models")[1])
    leaks += ["/v1/models"] if str(shelf.parent) in listing else []
    rows["adapter names leaving --adapter-dir"] = (
        len(names), refused == len(names) and len(messages) == 1 and not leaks and loaded,
        f"{refused} refused, {len(messages)} distinct 404 message(s), path leaks: {leaks or 'none'}, "
        f"a real name loads: {loaded}")


def campaign_idle(client: Client, args, rows: dict) -> None:
    held = [socket.create_connection(("127.0.0.1", client.port), timeout=args.idle_timeout + 30) for _ in range(80)]
    began = time.monotonic()
    status = client.call("POST", "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 4})[0]
    served = time.monotonic() - began
    closed = 0
    for s in held:
        try:
            closed += s.recv(1) == b""
        except OSError:
            closed += 1
        s.close()
    waited = time.monotonic() - began
    rows["80 idle connections, then a request"] = (80, status == 200 and closed == 80,
                                                   f"request {status} in {served:.2f} s; {closed}/80 closed by the "
                                                   f"server within {waited:.1f} s (--idle-timeout "
                                                   f"{args.idle_timeout:g})")


def campaign_drain(args, model: str, shelf: Path, rows: dict, drain_timeout: float) -> None:
    process, port = start(args, model, shelf, extra=["--max-tokens", "400", "--drain-timeout", str(drain_timeout)])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json", **AUTH})
    response = connection.getresponse()
    first = response.readline()
    process.send_signal(signal.SIGTERM)
    rest = response.read().decode()
    out, err = process.communicate(timeout=300)
    events = [json.loads(e[6:]) for e in rest.split("\n\n") if e.startswith("data: {")]
    ended = "broken"
    if rest.rstrip().endswith("data: [DONE]") and events:
        if events[-1].get("error", {}).get("code") == "shutting_down":
            ended = "cancelled (503 shutting_down event)"
        elif events[-1].get("choices") and events[-1]["choices"][0]["finish_reason"] is not None:
            ended = f"complete ({sum(len(e['choices'][0]['text']) for e in events)} chars)"
    ok = first.startswith(b"data: ") and process.returncode == 0 and ended != "broken" and \
        "terminate called" not in err
    if args.verbose and not ok:
        print(f"drain {drain_timeout:g}: first {first[:200]!r}\nrest ...{rest[-600:]!r}\nserver's stderr: "
              f"{err[-3000:]}", file=sys.stderr)
    rows[f"SIGTERM, stream in flight, drain {drain_timeout:g} s"] = (
        1, ok, f"exit {process.returncode}; stream ended {ended}; 'terminate called': {'terminate called' in err}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the base model (default: a tiny random Llama with SmolLM2's tokenizer)")
    p.add_argument("--trials", type=int, default=5, help="rounds of good and poison requests sent at once")
    p.add_argument("--idle-timeout", type=float, default=3.0, help="the server's --idle-timeout")
    p.add_argument("--verbose", action="store_true", help="print each failed request")
    p.add_argument("--checks", default="poison,auth,adapters,idle,drain",
                   help="which campaigns to run (a comma-separated subset)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lorakit-hostile-"))
    try:
        model = args.model or str(tiny_model(work / "tiny"))
        shelf, outside = work / "shelf", work / "outside"
        for name, seed in (("a", 1), ("b", 2), ("c", 3)):
            make_adapter(model, shelf / name, seed)
        shutil.copytree(shelf / "b", outside / "b")
        (shelf / "escape").symlink_to(outside / "b")
        process, port = start(args, model, shelf)
        client, rows = Client(port), {}
        try:
            for name in ("a", "b"):
                assert client.call("POST", "/v1/adapters", {"name": name})[0] == 200
            checks = args.checks.split(",")
            if "poison" in checks:
                campaign_poison(client, args, rows)
            if "auth" in checks:
                campaign_auth(client, rows)
            if "adapters" in checks:
                campaign_adapters(client, shelf, outside / "b", rows)
            if "idle" in checks:
                campaign_idle(client, args, rows)
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=300)
        for drain_timeout in (60.0, 0.0) if "drain" in args.checks else ():  # finish the stream; cancel it
            campaign_drain(args, model, shelf, rows, drain_timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nlorakit serve, hostile campaign ({args.model or 'tiny random model'}, {args.trials} trials)\n")
    print(f"| {'check':<40} | {'cases':>24} | ok  | figures")
    print(f"|{'-' * 42}|{'-' * 26}|-----|--------")
    for name, (cases, ok, figures) in rows.items():
        print(f"| {name:<40} | {str(cases):>24} | {'yes' if ok else 'NO ':<3} | {figures}")
    return 0 if all(ok for _, ok, _ in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
