"""The playground's server side over real HTTP on localhost (`lorakit.playground`): the page and
its files, names that try to leave their directories, the API key, and each endpoint checked
against the files a real tiny training run wrote, the data's own held-out records, and the same
greedy requests sent to /v1/chat/completions and scored with `lorakit eval`'s scorer."""

import argparse
import http.client
import json
import os
import threading

import pytest
import torch
import yaml

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import build_parser
from lorakit.data.load import BUILTIN_DATASETS, split_records
from lorakit.evaluation import SCORERS
from lorakit.models import load_model
from lorakit.playground import STATIC_DIR, load_playground
from lorakit.train import TrainConfig, train
from lorakit.train.runs import list_runs, sort_runs

from .conftest import COMMON, ok_records, train_runs

KEY = "s3cret"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """runs/: "tasks" (task-api, its built-in held-out split), "ok" (a JSONL file, val_fraction 0.25),
    a directory that is no run; and a run outside runs/ that a symlink inside points to."""
    root = tmp_path_factory.mktemp("playground")
    train_runs(root, tiny_model_dir)
    (root / "runs" / "notes").mkdir()
    train(TrainConfig.from_settings(model=str(tiny_model_dir), **COMMON, data="task-api", train_examples=8, max_steps=1, eval_every=1,
                                    eval_examples=2, score_examples=0, save_every=1,
                                    run_dir=str(root / "outside"), name="outside"), progress=False)
    os.symlink(root / "outside", root / "runs" / "escape")
    return root / "runs"


@pytest.fixture(scope="module")
def adapter_a(tiny_model_dir, tmp_path_factory):
    """An adapter with random A and B (a non-zero update): it answers otherwise than the base model."""
    base, _ = load_model(tiny_model_dir)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                            init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter") / "a"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir, runs, adapter_a):
    server = load_playground(str(tiny_model_dir), [("a", adapter_a)], runs_dir=runs, adapter_dir=runs, port=0,
                             max_batch=8, max_tokens=16, precision="fp32").start()  # fp32: train's own scores
    yield server
    server.close()


def fetch(server, method, path, body=None, headers=None):
    """(status, headers, raw body) of one request, the path sent exactly as written."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    data = None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    return response.status, response.headers, raw


def call(server, method, path, body=None, headers=None):
    """(status, JSON body) of one request."""
    status, _, raw = fetch(server, method, path, body, headers)
    return status, json.loads(raw)


# -- the page and its files
def test_the_page_and_every_static_file_with_its_content_type(server):
    status, headers, raw = fetch(server, "GET", "/")
    assert status == 200 and raw == (STATIC_DIR / "index.html").read_bytes()
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and headers["X-Content-Type-Options"] == "nosniff"
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
    files = sorted(p for p in STATIC_DIR.iterdir() if p.suffix in types)
    assert {p.name for p in files} >= {"index.html", "app.js", "style.css"}
    for path in files:
        status, headers, raw = fetch(server, "GET", f"/static/{path.name}")
        assert (status, headers["Content-Type"]) == (200, types[path.suffix]), path.name
        assert raw == path.read_bytes() and headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", [
    "/static/../routes.py", "/static/%2e%2e%2froutes.py", "/static/..%2Froutes.py", "/static/%2Fetc%2Fpasswd",
    "/static/nothing.js", "/static/", "/static/sub/app.js", "/static/app.js%00.png", "/static/.", "/index.html",
    "/v1/playground/runs/..", "/v1/playground/runs/%2e%2e", "/v1/playground/runs/..%2Foutside",
    "/v1/playground/runs/notes", "/v1/playground/runs/escape", "/v1/playground/runs/nothing",
    "/v1/playground/runs/%2Ftmp", "/v1/playground/runs/escape/loss.png", "/v1/playground/runs/../outside/loss.png",
    "/v1/playground/examples?run=..", "/v1/playground/examples?run=escape", "/v1/playground/examples?run=notes",
])
def test_names_that_leave_their_directory_or_do_not_exist_are_404(server, path):
    status, _, raw = fetch(server, "GET", path)
    assert status == 404, (path, raw)
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_the_page_is_public_and_every_v1_endpoint_wants_the_key(tiny_model_dir, runs):
    with load_playground(str(tiny_model_dir), runs_dir=runs, port=0, max_tokens=8, api_key=KEY).start() as server:
        for path in ("/", "/static/app.js"):
            assert fetch(server, "GET", path)[0] == 200, path
        assert fetch(server, "GET", "/static/nothing.js")[0] == 404
        assert call(server, "GET", "/health") == (200, {"status": "ok"})
        for method, path, body in [("GET", "/v1/playground/info", None), ("GET", "/v1/playground/runs", None),
                                   ("GET", "/v1/playground/runs/tasks", None),
                                   ("GET", "/v1/playground/runs/tasks/loss.png", None),
                                   ("GET", "/v1/playground/examples", None),
                                   ("POST", "/v1/playground/score", {"models": ["base"], "limit": 1}),
                                   ("GET", "/v1/models", None), ("POST", "/v1/adapters", {"name": "tasks"})]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                status, answer = call(server, method, path, body, headers)
                assert status == 401 and answer["error"]["code"] == "invalid_api_key", (method, path)
        status, info = call(server, "GET", "/v1/playground/info", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and info["auth"] is True and info["can_add_adapters"] is False


# -- runs
def test_info(server, tiny_model_dir, runs):
    assert call(server, "GET", "/v1/playground/info") == (200, {
        "base": tiny_model_dir.name, "models": [tiny_model_dir.name, *server.scheduler.adapters],
        "runs_dir": str(runs), "can_add_adapters": True, "auth": False})
    assert server.model_ids()[:2] == [tiny_model_dir.name, "a"]


def test_runs_are_the_runs_listing_and_adding_one_loads_its_adapter(server, runs):
    listed = [r.as_dict() for r in sort_runs(list_runs(runs))]
    assert {r["name"] for r in listed} == {"tasks", "ok", "escape"}  # lorakit runs follows the symlink out
    status, body = call(server, "GET", "/v1/playground/runs")
    assert status == 200
    assert ([{k: v for k, v in r.items() if k not in ("loaded", "has_adapter")} for r in body["runs"]]
            == [r for r in listed if r["name"] != "escape"])  # the playground does not
    flags = {r["name"]: (r["loaded"], r["has_adapter"]) for r in body["runs"]}
    assert flags == {"tasks": (False, True), "ok": (False, True)}
    assert call(server, "POST", "/v1/adapters", {"name": "tasks"})[0] == 200
    flags = {r["name"]: r["loaded"] for r in call(server, "GET", "/v1/playground/runs")[1]["runs"]}
    assert flags == {"tasks": True, "ok": False}
    assert "tasks" in call(server, "GET", "/v1/playground/info")[1]["models"]
    assert call(server, "GET", "/v1/playground/runs/tasks")[1]["loaded"] is True


def test_one_run_is_its_files(server, runs):
    run_dir = runs / "tasks"
    status, body = call(server, "GET", "/v1/playground/runs/tasks")
    assert status == 200
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report = (run_dir / "report.md").read_text()
    assert body["name"] == "tasks" and body["status"] == "finished" and body["has_adapter"] is True
    assert body["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert body["report"] == report
    assert body["curves"]["train"] == [[m["step"], m["loss"]] for m in records if m["kind"] == "train"]
    assert body["curves"]["eval"] == [[m["step"], m["eval_loss"]] for m in records if m["kind"] == "eval"]
    assert [p[0] for p in body["curves"]["train"]] == [1, 2, 3, 4] and len(body["curves"]["eval"]) >= 2
    scores = [m for m in records if m["kind"] == "score"]
    assert [body["score_before"], body["score_after"]] == scores
    assert body["data_summary"] and all(line in report.splitlines() for line in body["data_summary"])
    status, headers, raw = fetch(server, "GET", "/v1/playground/runs/tasks/loss.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert raw == (run_dir / "loss.png").read_bytes() and raw.startswith(b"\x89PNG")


# -- examples and scores
def chats(records):
    return [{"messages": r["messages"][:-1], "reference": r["messages"][-1]["content"]} for r in records]


def test_examples_are_the_datas_held_out_records(server, runs):
    builtin = chats(BUILTIN_DATASETS["task-api"]()[1])
    for query, run in (("?limit=5", None), ("?run=tasks&limit=5", "tasks")):
        status, body = call(server, "GET", "/v1/playground/examples" + query)
        assert status == 200 and (body["run"], body["data"], body["scorer"]) == (run, "task-api", "task-api")
        assert [{"messages": e["messages"], "reference": e["reference"]} for e in body["examples"]] == builtin[:5]
        assert [e["index"] for e in body["examples"]] == list(range(5))
    assert len(call(server, "GET", "/v1/playground/examples")[1]["examples"]) == 20
    status, body = call(server, "GET", "/v1/playground/examples?run=ok&limit=200")
    config = yaml.safe_load((runs / "ok" / "config.yaml").read_text())
    held = split_records(ok_records(), config["val_fraction"], config["seed"])[1]
    assert status == 200 and body["scorer"] == "exact" and body["data"] == config["data"]
    assert [{"messages": e["messages"], "reference": e["reference"]} for e in body["examples"]] == chats(held)
    for bad in ("0", "201", "x", "-1"):
        assert call(server, "GET", f"/v1/playground/examples?limit={bad}")[0] == 400


def chat_answer(server, model, messages, max_tokens, stop):
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    status, answer = call(server, "POST", "/v1/chat/completions", {**body, **({"stop": stop} if stop else {})})
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"].strip()


def score_in_background(server, body):
    """POST the score request with the worker paused until all its jobs are queued: they then run
    in shared batches (the first one full)."""
    result, before = {}, server.scheduler.submitted
    batches = len(server.scheduler.batches)
    server.scheduler.pause()
    thread = threading.Thread(target=lambda: result.update(answer=call(server, "POST", "/v1/playground/score", body)))
    thread.start()
    jobs = len(body["models"]) * body["limit"]
    try:
        assert server.scheduler.wait_submitted(before + jobs, timeout=120)
    finally:
        server.scheduler.resume()
    thread.join(timeout=300)
    return result["answer"], server.scheduler.batches[batches:]


@pytest.mark.parametrize("run, models, limit, stop", [
    ("ok", ["base", "ok", "a"], 12, None),  # the exact scorer: "ok" right three times in four, base never
    ("tasks", ["base", "tasks", "a"], 4, ["\n"]),  # task-api: one line of JSON, stopped at the line break
])
def test_score_equals_the_same_chat_requests_scored_with_the_runs_scorer(server, runs, run, models, limit, stop):
    for name in models[1:-1]:
        if name not in server.scheduler.adapters:
            assert call(server, "POST", "/v1/adapters", {"name": name})[0] == 200
    (status, body), batches = score_in_background(server, {"run": run, "models": models, "limit": limit,
                                                           "max_tokens": 8})
    assert status == 200, body
    assert batches[0].rows == 8 and len(set(batches[0].models)) > 1  # every job queued at once, batched together
    examples = call(server, "GET", f"/v1/playground/examples?run={run}&limit={limit}")[1]["examples"]
    scorer = SCORERS[body["scorer"]]
    assert body["n"] == len(examples) == limit
    verdicts = {}
    for model in models:
        predictions = [chat_answer(server, model, e["messages"], 8, stop) for e in examples]
        references = [e["reference"] for e in examples]
        exact, fields = scorer(predictions, references)
        verdicts[model] = [scorer([p], [r])[0] == 1.0 for p, r in zip(predictions, references)]
        assert body["models"][model] == {"exact": exact, "correct": sum(verdicts[model]), "fields": fields}
        assert [row["predictions"][model] for row in body["examples"]] == predictions
    for i, (row, example) in enumerate(zip(body["examples"], examples)):
        assert (row["index"], row["reference"]) == (example["index"], example["reference"])
        assert row["prompt"] == example["messages"][-1]["content"]
        assert row["correct"] == {m: verdicts[m][i] for m in models}
        assert row["disagree"] == (len({verdicts[m][i] for m in models}) > 1)
    if run == "ok":  # lorakit train scored the same 12 examples after training, the way lorakit eval does
        after = [json.loads(line) for line in (runs / "ok" / "metrics.jsonl").read_text().splitlines()][-1]
        assert after["kind"] == "score" and body["models"]["ok"]["exact"] == after["exact"] == 0.75
        assert [row["disagree"] for row in body["examples"]] == [row["reference"] == "ok" for row in body["examples"]]


def test_score_refuses_bad_requests(server):
    for body, param in [({"models": []}, "models"), ({"models": ["base"], "limit": 201}, "limit"),
                        ({"models": ["nothing"]}, "model"), ({"models": ["base"], "run": "nothing"}, "run"),
                        ({"models": ["base"], "max_tokens": 17}, "max_tokens"), ({"models": "base"}, "models")]:
        status, answer = call(server, "POST", "/v1/playground/score", body)
        assert status in (400, 404) and answer["error"]["param"] == param, (body, answer)


# -- the commands
def _options(command):
    parser = build_parser({})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {o for a in sub._actions for o in a.option_strings}


def test_serve_keeps_its_options_and_playground_adds_the_browser(tiny_model_dir):
    serve = {"--model", "--adapter", "--host", "--port", "--max-batch", "--max-tokens", "--temperature", "--precision",
             "--max-body-bytes", "--api-key", "--insecure-no-auth", "--adapter-dir", "--idle-timeout",
             "--max-connections", "--drain-timeout", "--quiet", "--runs-dir", "-h", "--help"}
    assert _options("serve") == serve
    assert _options("playground") == serve | {"--no-browser"}
    args = build_parser({}).parse_args(["playground"])
    assert (args.host, args.runs_dir, args.adapter_dir, args.no_browser) == ("127.0.0.1", "runs", None, False)
    assert args.func.__name__ == "_playground" and build_parser({}).parse_args(["serve"]).func.__name__ == "_serve"
