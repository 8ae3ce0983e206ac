"""`lorakit serve` over real HTTP on localhost: OpenAI's shapes, outputs equal to transformers'
greedy `generate` with each adapter alone, streaming, one batch for concurrent requests across
adapters, adapters added and removed through the API, every refused request, and the server
still answering after errors."""

import http.client
import json
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

from lorakit.cli import build_parser
from lorakit.errors import ConfigError
from lorakit.infer import chat_prompt_ids
from lorakit.infer import scheduler as scheduler_module
from lorakit.infer.server import load_server
from lorakit.model import PeftModel
from lorakit.models import load_model

from .conftest import make_adapter

TARGETS = ("q_proj", "v_proj", "lm_head")
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "SELECT name FROM"]


# -- fixtures
@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"a": make_adapter(tiny_model_dir, root / "a", seed=1, targets=TARGETS),
            "b": make_adapter(tiny_model_dir, root / "b", seed=2, targets=TARGETS)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dirs):
    server = load_server(str(tiny_model_dir), [("a", adapter_dirs["a"]), ("b", adapter_dirs["b"])], port=0,
                         max_batch=4, max_tokens=24, max_body_bytes=4096, precision="fp32").start()  # fp32 references
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dirs):
    """``generate(name, prompt_ids, n)``: transformers' greedy ``generate`` with adapter ``name``
    alone (None: the plain base model, without any LoRA layer)."""
    plain, tokenizer = load_model(tiny_model_dir)
    base, _ = load_model(tiny_model_dir)
    peft = PeftModel.from_pretrained(base, adapter_dirs["a"], adapter_name="a")
    peft.load_adapter(adapter_dirs["b"], "b")

    def generate(name, ids, n):
        model = plain if name is None else peft
        if name is not None:
            peft.set_adapter(name)
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[0, len(ids):].tolist()

    generate.tokenizer = tokenizer
    return generate


# -- HTTP
def call(server, method, path, body=None, raw=None, headers=None):
    """(status, JSON body) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.load(err)


def stream(server, path, body):
    """The parsed ``data:`` events of a streamed answer ("[DONE]" kept as the string)."""
    request = urllib.request.Request(server.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        text = response.read().decode()
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events), text
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


def expected(reference, name, ids, n):
    tokens = reference(name, ids, n)
    return tokens, reference.tokenizer.decode(tokens, skip_special_tokens=True)


def finish(tokens, n):
    return "length" if len(tokens) == n and tokens[-1] != 2 else "stop"


# -- models
def test_models_lists_the_base_model_and_each_adapter(server, tiny_model_dir, adapter_dirs):
    status, body = call(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [tiny_model_dir.name, "a", "b"]
    assert all(m["object"] == "model" and m["owned_by"] == "lorakit" for m in body["data"])
    status, card = call(server, "GET", "/v1/models/b")
    assert status == 200 and card["parent"] == tiny_model_dir.name and card["root"] == "b"
    assert str(adapter_dirs["b"].parent) not in json.dumps(call(server, "GET", "/v1/models")[1])  # no server path
    assert call(server, "GET", "/v1/models/zzz")[0] == 404
    assert call(server, "GET", "/health") == (200, {"status": "ok"})


# -- completions and chat, equal to generate alone
@pytest.mark.parametrize("model", ["base", "a", "b", "tiny-name"])
def test_completion_equals_generate_with_that_adapter_alone(server, reference, tiny_model_dir, model):
    model = tiny_model_dir.name if model == "tiny-name" else model
    ids = reference.tokenizer(PROMPTS[0])["input_ids"]
    tokens, text = expected(reference, None if model in ("base", tiny_model_dir.name) else model, ids, 10)
    status, body = call(server, "POST", "/v1/completions",
                        {"model": model, "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == model and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish(tokens, 10)}]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                             "total_tokens": len(ids) + len(tokens)}


def test_a_list_of_prompts_gives_one_choice_each_in_order(server, reference):
    status, body = call(server, "POST", "/v1/completions",
                        {"model": "a", "prompt": PROMPTS, "max_tokens": 6, "temperature": 0})
    assert status == 200, body
    for i, prompt in enumerate(PROMPTS):
        ids = reference.tokenizer(prompt)["input_ids"]
        assert body["choices"][i]["index"] == i
        assert body["choices"][i]["text"] == expected(reference, "a", ids, 6)[1]
    ids = reference.tokenizer(PROMPTS[1])["input_ids"]  # token ids work as a prompt too
    status, body = call(server, "POST", "/v1/completions", {"model": "b", "prompt": ids, "max_tokens": 6,
                                                            "temperature": 0})
    assert body["choices"][0]["text"] == expected(reference, "b", ids, 6)[1]


def test_chat_equals_generate_on_the_chat_template(server, reference):
    ids = chat_prompt_ids(reference.tokenizer, "remind me to call mum", system="Answer in JSON.")
    tokens, text = expected(reference, "b", ids, 12)
    messages = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "remind me to call mum"}]
    status, body = call(server, "POST", "/v1/chat/completions",
                         {"model": "b", "messages": messages, "max_tokens": 12, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["choices"][0]["finish_reason"] == finish(tokens, 12)
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == len(tokens)


# -- streaming
def test_streamed_completion_is_the_same_text_in_chunks(server, reference):
    ids = reference.tokenizer(PROMPTS[1])["input_ids"]
    tokens, text = expected(reference, "a", ids, 12)
    events = stream(server, "/v1/completions", {"model": "a", "prompt": PROMPTS[1], "max_tokens": 12,
                                                "temperature": 0, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    *chunks, last_choice, use = events[:-1]
    assert all(c["object"] == "text_completion" and c["choices"][0]["finish_reason"] is None for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1 and len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert last_choice["choices"][0]["finish_reason"] == finish(tokens, 12)
    assert use["choices"] == [] and use["usage"]["completion_tokens"] == len(tokens)


def test_streamed_prompts_interleave_by_choice_index(server):
    body = {"model": "b", "prompt": PROMPTS, "max_tokens": 6, "temperature": 0}
    whole = call(server, "POST", "/v1/completions", body)[1]["choices"]
    events = stream(server, "/v1/completions", body)[:-1]
    for i, choice in enumerate(whole):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_streamed_chat_sends_the_role_then_the_content(server, reference):
    ids = chat_prompt_ids(reference.tokenizer, "hello")
    tokens, text = expected(reference, None, ids, 10)
    events = stream(server, "/v1/chat/completions", {"model": "base", "max_tokens": 10, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hello"}]})
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert "".join(d.get("content", "") for d in deltas) == text
    assert events[-2]["choices"][0]["finish_reason"] == finish(tokens, 10)


def test_stop_strings_cut_the_text_streamed_or_not(server, reference):
    ids = reference.tokenizer(PROMPTS[2])["input_ids"]
    tokens, text = expected(reference, "b", ids, 16)
    stop = text[len(text) // 2:len(text) // 2 + 3]  # spans tokens, most likely
    assert stop.strip(), text
    cut = text[:text.find(stop)]
    body = {"model": "b", "prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0, "stop": [stop, "\x00never"]}
    status, answer = call(server, "POST", "/v1/completions", body)
    assert status == 200, answer
    assert answer["choices"][0]["text"] == cut and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] < len(tokens)
    events = stream(server, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats(server):
    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first, second = call(server, "POST", "/v1/completions", body), call(server, "POST", "/v1/completions", body)
    assert first[0] == 200 and first[1]["choices"] == second[1]["choices"]


# -- batching
def test_concurrent_requests_for_different_adapters_run_in_one_batch(server, reference):
    scheduler = server.scheduler
    bodies = [("/v1/completions", {"model": "a", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}),
              ("/v1/completions", {"model": "base", "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0}),
              ("/v1/chat/completions", {"model": "b", "max_tokens": 7, "temperature": 0,
                                        "messages": [{"role": "user", "content": "hi"}]})]
    results = [None] * len(bodies)

    def send(i):
        results[i] = call(server, "POST", *bodies[i])

    before, seen = scheduler.submitted, len(scheduler.batches)
    scheduler.pause()
    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        assert scheduler.wait_submitted(before + len(bodies), timeout=60)
    finally:
        scheduler.resume()
    for t in threads:
        t.join(timeout=120)
    assert len(scheduler.batches) == seen + 1
    batch = scheduler.batches[-1]
    assert (batch.requests, batch.rows) == (3, 3) and sorted(map(str, batch.models)) == ["None", "a", "b"]
    ids = [reference.tokenizer(PROMPTS[0])["input_ids"], reference.tokenizer(PROMPTS[1])["input_ids"],
           chat_prompt_ids(reference.tokenizer, "hi")]
    assert results[0][1]["choices"][0]["text"] == expected(reference, "a", ids[0], 8)[1]
    assert results[1][1]["choices"][0]["text"] == expected(reference, None, ids[1], 5)[1]
    assert results[2][1]["choices"][0]["message"]["content"] == expected(reference, "b", ids[2], 7)[1]


def test_a_short_request_is_answered_while_its_batch_runs_on(server, reference, monkeypatch):
    """The long request's row is held at its 4th token (after the short one's 2 tokens) until the
    short answer has arrived: the short answer cannot have waited for the batch to end."""
    real, release = scheduler_module.generate_batch, threading.Event()

    def held(model, tokenizer, requests, *, on_token=None, autocast=None):
        long_row = max(range(len(requests)), key=lambda i: requests[i].sampling.max_new_tokens)
        count = [0]

        def hold(i, token_id):
            on_token(i, token_id)
            count[0] += i == long_row
            if i == long_row and count[0] == 4:
                assert release.wait(60), "the short request was not answered while the batch ran"
        return real(model, tokenizer, requests, on_token=hold, autocast=autocast)

    monkeypatch.setattr(scheduler_module, "generate_batch", held)
    monkeypatch.setattr(scheduler_module.Scheduler, "continuous", False)  # one generate_batch call a batch
    long_ids = reference.tokenizer(PROMPTS[1])["input_ids"]
    assert len(expected(reference, "b", long_ids, 12)[0]) > 4  # the long row reaches the token it is held at
    results = {}
    bodies = {"short": {"model": "a", "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0},
              "long": {"model": "b", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}}
    threads = {k: threading.Thread(target=lambda k=k: results.__setitem__(k, call(server, "POST", "/v1/completions",
                                                                                  bodies[k]))) for k in bodies}
    scheduler, before = server.scheduler, server.scheduler.submitted
    scheduler.pause()
    try:
        for t in threads.values():
            t.start()
        assert scheduler.wait_submitted(before + 2, timeout=60)
    finally:
        scheduler.resume()
    threads["short"].join(timeout=60)
    assert "short" in results and "long" not in results  # the long row is still held
    release.set()
    threads["long"].join(timeout=60)
    assert scheduler.batches[-1].requests == 2
    for key, name in [("short", "a"), ("long", "b")]:
        ids = reference.tokenizer(bodies[key]["prompt"])["input_ids"]
        text = expected(reference, name, ids, bodies[key]["max_tokens"])[1]
        assert results[key][0] == 200 and results[key][1]["choices"][0]["text"] == text


# -- adapters through the API
def test_adapters_are_added_and_removed_through_the_api(tiny_model_dir, adapter_dirs, reference, tmp_path):
    """Starting with no adapter: the first one added (by name, from --adapter-dir) wraps the base
    model, removing the last one leaves the plain base model; every answer equals generate alone."""
    ids = reference.tokenizer(PROMPTS[0])["input_ids"]
    ask = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    shelf = tmp_path / "shelf"  # the --adapter-dir: a, b (as a training run: run-b/adapter) and broken
    shutil.copytree(adapter_dirs["a"], shelf / "a")
    shutil.copytree(adapter_dirs["b"], shelf / "run-b" / "adapter")
    broken = shelf / "broken"  # its tensors have rank 4, its config says 8
    shutil.copytree(adapter_dirs["a"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with load_server(str(tiny_model_dir), port=0, max_tokens=8, adapter_dir=shelf, precision="fp32").start() as server:
        assert [m["id"] for m in call(server, "GET", "/v1/models")[1]["data"]] == [tiny_model_dir.name]
        status, err = call(server, "POST", "/v1/adapters", {"name": "broken"})
        assert status == 400 and err["error"]["code"] == "adapter_invalid", err
        assert str(tmp_path) not in err["error"]["message"]  # no server path in the error
        assert call(server, "POST", "/v1/completions", {**ask, "model": "base"})[1]["choices"][0]["text"] == \
            expected(reference, None, ids, 6)[1]  # a failed load leaves the base model as it was
        status, card = call(server, "POST", "/v1/adapters", {"name": "tuned", "adapter": "a"})
        assert status == 200 and card["id"] == "tuned" and card["parent"] == tiny_model_dir.name
        assert call(server, "POST", "/v1/adapters", {"name": "other", "adapter": "run-b"})[0] == 200
        assert [m["id"] for m in call(server, "GET", "/v1/models")[1]["data"]] == [tiny_model_dir.name, "tuned",
                                                                                   "other"]
        assert call(server, "POST", "/v1/completions", {**ask, "model": "tuned"})[1]["choices"][0]["text"] == \
            expected(reference, "a", ids, 6)[1]
        assert call(server, "POST", "/v1/completions", {**ask, "model": "other"})[1]["choices"][0]["text"] == \
            expected(reference, "b", ids, 6)[1]

        status, err = call(server, "POST", "/v1/adapters", {"name": "tuned", "adapter": "run-b"})
        assert status == 409 and err["error"]["code"] == "adapter_exists"
        for bad, status, param in [({"name": "x y", "adapter": "a"}, 400, "name"),
                                   ({"name": "base", "adapter": "a"}, 400, "name"),
                                   ({"name": "new", "adapter": "nope"}, 404, "adapter"),
                                   ({"name": "new", "path": str(adapter_dirs["a"])}, 400, "path"),
                                   ({"name": "new", "adapter": 3}, 400, "adapter"), ({"name": 3}, 400, "name")]:
            got, err = call(server, "POST", "/v1/adapters", bad)
            assert got == status and err["error"]["param"] == param, (bad, err)

        assert call(server, "DELETE", "/v1/adapters/tuned") == (200, {"id": "tuned", "object": "model",
                                                                      "deleted": True})
        status, err = call(server, "POST", "/v1/completions", {**ask, "model": "tuned"})
        assert status == 404 and err["error"]["code"] == "model_not_found"
        assert call(server, "DELETE", "/v1/adapters/tuned")[0] == 404
        assert call(server, "DELETE", "/v1/adapters/other")[0] == 200  # the last one: a plain model again
        assert not isinstance(server.scheduler.model, PeftModel)
        assert call(server, "POST", "/v1/completions", {**ask, "model": "base"})[1]["choices"][0]["text"] == \
            expected(reference, None, ids, 6)[1]


# -- refused requests: OpenAI's error shape, a 4xx, and the server goes on
OK = {"model": "a", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
BAD = [
    # (method, path, body or raw bytes, status, param)
    ("POST", "/v1/completions", b"{not json", 400, None),
    ("POST", "/v1/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/completions", b"", 400, None),
    ("POST", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("POST", "/v1/completions", {"model": "a"}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "model": "nope"}, 404, "model"),
    ("POST", "/v1/completions", {**OK, "model": 7}, 400, "model"),
    ("POST", "/v1/completions", {**OK, "prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": []}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": ["a", "b", "c", "d", "e"]}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "max_tokens": "2"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {**OK, "max_tokens": 25}, 400, "max_tokens"),
    ("POST", "/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/completions", {**OK, "temperature": 2.5}, 400, "temperature"),
    ("POST", "/v1/completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {**OK, "top_k": -1}, 400, "top_k"),
    ("POST", "/v1/completions", {**OK, "seed": 1.5}, 400, "seed"),
    ("POST", "/v1/completions", {**OK, "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {**OK, "stop": 5}, 400, "stop"),
    ("POST", "/v1/completions", {**OK, "n": 2}, 400, "n"),
    ("POST", "/v1/completions", {**OK, "logprobs": 3}, 400, "logprobs"),
    ("POST", "/v1/completions", {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("POST", "/v1/chat/completions", {"model": "a"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("POST", "/v1/chat/completions", {**CHAT, "n": 3}, 400, "n"),
    ("POST", "/v1/completions", b"{" + b" " * 5000 + b"}", 413, None),
    ("POST", "/v1/nothing", OK, 404, None),
    ("GET", "/v1/completions", None, 405, None),
    ("DELETE", "/v1/models", None, 405, None),
]


@pytest.mark.parametrize("method,path,body,status,param", BAD,
                         ids=[f"{i}-{m} {p} {s}" for i, (m, p, _, s, _) in enumerate(BAD)])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, method, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, answer = call(server, method, path, body=None if raw is not None else body, raw=raw)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    assert call(server, "POST", "/v1/completions", OK)[0] == 200  # still serving


def test_an_error_inside_generation_fails_that_batch_only(server, reference, monkeypatch):
    real = scheduler_module.generate_batch

    def broken(model, tokenizer, requests, *, on_token=None, autocast=None):
        if on_token is not None:
            on_token(0, tokenizer.encode("hello")[0])  # a token streams out before the failure
        raise RuntimeError("the accelerator caught fire")

    monkeypatch.setattr(scheduler_module, "generate_batch", broken)
    monkeypatch.setattr(scheduler_module.Scheduler, "continuous", False)  # one generate_batch call a batch
    status, err = call(server, "POST", "/v1/completions", OK)
    assert status == 500 and err["error"]["type"] == "server_error"
    assert "the accelerator caught fire" in err["error"]["message"]
    events = stream(server, "/v1/completions", OK)  # mid-stream: the text so far, the error, the end
    assert events[-1] == "[DONE]" and "the accelerator caught fire" in events[-2]["error"]["message"]
    monkeypatch.setattr(scheduler_module, "generate_batch", real)
    ids = reference.tokenizer("hi")["input_ids"]
    status, body = call(server, "POST", "/v1/completions", {**OK, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == expected(reference, "a", ids, 2)[1]


# -- starting and stopping
def test_start_refuses_bad_adapters_and_close_stops_cleanly(tiny_model_dir, adapter_dirs):
    with pytest.raises(ConfigError, match="given twice.*no adapter_config.json"):
        load_server(str(tiny_model_dir), [("a", adapter_dirs["a"]), ("a", tiny_model_dir)], port=0)
    with pytest.raises(ConfigError, match="the base model's"):
        load_server(str(tiny_model_dir), [("base", adapter_dirs["a"])], port=0)
    server = load_server(str(tiny_model_dir), [("a", adapter_dirs["a"])], port=0).start()
    assert call(server, "POST", "/v1/completions", OK)[0] == 200
    queued = []  # a request still queued when the server closes gets a 503
    server.scheduler.pause()
    before = server.scheduler.submitted
    thread = threading.Thread(target=lambda: queued.append(call(server, "POST", "/v1/completions", OK)))
    thread.start()
    assert server.scheduler.wait_submitted(before + 1, timeout=60)
    server.close()
    thread.join(timeout=60)
    status, err = queued[0]
    assert status == 503 and err["error"]["code"] == "shutting_down"
    assert not server.scheduler._thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url + "/v1/models", timeout=10)


def test_cli_serve_parses_its_flags():
    args = build_parser().parse_args(["serve", "--model", "m", "--adapter", "a=x", "--adapter", "b=y", "--port", "0",
                                      "--max-batch", "2", "--precision", "bf16"])
    assert args.func.__name__ == "_serve" and args.adapter == ["a=x", "b=y"] and args.max_batch == 2


def test_lorakit_serve_answers_and_stops_cleanly_on_sigterm(tiny_model_dir, adapter_dirs):
    """SIGTERM while a long stream is in flight, with --drain-timeout 0: the stream is cancelled at
    its next token with a clean error (or it was already complete), the worker stops before the
    process ends (no "terminate called" abort), the server prints "stopped" and exits 0."""
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--model", str(tiny_model_dir), "--adapter",
               f"a={adapter_dirs['a']}", "--port", "0", "--quiet", "--max-tokens", "400", "--drain-timeout", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            line = process.stdout.readline()  # printed once the server listens
            assert line.startswith(f"serving {tiny_model_dir.name}, a on http://127.0.0.1:"), line
            url = line.split(" on ")[1].split()[0]
            with urllib.request.urlopen(url + "/models", timeout=60) as response:
                assert [m["id"] for m in json.load(response)["data"]] == [tiny_model_dir.name, "a"]
            body = {"model": "a", "prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0, "stream": True}
            request = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                first = response.readline()  # a token came: the request is in flight
                process.send_signal(signal.SIGTERM)
                rest = response.read().decode()
            out, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, err
    assert out.strip() == "stopped" and "terminate called" not in err
    assert first.startswith(b"data: {") and rest.rstrip().endswith("data: [DONE]")
    last = [json.loads(e[6:]) for e in rest.split("\n\n") if e.startswith("data: {")][-1]
    assert last.get("error", {}).get("code") == "shutting_down" or last["choices"][0]["finish_reason"] is not None


def test_one_connection_keeps_working_after_refused_requests(server):
    """HTTP/1.1 keep-alive: a refused request's body is read and dropped, so the next request on
    the same connection is answered."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        for path, body, status in [("/v1/nothing", OK, 404), ("/v1/completions", {"model": "zzz", "prompt": "x"}, 404),
                                   ("/v1/completions", b"{broken", 400), ("/v1/completions", OK, 200),
                                   ("/v1/completions", b"{" + b" " * 5000 + b"}", 413), ("/v1/completions", OK, 200)]:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == status, answer
    finally:
        connection.close()
