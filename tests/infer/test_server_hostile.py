"""`lorakit serve` against hostile and unlucky clients, over real HTTP on localhost: poison
requests are refused alone (400) before they join a batch, a row that fails inside a batch fails
only its own request, the API key, adapters by name from --adapter-dir only (no server path in any
answer), idle connections closed and a connection limit, and a graceful drain (SIGTERM on
`lorakit serve` itself: test_server.py)."""

import http.client
import json
import shutil
import socket
import threading

import pytest

from lorakit.cli import build_parser
from lorakit.errors import ConfigError
from lorakit.infer import scheduler as scheduler_module
from lorakit.infer.server import check_exposure, load_server

from .conftest import make_adapter
from .test_server import call, expected, reference  # noqa: F401  (reference: a fixture)

TARGETS = ("q_proj", "v_proj", "lm_head")
GOOD = {"model": "a", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {"a": make_adapter(tiny_model_dir, root / "a", seed=1, targets=TARGETS),
            "b": make_adapter(tiny_model_dir, root / "b", seed=2, targets=TARGETS)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dirs):
    server = load_server(str(tiny_model_dir), [("a", adapter_dirs["a"]), ("b", adapter_dirs["b"])], port=0,
                         max_batch=8, max_tokens=24).start()
    yield server
    server.close()


def concurrently(server, bodies, queued):
    """Send the bodies at once while the worker is held, until ``queued`` of them wait together
    (the refused ones are answered at once, without queueing); their (status, answer) in order,
    and the batches the worker ran for them."""
    scheduler, results = server.scheduler, [None] * len(bodies)
    before, seen = scheduler.submitted, len(scheduler.batches)

    def send(i):
        raw = bodies[i] if isinstance(bodies[i], bytes) else None
        results[i] = call(server, "POST", "/v1/completions", None if raw else bodies[i], raw=raw)

    scheduler.pause()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    try:
        for t in threads:
            t.start()
        assert scheduler.wait_submitted(before + queued, timeout=60)
    finally:
        scheduler.resume()
    for t in threads:
        t.join(timeout=120)
    return results, scheduler.batches[seen:]


# -- each request checked alone, before it joins a batch
NESTED = b'{"model": "a", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
POISON = [  # (body or raw bytes, param)
    ({**GOOD, "seed": 2 ** 80}, "seed"),
    ({**GOOD, "seed": -1}, "seed"),
    ({**GOOD, "seed": 2 ** 63}, "seed"),
    ({**GOOD, "seed": "7"}, "seed"),
    ({**GOOD, "seed": True}, "seed"),
    (NESTED, None),
    (b'{"model": "a", "prompt": "hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}", None),
    (b'{"model": "a", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", None),
    ({**GOOD, "max_tokens": 10 ** 30}, "max_tokens"),
    ({**GOOD, "max_tokens": 500}, "max_tokens"),
    ({**GOOD, "prompt": [5] * 500, "max_tokens": 20}, "max_tokens"),  # 520 > the tiny model's context of 512
    ({**GOOD, "max_tokens": 6.0}, "max_tokens"),
    ({**GOOD, "temperature": 10 ** 400}, "temperature"),
    ({**GOOD, "temperature": -(10 ** 400)}, "temperature"),
    ({**GOOD, "top_p": [1]}, "top_p"),
    ({**GOOD, "top_k": -(2 ** 80)}, "top_k"),
    ({**GOOD, "top_k": 1.5}, "top_k"),
    ({**GOOD, "prompt": [2 ** 80, 5]}, "prompt"),
    ({**GOOD, "prompt": [[1, 2], "x", {"a": 1}]}, "prompt"),
    ({**GOOD, "stop": [["x"]]}, "stop"),
    ({**GOOD, "stream": 1}, "stream"),
    ({**GOOD, "stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({**GOOD, "model": ["a"]}, "model"),
    ({**GOOD, "n": 2 ** 80}, "n"),
]


@pytest.mark.parametrize("body,param", POISON, ids=[f"{i}-{p}" for i, (_, p) in enumerate(POISON)])
def test_a_poison_request_gets_a_400_naming_its_field(server, body, param):
    raw = body if isinstance(body, bytes) else None
    status, answer = call(server, "POST", "/v1/completions", None if raw else body, raw=raw)
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"
    if isinstance(body, dict) and len(body.get("prompt", "")) == 500:
        assert answer["error"]["code"] == "context_length_exceeded"


def test_a_huge_top_k_keeps_every_token_instead_of_failing_the_batch(server):
    body = {**GOOD, "temperature": 1.0, "seed": 3}
    status, answer = call(server, "POST", "/v1/completions", {**body, "top_k": 2 ** 80})
    assert status == 200, answer
    assert answer["choices"] == call(server, "POST", "/v1/completions", {**body, "top_k": 0})[1]["choices"]


def test_poison_requests_sent_with_good_ones_do_not_fail_them(server, reference):  # noqa: F811
    """Three trials of good requests (two adapters and the base model) sent at once with poison
    ones: every good one gets its own model's greedy text."""
    ids = reference.tokenizer(GOOD["prompt"])["input_ids"]
    want = {m: expected(reference, None if m == "base" else m, ids, 6)[1] for m in ("a", "b", "base")}
    poison = [{**GOOD, "seed": 2 ** 80}, NESTED, {**GOOD, "max_tokens": 10 ** 9}, {**GOOD, "temperature": "hot"}]
    for trial in range(3):
        good = [{**GOOD, "model": m} for m in ("a", "b", "base")]
        bodies = good[:trial] + poison[:2] + good[trial:] + poison[2:]
        results, batches = concurrently(server, bodies, queued=3)
        statuses = [r[0] for r in results]
        assert sorted(statuses) == [200] * 3 + [400] * 4, results
        for body, (status, answer) in zip(bodies, results):
            if status == 200:
                assert answer["choices"][0]["text"] == want[body["model"]]
        assert sum(b.requests for b in batches) == 3


# -- one row's failure inside a batch fails only its request
def test_a_row_that_fails_inside_a_batch_fails_only_its_request(server, reference, monkeypatch):  # noqa: F811
    """The engine fails whenever the poisoned prompt is in the batch, after every row has made
    two tokens: the poisoned request gets a 500, the others (one of them streaming) get the whole
    text they would have got alone."""
    real = scheduler_module.generate_batch
    poison_ids = reference.tokenizer("poisoned row")["input_ids"]

    def failing(model, tokenizer, requests, *, on_token=None, autocast=None):
        poisoned = [i for i, r in enumerate(requests) if r.prompt_ids[:len(poison_ids)] == poison_ids]
        count = [0]

        def watch(i, token_id):
            count[0] += 1
            if poisoned and count[0] > 2 * len(requests):
                raise RuntimeError("row failure")
            return on_token(i, token_id)
        return real(model, tokenizer, requests, on_token=watch, autocast=autocast)

    monkeypatch.setattr(scheduler_module, "generate_batch", failing)
    monkeypatch.setattr(scheduler_module.Scheduler, "continuous", False)  # one generate_batch call a batch
    ids = reference.tokenizer(GOOD["prompt"])["input_ids"]
    bodies = [{**GOOD, "model": "a", "max_tokens": 10}, {**GOOD, "prompt": "poisoned row"},
              {**GOOD, "model": "b", "max_tokens": 10}, {**GOOD, "model": "base", "max_tokens": 10}]
    stream_result = []

    def streamed():
        request = json.dumps({**GOOD, "model": "b", "max_tokens": 10, "stream": True}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        connection.request("POST", "/v1/completions", body=request, headers={"Content-Type": "application/json"})
        stream_result.append(connection.getresponse().read().decode())
        connection.close()

    scheduler, before, seen = server.scheduler, server.scheduler.submitted, len(server.scheduler.batches)
    scheduler.pause()
    results = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, call(server, "POST", "/v1/completions",
                                                                                 bodies[i])))
               for i in range(len(bodies))] + [threading.Thread(target=streamed)]
    try:
        for t in threads:
            t.start()
        assert scheduler.wait_submitted(before + 5, timeout=60)
    finally:
        scheduler.resume()
    for t in threads:
        t.join(timeout=120)
    assert server.scheduler.batches[seen].requests == 5  # they did run together first
    status, err = results[1]
    assert status == 500 and "row failure" in err["error"]["message"]
    for i, name in [(0, "a"), (2, "b"), (3, None)]:
        assert results[i][0] == 200, results[i]
        assert results[i][1]["choices"][0]["text"] == expected(reference, name, ids, 10)[1]
    events = [json.loads(e[6:]) for e in stream_result[0].split("\n\n") if e and e != "data: [DONE]"]
    assert stream_result[0].rstrip().endswith("data: [DONE]") and all("error" not in e for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == expected(reference, "b", ids, 10)[1]


# -- the API key
def test_every_endpoint_but_health_wants_the_api_key(tiny_model_dir, adapter_dirs):
    with load_server(str(tiny_model_dir), [("a", adapter_dirs["a"])], port=0, max_tokens=8,
                     api_key="s3cret").start() as server:
        for method, path, body in [("GET", "/v1/models", None), ("GET", "/v1/models/a", None),
                                   ("POST", "/v1/completions", GOOD), ("POST", "/v1/adapters", {"name": "x"}),
                                   ("DELETE", "/v1/adapters/a", None), ("GET", "/v1/nothing", None)]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret0"}]:
                status, answer = call(server, method, path, body, headers=headers)
                assert status == 401, (method, path, headers, answer)
                assert answer["error"]["code"] == "invalid_api_key" and answer["error"]["param"] is None
        key = {"Authorization": "Bearer s3cret"}
        assert call(server, "POST", "/v1/completions", GOOD, headers=key)[0] == 200
        assert call(server, "GET", "/v1/models", headers=key)[0] == 200
        assert call(server, "GET", "/health") == (200, {"status": "ok"})
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        response.read()
        assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        connection.close()


def test_listening_beyond_loopback_needs_a_key_or_insecure_no_auth(tiny_model_dir):
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None, False)
    for host in ("0.0.0.0", "", "192.0.2.7"):
        with pytest.raises(ConfigError, match="--api-key.*--insecure-no-auth"):
            check_exposure(host, None, False)
        check_exposure(host, "key", False)
        check_exposure(host, None, True)
    with pytest.raises(ConfigError, match="--insecure-no-auth"):
        load_server(str(tiny_model_dir), host="0.0.0.0", port=0)
    with load_server(str(tiny_model_dir), host="0.0.0.0", port=0, insecure_no_auth=True).start() as server:
        assert call(server, "GET", "/v1/models")[0] == 200


def test_the_api_key_comes_from_the_environment_and_stays_out_of_help():
    parser = build_parser({"LORAKIT_API_KEY": "from-env"})
    assert parser.parse_args(["serve"]).api_key == "from-env"
    serve = next(a for a in parser._subparsers._group_actions[0].choices["serve"]._actions
                 if a.dest == "api_key")
    assert "from-env" not in serve.help
    args = parser.parse_args(["serve", "--api-key", "flag", "--adapter-dir", "runs", "--idle-timeout", "5",
                              "--max-connections", "9", "--drain-timeout", "2", "--insecure-no-auth"])
    assert (args.api_key, args.adapter_dir, args.idle_timeout, args.max_connections, args.drain_timeout,
            args.insecure_no_auth) == ("flag", "runs", 5.0, 9, 2.0, True)


# -- adapters by name, from --adapter-dir only
def test_adapters_over_http_are_off_without_adapter_dir(server, adapter_dirs):
    for method, path, body in [("POST", "/v1/adapters", {"name": "x", "path": str(adapter_dirs["a"])}),
                               ("DELETE", "/v1/adapters/a", None)]:
        status, answer = call(server, method, path, body)
        assert status == 403 and "--adapter-dir" in answer["error"]["message"]
        assert answer["error"]["code"] == "adapters_disabled"
    assert [m["id"] for m in call(server, "GET", "/v1/models")[1]["data"]][1:] == ["a", "b"]


def test_adapter_names_cannot_leave_the_adapter_dir(tiny_model_dir, adapter_dirs, tmp_path):
    shelf = tmp_path / "shelf"
    shutil.copytree(adapter_dirs["a"], shelf / "a")
    (shelf / "escape").symlink_to(adapter_dirs["b"])  # a symlink to an adapter outside the directory
    (shelf / "inside").symlink_to(shelf / "a")  # one that stays inside is fine
    outside = adapter_dirs["b"]
    with load_server(str(tiny_model_dir), port=0, max_tokens=8, adapter_dir=shelf).start() as server:
        for name in ["..", ".", "../b", "a/../a", "/" + str(outside).lstrip("/"), str(outside), "a\\..", "",
                     "x" * 300, "a\x00"]:
            status, answer = call(server, "POST", "/v1/adapters", {"name": "new", "adapter": name})
            assert status == 400 and answer["error"]["param"] == "adapter", (name, answer)
        missing = call(server, "POST", "/v1/adapters", {"name": "new", "adapter": "nothing-here"})
        escape = call(server, "POST", "/v1/adapters", {"name": "new", "adapter": "escape"})
        assert missing[0] == escape[0] == 404  # the same answer as for a name that does not exist
        assert escape[1]["error"]["message"] == missing[1]["error"]["message"].replace("nothing-here", "escape")
        assert call(server, "POST", "/v1/adapters", {"name": "inside"})[0] == 200
        assert call(server, "POST", "/v1/adapters", {"name": "a"})[0] == 200
        listing = json.dumps([call(server, "GET", path)[1] for path in ("/v1/models", "/v1/models/a")])
        assert str(tmp_path) not in listing and str(shelf) not in listing
        assert [m["id"] for m in call(server, "GET", "/v1/models")[1]["data"]][1:] == ["inside", "a"]
        assert str(tmp_path) not in json.dumps(call(server, "POST", "/v1/adapters", {"name": "a"})[1])  # 409


# -- connections
def _idle(port, count):
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        sockets.append(s)
    return sockets


def test_idle_connections_cannot_keep_clients_out_and_are_closed(tiny_model_dir, adapter_dirs):
    """At the limit the oldest idle connection is closed for a newcomer; an idle one is closed
    after --idle-timeout."""
    with load_server(str(tiny_model_dir), [("a", adapter_dirs["a"])], port=0, max_tokens=8, max_connections=4,
                     idle_timeout=600).start() as server:
        held = _idle(server.port, 10)
        try:
            assert call(server, "POST", "/v1/completions", GOOD)[0] == 200  # served despite 10 held open
            assert server.httpd.evicted == 7  # 6 for the held ones beyond 4, 1 for the request
            for s in held[:7]:  # the oldest, closed by the server
                assert s.recv(1) == b""
            server.httpd.idle_timeout = 0.5  # for connections from now on
            late = _idle(server.port, 1)[0]
            assert late.recv(1) == b""  # closed after half a second of silence (else the 60 s guard raises)
            late.close()
            assert call(server, "GET", "/v1/models")[0] == 200
        finally:
            for s in held:
                s.close()


def test_a_connection_beyond_the_limit_of_busy_ones_gets_503(tiny_model_dir, adapter_dirs):
    with load_server(str(tiny_model_dir), [("a", adapter_dirs["a"])], port=0, max_tokens=8,
                     max_connections=2).start() as server:
        scheduler, before, results = server.scheduler, server.scheduler.submitted, []
        scheduler.pause()
        threads = [threading.Thread(target=lambda: results.append(call(server, "POST", "/v1/completions", GOOD)))
                   for _ in range(2)]
        try:
            for t in threads:
                t.start()
            assert scheduler.wait_submitted(before + 2, timeout=60)  # two busy connections
            status, answer = call(server, "GET", "/v1/models")
            assert status == 503 and answer["error"]["code"] == "too_many_connections"
        finally:
            scheduler.resume()
        for t in threads:
            t.join(timeout=120)
        assert [r[0] for r in results] == [200, 200]
        assert call(server, "GET", "/v1/models")[0] == 200


# -- draining
def _held_generation(monkeypatch, release):
    """The engine holds the longest row at its 3rd token until ``release`` is set."""
    real = scheduler_module.generate_batch

    def held(model, tokenizer, requests, *, on_token=None, autocast=None):
        long_row = max(range(len(requests)), key=lambda i: requests[i].sampling.max_new_tokens)
        count = [0]

        def hold(i, token_id):
            count[0] += i == long_row
            if i == long_row and count[0] == 3:
                release.wait(60)
            return on_token(i, token_id)
        return real(model, tokenizer, requests, on_token=hold, autocast=autocast)

    monkeypatch.setattr(scheduler_module, "generate_batch", held)
    monkeypatch.setattr(scheduler_module.Scheduler, "continuous", False)  # one generate_batch call a batch


def test_drain_finishes_what_is_in_flight_and_refuses_new_connections(tiny_model_dir, adapter_dirs, reference,
                                                                      monkeypatch):  # noqa: F811
    release = threading.Event()
    _held_generation(monkeypatch, release)
    server = load_server(str(tiny_model_dir), [("a", adapter_dirs["a"])], port=0, max_tokens=12,
                         max_batch=1).start()
    results, bodies = {}, {"running": {**GOOD, "max_tokens": 12}, "queued": {**GOOD, "max_tokens": 4}}
    scheduler = server.scheduler
    threads = {k: threading.Thread(target=lambda k=k: results.__setitem__(k, call(server, "POST", "/v1/completions",
                                                                                  bodies[k]))) for k in bodies}
    threads["running"].start()
    assert scheduler.wait_submitted(1, timeout=60)
    threads["queued"].start()  # max_batch=1: it waits for the next batch
    assert scheduler.wait_submitted(2, timeout=60)
    drained = []
    drainer = threading.Thread(target=lambda: drained.append(server.drain(60)))
    drainer.start()
    with pytest.raises(OSError):  # no longer accepting (the listening socket is closed)
        for _ in range(600):  # up to 30 s for the drain to close the listening socket
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
            threading.Event().wait(0.05)
    release.set()
    drainer.join(timeout=120)
    for t in threads.values():
        t.join(timeout=60)
    assert drained == [True] and not scheduler._thread.is_alive()
    ids = reference.tokenizer(GOOD["prompt"])["input_ids"]
    for key in bodies:
        assert results[key][0] == 200, results[key]
        assert results[key][1]["choices"][0]["text"] == expected(reference, "a", ids, bodies[key]["max_tokens"])[1]


def test_drain_past_its_timeout_cancels_cleanly(tiny_model_dir, adapter_dirs, monkeypatch):
    release = threading.Event()
    _held_generation(monkeypatch, release)
    server = load_server(str(tiny_model_dir), [("a", adapter_dirs["a"])], port=0, max_tokens=12,
                         max_batch=1).start()
    results = []
    thread = threading.Thread(target=lambda: results.append(call(server, "POST", "/v1/completions",
                                                                 {**GOOD, "max_tokens": 12})))
    thread.start()
    assert server.scheduler.wait_submitted(1, timeout=60)
    drained = []
    drainer = threading.Thread(target=lambda: drained.append(server.drain(0.0)))
    drainer.start()
    while not server.scheduler._cancel:  # the drain gave up waiting and cancels
        threading.Event().wait(0.01)
    release.set()
    drainer.join(timeout=120)
    thread.join(timeout=60)
    assert drained == [True] and not server.scheduler._thread.is_alive()
    status, answer = results[0]
    assert status == 503 and answer["error"]["code"] == "shutting_down"
