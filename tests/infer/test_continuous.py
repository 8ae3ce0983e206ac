"""Continuous batching in `lorakit serve`: a request joins the running batch, leaves it when it
ends, a failing row fails only its own request, and a shared system prompt is computed once.
Every answer equals transformers' greedy ``generate`` with that adapter alone (fp32 server)."""

import threading

import pytest

from lorakit.generation import batcher as batcher_module
from lorakit.data.chat import chat_ids
from lorakit.infer.scheduler import Batch

from .test_server import PROMPTS, adapter_dirs, call, expected, reference, server  # noqa: F401  (fixtures)


def test_a_request_sent_while_a_batch_runs_joins_it_and_is_answered_first(server, reference, monkeypatch):  # noqa: F811
    """The long request runs alone; after its second step the short one is sent, and the worker
    waits at its third step until it is queued: it joins the running batch (its own Batch
    record, after the long one's), makes its 2 tokens and is answered while the long one runs on."""
    scheduler, real = server.scheduler, batcher_module.Batcher.step
    before, seen = scheduler.submitted, len(scheduler.batches)
    steps, sent = [0], threading.Event()

    def step(self):
        steps[0] += 1
        if steps[0] == 2:
            sent.set()
        if steps[0] == 3:
            assert scheduler.wait_submitted(before + 2, timeout=60)
        return real(self)

    monkeypatch.setattr(batcher_module.Batcher, "step", step)
    long_ids, short_ids = (reference.tokenizer(p)["input_ids"] for p in PROMPTS[1:3])
    assert len(expected(reference, "a", long_ids, 20)[0]) == 20  # no early EOS: it runs 20 steps
    bodies = {"long": {"model": "a", "prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0},
              "short": {"model": "b", "prompt": PROMPTS[2], "max_tokens": 2, "temperature": 0}}
    answered, results = [], {}

    def send(name):
        results[name] = call(server, "POST", "/v1/completions", bodies[name])
        answered.append(name)

    first = threading.Thread(target=send, args=("long",))
    first.start()
    assert sent.wait(60)
    send("short")
    first.join(120)
    assert answered == ["short", "long"]
    assert scheduler.batches[seen:] == [Batch(1, 1, ("a",)), Batch(1, 1, ("b",))]
    assert results["long"][1]["choices"][0]["text"] == expected(reference, "a", long_ids, 20)[1]
    assert results["short"][1]["choices"][0]["text"] == expected(reference, "b", short_ids, 2)[1]


def test_a_failing_row_fails_only_its_request(server, reference, monkeypatch):  # noqa: F811
    """A step fails whenever the poisoned prompt's row has two tokens: its request gets a 500; the
    batch's other requests run on alone from their text so far and get their whole answers."""
    scheduler, real = server.scheduler, batcher_module.Batcher.step
    poison = reference.tokenizer("poisoned row")["input_ids"]

    def step(self):
        if any(r.request.prompt_ids[:len(poison)] == poison and len(r.ids) >= 2 for r in self.rows):
            raise RuntimeError("row failure")
        return real(self)

    monkeypatch.setattr(batcher_module.Batcher, "step", step)
    ids = reference.tokenizer(PROMPTS[0])["input_ids"]
    bodies = [{"model": "a", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0},
              {"model": "b", "prompt": "poisoned row", "max_tokens": 10, "temperature": 0},
              {"model": "base", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}]
    before, seen = scheduler.submitted, len(scheduler.batches)
    results = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, call(server, "POST", "/v1/completions",
                                                                                 bodies[i]))) for i in range(3)]
    scheduler.pause()
    try:
        for t in threads:
            t.start()
        assert scheduler.wait_submitted(before + 3, timeout=60)
    finally:
        scheduler.resume()
    for t in threads:
        t.join(120)
    assert scheduler.batches[seen].requests == 3  # they ran together first
    assert results[1][0] == 500 and "row failure" in results[1][1]["error"]["message"]
    for i, name in [(0, "a"), (2, None)]:
        assert results[i][0] == 200, results[i]
        assert results[i][1]["choices"][0]["text"] == expected(reference, name, ids, 10)[1]


@pytest.mark.parametrize("model", ["a", "base"])
def test_a_shared_system_prompt_is_computed_once(server, reference, model):  # noqa: F811
    system = "You are a terse assistant. Answer in one line, as JSON, with the keys title and due."
    decoder = None
    for question in ["Buy milk tomorrow", "Call the bank on Friday"]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        status, body = call(server, "POST", "/v1/chat/completions",
                            {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0})
        assert status == 200
        ids = chat_ids(reference.tokenizer, messages)
        assert body["choices"][0]["message"]["content"] == expected(reference, None if model == "base" else model,
                                                                    ids, 6)[1]
        decoder = server.scheduler._batcher.decoder
        if question.startswith("Buy"):
            hits = decoder.prefix_hits
    shared = len(reference.tokenizer(f"<|im_start|>system\n{system}<|im_end|>\n")["input_ids"])
    assert decoder.prefix_hits - hits >= shared  # the second request copied at least the system turn
