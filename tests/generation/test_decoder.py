"""The fast decoder (`lorakit.generation.decoder`) against the model's own forward, in fp32.

Tiny Llama (grouped-query attention) and Qwen2 (q, k, v biases) models with two random, non-zero
adapters on every projection and the LM head: every logit the decoder gives (a chunked prefill,
one step, rows with different adapters in one step, a prompt taken partly from the prefix cache,
a row moved to another slot, a cache that grew) equals the model's logits on the same tokens.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.generation.batcher import Batcher
from lorakit.generation.decoder import Decoder, unsupported
from lorakit.generation.engine import Request, Sampling, generate_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
VOCAB = 96


def tiny(kind: str):
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, rope_theta=10000.0)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**shape, rope_theta=10000.0, use_sliding_window=False)).eval()


def adapted(kind: str):
    """The model with adapters "a" (r 4) and "b" (r 2, other targets), random A and B."""
    model = get_peft_model(tiny(kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                  init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return adapted(request.param)


def reference(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """The model's logits after ``ids`` with ``adapter`` alone (None: the base model), (V,)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return model(input_ids=x).logits[0, -1]
        previous = model.active_adapters
        model.set_adapter(adapter)
        try:
            return model(input_ids=x).logits[0, -1]
        finally:
            model.set_adapter(previous)


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("adapter", [None, "a", "b"])
@pytest.mark.parametrize("chunk", [256, 3])
def test_a_chunked_prefill_and_its_steps_equal_the_model(model, adapter, chunk):
    decoder = Decoder(model, slots=2, capacity=16, dtype=torch.float32, chunk=chunk)
    prompt = ids(11, 1)
    close(decoder.prefill(0, prompt, adapter), reference(model, prompt, adapter))
    for token in (5, 17, 40):
        prompt = prompt + [token]
        close(decoder.step([token], [adapter])[0], reference(model, prompt, adapter))
    assert decoder.capacity >= 14 and decoder.lengths[0] == 14


def test_an_adapter_run_unmerged_equals_it_merged(model):
    merged, unmerged = (Decoder(model, slots=1, dtype=torch.float32, merge=m) for m in (True, False))
    prompt = ids(8, 16)
    close(unmerged.prefill(0, prompt, "a"), merged.prefill(0, prompt, "a"))
    close(unmerged.step([7], ["a"]), merged.step([7], ["a"]))
    assert list(merged._packed) == ["a"] and list(unmerged._packed) == [None]  # merged copy vs base weights


def test_rows_with_different_adapters_in_one_step_equal_each_alone(model):
    decoder = Decoder(model, slots=3, dtype=torch.float32)
    adapters, prompts = ["a", None, "b"], [ids(7, 2), ids(3, 3), ids(12, 4)]
    for slot, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        close(decoder.prefill(slot, prompt, adapter, weights_for=adapters), reference(model, prompt, adapter))
    for token in (9, 33):
        logits = decoder.step([token] * 3, adapters)
        prompts = [p + [token] for p in prompts]
        for row, (prompt, adapter) in enumerate(zip(prompts, adapters)):
            close(logits[row], reference(model, prompt, adapter))


def test_a_cached_prefix_gives_the_same_logits(model):
    decoder = Decoder(model, slots=2, dtype=torch.float32)
    system = ids(9, 5)
    decoder.prefill(0, system + ids(4, 6), "a")
    assert decoder.prefix_hits == 0
    second = system + ids(5, 7)
    close(decoder.prefill(1, second, "a"), reference(model, second, "a"))
    assert decoder.prefix_hits == 9  # the shared system prompt was copied, not computed
    close(decoder.step([8, 8], ["a", "a"])[1], reference(model, second + [8], "a"))
    decoder.prefill(1, system + ids(2, 8), "b")  # another adapter's keys differ: nothing is taken
    assert decoder.prefix_hits == 9
    again = list(second)
    close(decoder.prefill(0, again, "a"), reference(model, again, "a"))  # all but the last token cached
    assert decoder.prefix_hits == 9 + len(again) - 1


@pytest.mark.parametrize("adapters", [["a", "a", "a"], ["a", None, "b"]], ids=["merged", "mixed"])
@pytest.mark.parametrize("prefill_tokens", [2048, 3], ids=["one-forward", "a-row-a-forward"])
def test_prompts_prefilled_together_equal_each_alone(model, adapters, prefill_tokens):
    """Three prompts of 10, 2 and 6 tokens in chunks of 3: padded chunks, rows that finish early (the
    second round runs slots 0 and 2 only), and with a budget of 3 positions a forward, one row a forward."""
    decoder = Decoder(model, slots=4, dtype=torch.float32, chunk=3, prefill_tokens=prefill_tokens)
    decoder.prefill(3, ids(12, 20), "b")  # a slot not in the call keeps its content
    prompts = [ids(10, 21), ids(2, 22), ids(6, 23)]
    logits = decoder.prefill_many([0, 1, 2], prompts, adapters)
    for got, prompt, adapter in zip(logits, prompts, adapters):
        close(got, reference(model, prompt, adapter))
    assert decoder.lengths[:3] == [10, 2, 6]
    for token in (9, 33):  # the padding's keys were never written where a step reads
        step = decoder.step([token] * 3, adapters)
        prompts = [p + [token] for p in prompts]
        for row, (prompt, adapter) in enumerate(zip(prompts, adapters)):
            close(step[row], reference(model, prompt, adapter))
    close(decoder.prefill(3, [7], "b"), reference(model, [7], "b"))


def test_padding_near_the_end_of_the_cache_writes_nothing_a_row_reads(model):
    """A prompt all but its last token in the prefix cache (start 9 of a 10-position cache, one
    token) padded beside a new 3-token prompt: its two padding positions lie past the cache."""
    decoder = Decoder(model, slots=3, capacity=10, dtype=torch.float32, chunk=3)
    long = ids(10, 28)
    decoder.prefill(0, long, "a")
    short = ids(3, 29)
    logits = decoder.prefill_many([1, 2], [long, short], ["a", "a"])
    assert decoder.prefix_hits == 9 and decoder.capacity == 10
    close(logits[0], reference(model, long, "a"))
    close(logits[1], reference(model, short, "a"))
    decoder.move(2, 0)
    decoder.move(1, 2)  # slot 2 now holds the padded row, slot 0 the short one
    step = decoder.step([5, 5, 5], ["a", "a", "a"])
    close(step[2], reference(model, long + [5], "a"))
    close(step[0], reference(model, short + [5], "a"))


def test_a_prompt_sharing_a_start_with_another_in_the_same_call_copies_it(model):
    decoder = Decoder(model, slots=3, dtype=torch.float32)
    system = ids(20, 24)
    prompts = [system + ids(3, 25), ids(5, 26), system + ids(4, 27)]
    logits = decoder.prefill_many([0, 1, 2], prompts, ["a", "a", "a"])
    assert decoder.prefix_hits == 20  # the third waited for the first, then copied the system prompt
    for got, prompt in zip(logits, prompts):
        close(got, reference(model, prompt, "a"))
    off = Decoder(model, slots=3, dtype=torch.float32, prefix_cache_bytes=0)
    for got, prompt in zip(off.prefill_many([0, 1, 2], prompts, ["a", "a", "a"]), prompts):
        close(got, reference(model, prompt, "a"))  # no cache: all three at once
    assert off.prefix_hits == 0


def test_a_moved_row_goes_on_as_itself(model):
    decoder = Decoder(model, slots=3, dtype=torch.float32)
    prompt = ids(6, 9)
    decoder.prefill(2, prompt, "a")
    decoder.move(2, 0)
    close(decoder.step([4], ["a"])[0], reference(model, prompt + [4], "a"))


def test_the_cache_grows_to_the_model_limit_and_refuses_beyond_it(model):
    decoder = Decoder(model, slots=1, capacity=4, dtype=torch.float32)
    prompt = ids(20, 10)
    close(decoder.prefill(0, prompt, None), reference(model, prompt, None))
    assert decoder.capacity >= 20
    with pytest.raises(ConfigError, match="64 \\(max_position_embeddings\\)"):
        decoder.prefill(0, ids(65, 11), None)


def test_models_the_decoder_cannot_run_are_named_and_generate_batch_runs_them_as_before():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB)).eval()
    assert "gpt2" in unsupported(gpt2)
    dora = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in unsupported(dora)
    embedding = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["embed_tokens"]))
    assert "embed_tokens" in unsupported(embedding)
    saved = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert "modules_to_save" in unsupported(saved)
    with pytest.raises(ValueError, match="DoRA"):
        Decoder(dora)
    request = Request(ids(5, 12), None, Sampling(max_new_tokens=4))
    assert generate_batch(dora, None, [request]) == generate_batch(dora, None, [request], fast=False)


# -- continuous batching
def test_rows_that_join_a_running_batch_give_what_they_give_alone(model):
    """Row 0 runs two steps alone; rows 1 and 2 (other adapters, one sampled with a seed) join;
    row 1 leaves early (its max), row 0 is dropped by its caller: each row's tokens equal
    `generate_batch` on the model's own forward with that request alone."""
    requests = [Request(ids(5, 13), "a", Sampling(max_new_tokens=12)),
                Request(ids(9, 14), None, Sampling(max_new_tokens=3)),
                Request(ids(4, 15), "b", Sampling(max_new_tokens=8, temperature=0.8, top_k=20, seed=3))]
    alone = [generate_batch(model, None, [r], fast=False)[0] for r in requests]
    batcher = Batcher(model, None, Decoder(model, slots=3, dtype=torch.float32))
    got = {0: [], 1: [], 2: []}
    batcher.add(0, requests[0])
    steps, dropped = 0, False
    while len(batcher):
        for key, token, ended in batcher.step():
            got[key].append(token)
            assert ended == (len(got[key]) == requests[key].sampling.max_new_tokens or token == 2)
        steps += 1
        if steps == 2:
            batcher.add(1, requests[1])
            batcher.add(2, requests[2])
            assert batcher.free == 0
            with pytest.raises(ValueError, match="full"):
                batcher.add(3, requests[0])
        if len(got[0]) == 9 and not dropped:
            assert batcher.drop(0) and not batcher.drop(0)
            dropped = True
    assert got[1] == alone[1] and got[2] == alone[2]
    assert dropped and got[0] == alone[0][:9]


def test_generate_batch_steps_at_most_its_row_limit_and_the_rest_join_as_rows_end(model, monkeypatch):
    """With room for 2 rows, 5 requests of different lengths: each one's tokens are its tokens alone,
    and the callback sees them in order."""
    from lorakit.generation import engine

    monkeypatch.setattr(engine, "_MAX_ROWS", 2)
    requests = [Request(ids(4 + i, 20 + i), ["a", None, "b"][i % 3], Sampling(max_new_tokens=2 + 2 * i))
                for i in range(5)]
    seen = {i: [] for i in range(5)}
    out = generate_batch(model, None, requests, on_token=lambda i, t: seen[i].append(t))
    assert out == [generate_batch(model, None, [r], fast=False)[0] for r in requests]
    assert [seen[i] for i in range(5)] == out


@pytest.fixture
def no_onednn_packing(monkeypatch):
    """A CPU whose oneDNN cannot pack a weight (the probe in `weights._onednn` sees it fail)."""
    from lorakit.generation import weights

    def cannot(*args, **kwargs):
        raise RuntimeError("could not create a primitive")

    weights._onednn.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", cannot)
    yield
    monkeypatch.undo()
    weights._onednn.cache_clear()


def test_where_onednn_cannot_pack_the_products_are_plain_and_the_logits_the_same(model, no_onednn_packing):
    from lorakit.generation.weights import Matrix

    weight, x = torch.randn(6, 4), torch.randn(2, 4)
    matrix = Matrix(weight)
    assert matrix.packed is None and matrix.weight is weight
    torch.testing.assert_close(matrix(x), x @ weight.T)
    decoder = Decoder(model, slots=1, dtype=torch.float32)
    prompt = ids(9, 30)
    close(decoder.prefill(0, prompt, "a"), reference(model, prompt, "a"))
    assert decoder._packed["a"].head.packed is None
