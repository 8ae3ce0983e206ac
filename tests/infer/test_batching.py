"""Mixed-adapter batches (`lorakit.batching`, ``adapter_names``): every row of a batch equals that
row run with its adapter alone, in forward, in generate with a KV cache and in a decode loop of
one's own; the same as PEFT's ``adapter_names`` on the same adapter files; the refusals."""

import copy
import pickle

import peft
import pytest
import torch

import lorakit
from lorakit import ConfigError, LoraConfig, get_peft_model
from lorakit.inject import lora_layers
from lorakit import batching
from lorakit.batching import BASE, mixed_batch
from lorakit.kernels import batching as kernel

from core.tiny import SEVEN, input_ids, tiny_llama

# adapter name -> its config: different ranks, rsLoRA, targets that only partly overlap
# (a layer without the row's adapter adds nothing), the embedding and the output head
ADAPTERS = {
    "a": dict(r=2, lora_alpha=4, target_modules=SEVEN),
    "b": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "c": dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj", "lm_head"]),
}
ROWS = ["a", BASE, "b", "c", "a"]  # three adapters of ranks 2, 4, 8 and a base row, one repeated
PATHS = {"dense": 10**6, "gather": 0}  # kernel.DENSE_MAX that forces each way of applying the stack


def build(names=("a", "b", "c"), dora_adapter=False, seed=0):
    """A tiny Llama with the adapters of ``names`` (random, non-zero updates), in eval mode."""
    torch.manual_seed(seed)
    model = None
    for name in names:
        config = LoraConfig(**ADAPTERS[name], init_lora_weights=False)
        if model is None:
            model = get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    if dora_adapter:  # DoRA with a magnitude that is not the norm (c != 1)
        model.add_adapter("d", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "o_proj"],
                                          use_dora=True, init_lora_weights=False))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _, layer in lora_layers(model.get_base_model()):
                if "d" in layer.adapters:
                    m = layer.adapters["d"].lora_magnitude_vector
                    m.mul_(0.5 + torch.rand(m.shape, generator=g))
    return model.eval()


def alone(model, name, fn):
    """``fn()`` with only ``name`` active ("__base__": adapters disabled)."""
    if name == BASE:
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def per_row(model, rows, fn):
    """The reference: the whole batch run once per adapter alone, row b taken from its adapter's run."""
    runs = {name: alone(model, name, fn) for name in set(rows)}
    return torch.stack([runs[name][b] for b, name in enumerate(rows)])


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(input_ids=ids, **kwargs).logits  # (B, T, vocab)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [ROWS, ["b", "b", "b"], [BASE, "c"], ["c", "a", "b"]], ids=str)
def test_forward_equals_each_adapter_alone(monkeypatch, path, rows):
    monkeypatch.setattr(kernel, "DENSE_MAX", PATHS[path])
    model = build()
    ids = input_ids(batch=len(rows))
    mixed = logits(model, ids, adapter_names=rows)
    close(mixed, per_row(model, rows, lambda: logits(model, ids)))
    b = next(i for i, name in enumerate(rows) if name != BASE)
    assert not torch.equal(mixed[b], logits(model, ids, adapter_names=[BASE] * len(rows))[b])  # adapters act


@pytest.mark.parametrize("path", PATHS)
def test_dora_rows_equal_dora_alone(monkeypatch, path):
    monkeypatch.setattr(kernel, "DENSE_MAX", PATHS[path])
    model = build(dora_adapter=True)
    rows = ["d", "a", BASE, "d", "b"]
    ids = input_ids(batch=len(rows))
    close(logits(model, ids, adapter_names=rows), per_row(model, rows, lambda: logits(model, ids)))


def test_all_base_rows_are_the_base_model():
    model = build()
    ids = input_ids(batch=3)
    with model.disable_adapter():
        expected = logits(model, ids)
    torch.testing.assert_close(logits(model, ids, adapter_names=[BASE] * 3), expected, rtol=0, atol=0)


def left_padded(batch=5, length=6):
    ids = input_ids(batch=batch, length=length, seed=3)
    mask = torch.ones_like(ids)
    for b in range(1, batch, 2):  # every other prompt two tokens shorter, padded on the left
        ids[b, :2], mask[b, :2] = 0, 0
    return ids, mask


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_kv_cache_equals_each_adapter_alone(num_beams):
    model = build(dora_adapter=True)
    model.generation_config.pad_token_id = 0
    rows = ["a", "d", BASE, "c", "b"]
    ids, mask = left_padded(len(rows))

    def generate(**kwargs):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                  do_sample=False, num_beams=num_beams, output_logits=True,
                                  return_dict_in_generate=True, **kwargs)

    mixed = generate(adapter_names=rows)
    assert torch.equal(mixed.sequences, per_row(model, rows, lambda: generate().sequences))
    if num_beams == 1:  # with beams, each prompt's beams run its adapter (the names repeated per beam)
        steps = per_row(model, rows, lambda: torch.stack(generate().logits, 1))  # (B, steps, vocab)
        close(torch.stack(mixed.logits, 1), steps)
    assert len({tuple(s) for s in mixed.sequences.tolist()}) > 1


def test_own_decode_loop_inside_mixed_batch(monkeypatch):
    """The engine's use: a KV-cached greedy loop of one's own inside ``mixed_batch`` (prefill takes
    the gather path, each one-token step the dense one)."""
    model = build()
    rows = ["c", BASE, "a", "b"]
    ids = input_ids(batch=len(rows), length=20, seed=4)

    @torch.no_grad()
    def loop():
        out = model(input_ids=ids, use_cache=True)
        steps = [out.logits[:, -1]]
        for _ in range(4):
            token = steps[-1].argmax(-1, keepdim=True)  # (B, 1)
            out = model(input_ids=token, cache=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
        return torch.stack(steps, 1)  # (B, steps, vocab)

    monkeypatch.setattr(kernel, "DENSE_MAX", 8)  # 20-token prompts gather, one-token steps are dense
    with mixed_batch(model, rows):
        mixed = loop()
    close(mixed, per_row(model, rows, loop))
    assert all(layer.row_adapters is None for _, layer in lora_layers(model.get_base_model()))
    with mixed_batch(model.get_base_model(), rows):  # the model inside the PeftModel works the same
        torch.testing.assert_close(loop(), mixed, rtol=0, atol=0)


def test_same_as_peft_adapter_names(tmp_path):
    """The same adapter files loaded in PEFT and in lorakit: ``adapter_names`` gives the same
    logits in forward and the same greedy tokens and step logits in generate."""
    build().save_pretrained(tmp_path, save_embedding_layers=False)  # a, b, c each in its own folder
    ids = input_ids(batch=len(ROWS))
    outputs, generated = [], []
    for lib in (peft, lorakit):
        model = lib.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
        for name in ("b", "c"):
            model.load_adapter(str(tmp_path / name), adapter_name=name)
        outputs.append(logits(model.eval(), ids, adapter_names=ROWS))
        with torch.no_grad():
            generated.append(model.generate(input_ids=ids, adapter_names=ROWS, max_new_tokens=5, min_new_tokens=5,
                                            do_sample=False, pad_token_id=0, output_logits=True,
                                            return_dict_in_generate=True))
    close(outputs[1], outputs[0])
    assert torch.equal(generated[1].sequences, generated[0].sequences)
    close(torch.stack(generated[1].logits, 1), torch.stack(generated[0].logits, 1))


def test_stack_is_reused_and_follows_weight_changes():
    model = build()
    ids = input_ids(batch=len(ROWS))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    logits(model, ids, adapter_names=ROWS)
    stack = layer.adapter_stack  # kept by the layer itself
    logits(model, ids, adapter_names=ROWS)
    assert layer.adapter_stack is stack  # built once, reused
    with torch.no_grad():
        layer.adapters["b"].lora_B.mul_(3)  # an in-place change (what loading does) is seen
    close(logits(model, ids, adapter_names=ROWS), per_row(model, ROWS, lambda: logits(model, ids)))
    assert layer.adapter_stack is not stack
    model.add_adapter("e", LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    rows = ["e", "b", BASE]
    ids = input_ids(batch=3)
    close(logits(model.eval(), ids, adapter_names=rows), per_row(model, rows, lambda: logits(model, ids)))
    model.delete_adapter("e")
    with pytest.raises(ConfigError, match="'e'"):
        logits(model, ids, adapter_names=rows)


def test_a_copy_of_the_model_builds_its_own_stacks():
    """The stack is a cache on the layer: a deep copy shares it until it builds its own from its
    own adapters, a pickle carries none."""
    model = build()
    ids = input_ids(batch=len(ROWS))
    want = logits(model, ids, adapter_names=ROWS)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.adapter_stack is not None
    clone = copy.deepcopy(model)
    clone_layer = clone.get_base_model().model.layers[0].self_attn.q_proj
    assert clone_layer.adapter_stack is layer.adapter_stack and not layer.adapter_stack.fresh(clone_layer)
    assert pickle.loads(pickle.dumps(layer)).adapter_stack is None
    close(logits(clone, ids, adapter_names=ROWS), want)
    assert clone_layer.adapter_stack is not None and clone_layer.adapter_stack is not layer.adapter_stack
    batching.invalidate(model)
    assert all(m.adapter_stack is None for _, m in lora_layers(model))


def test_bf16_autocast_rows_follow_each_adapter_alone():
    model = build()
    ids = input_ids(batch=len(ROWS))

    def run(**kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return logits(model, ids, **kwargs).float()

    torch.testing.assert_close(run(adapter_names=ROWS), per_row(model, ROWS, run), rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- refusals

def test_unknown_names_are_listed_with_the_loaded_ones():
    model = build()
    with pytest.raises(ConfigError, match=r"unknown adapter names \['zz'\]; loaded adapters: \['a', 'b', 'c'\]"):
        logits(model, input_ids(batch=3), adapter_names=["a", "zz", BASE])


def test_wrong_number_of_names():
    model = build()
    with pytest.raises(ConfigError, match="2 names but the batch has 3 rows"):
        logits(model, input_ids(batch=3), adapter_names=["a", "b"])
    with pytest.raises(ConfigError, match="one adapter name per row"):  # found by the layer in a loop
        with mixed_batch(model, ["a", "b"]), torch.no_grad():
            model(input_ids=input_ids(batch=3))
    with pytest.raises(ConfigError, match="one adapter name per prompt"):
        model.generate(input_ids=input_ids(batch=3), max_new_tokens=1, adapter_names=["a"])
    with pytest.raises(ConfigError, match="list with one adapter name per row"):
        logits(model, input_ids(batch=1), adapter_names="a")


def test_training_mode_is_refused():
    model = build().train()
    with pytest.raises(ConfigError, match="eval mode"):
        model(input_ids=input_ids(batch=2), adapter_names=["a", "b"])


def test_merged_adapters_are_refused():
    model = build()
    model.merge_adapter(["a"])
    with pytest.raises(ConfigError, match=r"\['a'\] are merged.*unmerge_adapter"):
        logits(model, input_ids(batch=2), adapter_names=["a", "b"])
    model.unmerge_adapter()
    logits(model, input_ids(batch=2), adapter_names=["a", "b"])


def test_adalora_and_modules_to_save_are_refused():
    from lorakit.methods.adalora import AdaLoraConfig

    ada = get_peft_model(tiny_llama(), AdaLoraConfig(total_step=5, target_modules=["q_proj"])).eval()
    with pytest.raises(ConfigError, match="AdaLoRA"):
        logits(ada, input_ids(batch=1), adapter_names=["default"])
    model = build()
    model.add_adapter("m", LoraConfig(target_modules=["q_proj"], modules_to_save=["norm"]))
    with pytest.raises(ConfigError, match=r"\['m'\] train whole modules"):
        logits(model.eval(), input_ids(batch=2), adapter_names=["m", "a"])
    rows = ["a", BASE]  # other adapters still mix: the saved module's original is used for them
    ids = input_ids(batch=2)
    close(logits(model, ids, adapter_names=rows), per_row(model, rows, lambda: logits(model, ids)))


@pytest.mark.parametrize("path", PATHS)
def test_rows_using_scattered_adapters(monkeypatch, path):
    """Rows on the first and last of five adapters: the dense path takes copies of those two
    instead of a view of the whole run of slots."""
    monkeypatch.setattr(kernel, "DENSE_MAX", PATHS[path])
    model = build()
    for k in range(3):
        model.add_adapter(f"q{k}", LoraConfig(r=2 + k, target_modules=["q_proj"], init_lora_weights=False))
    rows = ["q2", "a", BASE, "q2"]
    ids = input_ids(batch=len(rows))
    close(logits(model.eval(), ids, adapter_names=rows), per_row(model, rows, lambda: logits(model, ids)))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.adapters.keys() == {"a", "b", "q0", "q1", "q2"} and not q_proj.row_adapters
    assert [rows.cols for rows in q_proj.adapter_stack._rows.values()] == [[1, 5]]


def test_bf16_base_with_fp32_adapters():
    """A bf16 model whose adapters stayed fp32 (autocast_adapter_dtype): the update is computed in
    fp32, as each adapter alone computes it."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=SEVEN,
                                                                     init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    model.eval()
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.adapters["a"].lora_A.dtype == torch.float32
    rows = ["b", "a", BASE]
    ids = input_ids(batch=3)
    mixed = logits(model, ids, adapter_names=rows)  # (B, T, vocab) bf16: equal up to one rounding
    torch.testing.assert_close(mixed, per_row(model, rows, lambda: logits(model, ids)))


def test_sampled_sequences_repeat_each_rows_adapter():
    """num_return_sequences: transformers repeats each prompt, and its adapter name goes with it."""
    model = build()
    rows = ["a", BASE, "c"]
    ids = input_ids(batch=3)
    with torch.no_grad():
        out = model.generate(input_ids=ids, adapter_names=rows, do_sample=True, num_return_sequences=2,
                             max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    assert out.shape == (6, ids.shape[1] + 3) and torch.equal(out[::2, :ids.shape[1]], ids)
    assert batching.names_for_generate(model.get_base_model(), rows, (), {"input_ids": ids, "num_beams": 3}) == \
        ["a"] * 3 + [BASE] * 3 + ["c"] * 3
