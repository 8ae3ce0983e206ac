"""The generation engine against transformers' own generate, one request at a time.

Every row of a batch must produce what that request produces alone: greedy rows equal
``model.generate(do_sample=False)`` with the request's adapter alone (or the base model), seeded
rows equal ``torch.manual_seed(seed); model.generate(do_sample=True, ...)`` alone, whatever the
batch neighbours are (other lengths, adapters, settings).
"""

import contextlib

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lorakit import PeftModel
from lorakit.errors import ConfigError
from lorakit.generation.engine import Request, Sampling, eos_token_ids, finish_reason, generate_batch, warp_logits
from lorakit.models import load_model

from .conftest import make_adapter


def prompt(length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 49152, (length,), generator=g).tolist()  # no special tokens


PROMPTS = [prompt(3, 1), prompt(11, 2), prompt(6, 3), prompt(1, 4)]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_adapter, tmp_path_factory):
    """(PeftModel with adapters "a" and "b", the plain base model, the tokenizer)."""
    other = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter-b"), seed=1,
                         targets=("k_proj", "o_proj", "up_proj"))
    base, tokenizer = load_model(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tiny_adapter, adapter_name="a")
    model.load_adapter(other, "b")
    plain, _ = load_model(tiny_model_dir)
    return model, plain, tokenizer


def alone(model, ids, adapter=None, **kwargs):
    """transformers' generate on one unpadded prompt with one adapter (None: the base model)."""
    kwargs = {"do_sample": False, "max_new_tokens": 6, **kwargs}
    x = torch.tensor([ids])
    if isinstance(model, PeftModel) and adapter is not None:
        previous = model.active_adapters
        model.set_adapter(adapter)
        block = contextlib.nullcontext()
    else:
        previous, block = None, (model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext())
    try:
        with block:
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), pad_token_id=2, **kwargs)
    finally:
        if previous:
            model.set_adapter(previous)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("adapter", [None, "a", "b"])
def test_greedy_batch_equals_generate_alone(models, adapter):
    model, _, tokenizer = models
    out = generate_batch(model, tokenizer, [Request(p, adapter, Sampling(max_new_tokens=6)) for p in PROMPTS])
    assert out == [alone(model, p, adapter) for p in PROMPTS]
    assert out[0] != alone(model, PROMPTS[0], "b" if adapter != "b" else "a")  # the adapter matters here


def test_plain_model_equals_generate(models):
    _, plain, tokenizer = models
    out = generate_batch(plain, tokenizer, [Request(p, sampling=Sampling(max_new_tokens=5)) for p in PROMPTS])
    assert out == [alone(plain, p, max_new_tokens=5) for p in PROMPTS]


def test_mixed_adapters_equal_each_adapter_alone(models):
    model, _, tokenizer = models
    adapters = ["a", None, "b", "a"]
    out = generate_batch(model, tokenizer,
                         [Request(p, a, Sampling(max_new_tokens=6)) for p, a in zip(PROMPTS, adapters)])
    assert out == [alone(model, p, a) for p, a in zip(PROMPTS, adapters)]
    assert model.active_adapters == ["a"]


def test_seeded_sampling_equals_transformers_sampling(models):
    model, _, tokenizer = models
    settings = dict(temperature=0.7, top_k=40, top_p=0.9)
    out = generate_batch(model, tokenizer, [Request(PROMPTS[1], "b", Sampling(seed=7, max_new_tokens=6, **settings))])
    torch.manual_seed(7)
    assert out[0] == alone(model, PROMPTS[1], "b", do_sample=True, **settings)


def test_a_seeded_row_does_not_depend_on_its_neighbours(models):
    model, _, tokenizer = models
    mine = Request(PROMPTS[2], "a", Sampling(temperature=1.0, top_p=0.95, seed=3, max_new_tokens=8))
    alone_out = generate_batch(model, tokenizer, [mine])[0]
    neighbours = [Request(PROMPTS[1], None, Sampling(temperature=1.3, seed=3, max_new_tokens=3)),
                  Request(PROMPTS[3], "a", Sampling(max_new_tokens=8)),
                  Request(PROMPTS[0], "a", Sampling(temperature=0.5, top_k=5, max_new_tokens=8))]  # unseeded
    batch = generate_batch(model, tokenizer, [neighbours[0], mine, *neighbours[1:]])
    assert batch[1] == alone_out
    again = generate_batch(model, tokenizer, [mine, neighbours[2]])
    assert again[0] == alone_out
    other_seed = Request(PROMPTS[2], "a", Sampling(temperature=1.0, top_p=0.95, seed=4, max_new_tokens=8))
    assert generate_batch(model, tokenizer, [other_seed])[0] != alone_out


def test_top_k_1_is_greedy(models):
    model, _, tokenizer = models
    greedy = generate_batch(model, tokenizer, [Request(p, "a", Sampling(max_new_tokens=5)) for p in PROMPTS])
    sampled = generate_batch(model, tokenizer, [Request(p, "a", Sampling(temperature=1.5, top_k=1, max_new_tokens=5))
                                                for p in PROMPTS])
    assert sampled == greedy


def test_on_token_streams_every_token_in_order(models):
    model, _, tokenizer = models
    adapters, lengths = ["a", None, "b", "a"], [2, 5, 4, 1]
    requests = [Request(p, a, Sampling(max_new_tokens=n)) for p, a, n in zip(PROMPTS, adapters, lengths)]
    seen = []
    out = generate_batch(model, tokenizer, requests, on_token=lambda i, t: seen.append((i, t)))
    # rows leave the batch as they finish (the adapters of those left change): each is still itself alone
    assert out == [alone(model, p, a, max_new_tokens=n) for p, a, n in zip(PROMPTS, adapters, lengths)]
    # step by step: every unfinished row's token of step s comes before any token of step s + 1
    expected = [(i, out[i][s]) for s in range(5) for i in range(4) if s < len(out[i])]
    assert seen == expected

    # returning False from on_token ends that request there; the others run on, unchanged
    counts = [0] * 4

    def stop_row_1_after_two(i, token):
        counts[i] += 1
        return not (i == 1 and counts[i] == 2)

    cut = generate_batch(model, tokenizer, requests, on_token=stop_row_1_after_two)
    assert cut[1] == out[1][:2] and [cut[0], cut[2], cut[3]] == [out[0], out[2], out[3]]


def test_rows_stop_at_their_own_stop_token_or_eos(models):
    model, _, tokenizer = models
    full = alone(model, PROMPTS[1], "a", max_new_tokens=8)
    k = next((k for k in range(1, 8) if full[k] not in full[:k]), 0)  # a token that first appears at step k
    stop = Request(PROMPTS[1], "a", Sampling(max_new_tokens=8, stop_token_ids=(full[k],)))
    free = Request(PROMPTS[2], "a", Sampling(max_new_tokens=8))
    out = generate_batch(model, tokenizer, [stop, free])
    assert out[0] == full[:k + 1]  # the stop token ends the row and is kept, as generate keeps EOS
    assert out[1] == alone(model, PROMPTS[2], "a", max_new_tokens=8)  # its neighbour runs on
    eos = eos_token_ids(model, tokenizer)
    assert finish_reason(out[0], stop, eos) == "stop" and finish_reason(out[1], free, eos) == "length"

    # the model's own EOS, exactly as transformers' generate stops at it
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [2, full[k]]
    try:
        out = generate_batch(model, tokenizer, [Request(PROMPTS[1], "a", Sampling(max_new_tokens=8))])
        assert out[0] == alone(model, PROMPTS[1], "a", max_new_tokens=8) == full[:k + 1]
    finally:
        model.generation_config.eos_token_id = saved


def test_autocast_equals_generate_under_the_same_autocast(models):
    model, _, tokenizer = models
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    out = generate_batch(model, tokenizer, [Request(p, "a", Sampling(max_new_tokens=4)) for p in PROMPTS[:2]],
                         autocast=bf16)
    with bf16():
        expected = [alone(model, p, "a", max_new_tokens=4) for p in PROMPTS[:2]]
    assert out == expected


def test_model_state_is_restored(models):
    model, _, tokenizer = models
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    generate_batch(model, tokenizer, [Request(PROMPTS[0], "b", Sampling(max_new_tokens=2))])
    assert model.training and model.active_adapters == ["a"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    model.eval()


def test_warp_logits_equals_transformers_warpers():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[4, :10] = logits[4, 10]  # ties at the k-th value are kept
    rows = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.6), (1.0, 12, 0.97)]
    warped = warp_logits(logits, torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                         torch.tensor([r[2] for r in rows]))
    for i, (temperature, top_k, top_p) in enumerate(rows):
        expected = logits[i:i + 1]
        for warper, used in [(TemperatureLogitsWarper(temperature), temperature != 1.0),
                             (TopKLogitsWarper(top_k) if top_k else None, top_k != 0),
                             (TopPLogitsWarper(top_p), top_p < 1.0)]:
            if used:
                expected = warper(None, expected)
        assert torch.equal(torch.isinf(warped[i]), torch.isinf(expected[0])), i
        torch.testing.assert_close(warped[i][~torch.isinf(warped[i])], expected[0][~torch.isinf(expected[0])])
    assert torch.isinf(warped[1]).sum() == 45 and not torch.isinf(warped[0]).any()


def test_bad_requests_name_every_problem(models):
    model, plain, tokenizer = models
    with pytest.raises(ConfigError) as err:
        generate_batch(model, tokenizer, [Request([]), Request([5, 10 ** 6]), Request([5], "nope")])
    message = str(err.value)
    assert "request 0 has an empty prompt" in message and "not integers in the vocabulary" in message
    assert "'nope'" in message and "['a', 'b']" in message
    with pytest.raises(ConfigError, match="plain model"):
        generate_batch(plain, tokenizer, [Request([5], "a")])
    with pytest.raises(ConfigError) as err:
        Sampling(temperature=-1, top_p=0, top_k=-2, max_new_tokens=0, seed=1.5)
    for field in ("temperature", "top_p", "top_k", "max_new_tokens", "seed"):
        assert field in str(err.value)
    assert generate_batch(model, tokenizer, []) == []


def test_gpt2_learned_positions_and_conv1d_without_a_tokenizer():
    """GPT-2: learned position embeddings (left padding must not shift them) and Conv1D adapters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                      bos_token_id=99, eos_token_id=99)).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                            init_lora_weights=False)).eval()
    prompts = [[5, 17, 42], [8, 3, 77, 12, 61, 30, 9], [64]]
    out = generate_batch(model, None, [Request(p, "default", Sampling(max_new_tokens=5)) for p in prompts])
    assert out == [alone(model, p, "default", max_new_tokens=5) for p in prompts]
    assert out != generate_batch(model, None, [Request(p, None, Sampling(max_new_tokens=5)) for p in prompts])
