"""Packing: every example once, positions restarting per example, and the same logits, loss,
gradients and training run as padded batches on a tiny Llama."""

import os
import random
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.data import (IGNORE_INDEX, Collator, Example, PackingCollator, real_token_count, supports_packing,
                          supports_varlen)
from lorakit.data.packing import shared_prefix
from lorakit.evaluation import loss_sum
from lorakit.models.attention import register as register_lorakit_attention
from lorakit.train import TrainConfig, train
from lorakit.train.report import read_metrics

PAD = 0


def _examples(lengths, seed=0, vocab=100):
    """Random examples whose first third is prompt (IGNORE_INDEX) and the rest answer."""
    rng = random.Random(seed)
    out = []
    for k, n in enumerate(lengths):
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = max(1, n // 3)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"t:{k}"))
    return out


def _unpack(batch):
    """(ids, labels) of every example in a packed batch, row by row, found by its positions."""
    found = []
    for r in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for start, end in zip(starts, starts[1:]):
            if batch["token_mask"][r, start:end].all():
                found.append((batch["input_ids"][r, start:end].tolist(), batch["labels"][r, start:end].tolist()))
            else:
                assert not batch["token_mask"][r, start:end].any()  # a padding run is all padding
    return found


def test_a_small_batch_packs_first_fit_decreasing_exactly():
    a = Example([11, 12, 13], [IGNORE_INDEX, 12, 13], "a")
    b = Example([21, 22], [21, 22], "b")
    c = Example([31, 32, 33, 34], [31, 32, 33, 34], "c")
    out = PackingCollator(pad_token_id=PAD, pack_length=7)([a, b, c])
    assert set(out) == {"input_ids", "labels", "position_ids", "token_mask"}  # no attention_mask
    # c (4) opens row 0, a (3) fills it; b (2) opens row 1, whose tail is padding
    assert out["input_ids"].tolist() == [[31, 32, 33, 34, 11, 12, 13], [21, 22, PAD, PAD, PAD, PAD, PAD]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 32, 33, 34, IGNORE_INDEX, 12, 13],
                                      [IGNORE_INDEX, 22] + [IGNORE_INDEX] * 5]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert out["token_mask"].tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())


@pytest.mark.parametrize("pack_length", [1, 16, 40, 128])
def test_every_example_appears_once_in_order_within_the_row_bound(pack_length):
    examples = _examples([random.Random(n).randrange(2, 30) for n in range(23)])
    collate = PackingCollator(pad_token_id=PAD, pack_length=pack_length)
    out = collate(examples)
    bound = max(pack_length, max(len(e) for e in examples))
    assert out["token_mask"].sum(1).max() <= bound
    expected = [(e.input_ids, [IGNORE_INDEX] + e.labels[1:]) for e in examples]  # first token never a target
    assert sorted(_unpack(out)) == sorted(expected)
    assert (out["input_ids"][out["token_mask"] == 0] == PAD).all()
    assert (out["labels"][out["token_mask"] == 0] == IGNORE_INDEX).all()
    assert int(out["input_ids"].shape[1]) == int(out["token_mask"].sum(1).max())  # L is the longest row
    assert real_token_count(out) == sum(len(e) for e in examples) == real_token_count(Collator(PAD)(examples))
    for key, value in collate(examples).items():  # deterministic
        assert torch.equal(value, out[key]), key


def test_an_example_longer_than_pack_length_gets_a_row_of_its_own_and_width_rounds_up():
    examples = _examples([50, 10, 10, 10])
    out = PackingCollator(pad_token_id=PAD, pack_length=32, pad_to_multiple_of=8)(examples)
    assert out["input_ids"].shape == (2, 56)
    assert out["token_mask"].sum(1).tolist() == [50, 30]


def test_a_varlen_batch_is_one_row_of_every_example_in_order_with_boundaries_and_no_padding():
    examples = _examples([17, 9, 5, 12])
    batch = PackingCollator(pad_token_id=PAD, varlen=True, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == (1, 43)  # no padding, not even to a multiple
    assert batch["cu_seq_lens"].tolist() == [0, 17, 26, 31, 43] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["token_mask"].all() and real_token_count(batch) == 43
    assert _unpack(batch) == [(e.input_ids, [IGNORE_INDEX] + e.labels[1:]) for e in examples]


def _prompted(lengths, head=(5, 6, 7, 8, 9, 10), seed=0):
    """Examples that all start with ``head`` (a system prompt), then their own prompt and answer."""
    return [Example(list(head) + e.input_ids, [IGNORE_INDEX] * len(head) + e.labels, e.source)
            for e in _examples(lengths, seed=seed)]


def test_the_shared_prefix_stops_before_the_first_token_any_example_is_trained_on():
    pairs = [(e.input_ids, e.labels) for e in _prompted([9, 12, 6])]
    assert shared_prefix(pairs) == 6  # the head; the examples' own tokens differ from there
    assert shared_prefix(pairs[:1]) == 0
    pairs[1] = (pairs[1][0], [IGNORE_INDEX] * 3 + pairs[1][0][3:])  # trained from its 4th token on
    assert shared_prefix(pairs) == 2  # position 2 predicts token 3: the prefix ends before it
    # each example keeps a token of its own after the prefix
    assert shared_prefix([([1, 2, 3], [IGNORE_INDEX] * 3), ([1, 2], [IGNORE_INDEX] * 2)]) == 1


def test_a_varlen_batch_with_a_shared_prefix_lays_it_down_once_and_each_example_continues_it():
    examples = _prompted([9, 12, 6])
    pairs = [(e.input_ids, e.labels) for e in examples]
    prefix = shared_prefix(pairs)
    batch = PackingCollator(pad_token_id=PAD, varlen=True, share_prefix=True)(examples)
    total = sum(len(e.input_ids) for e in examples)
    assert int(batch["shared_prefix"]) == prefix and batch["input_ids"].shape == (1, total - 2 * prefix)
    assert real_token_count(batch) == total  # the examples' tokens, the prefix counted in each
    bounds = batch["cu_seq_lens"].tolist()
    assert bounds[:2] == [0, prefix] and bounds[-1] == batch["input_ids"].shape[1]
    ids, labels, pos = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    for e, start, end in zip(examples, bounds[1:], bounds[2:]):  # prefix + own segment = the example
        assert ids[:prefix] + ids[start:end] == e.input_ids
        assert pos[:prefix] + pos[start:end] == list(range(len(e.input_ids)))
        assert labels[start:end] == e.labels[prefix:] and labels[start] == IGNORE_INDEX
    assert labels[:prefix] == [IGNORE_INDEX] * prefix
    assert sum(label != IGNORE_INDEX for label in labels) == sum(e.num_loss_tokens for e in examples)


def _tiny_llama(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, pad_token_id=PAD)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).float()


@pytest.mark.parametrize("attn", ["sdpa", "eager", "lorakit"])
def test_logits_of_an_example_inside_a_packed_row_equal_the_example_alone(attn):
    register_lorakit_attention()
    model = _tiny_llama(attn).eval()
    examples = _examples([17, 9, 5, 12, 3, 20])
    batch = PackingCollator(pad_token_id=PAD, pack_length=40)(examples)
    assert batch["input_ids"].shape[0] < len(examples)  # rows do hold several examples
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits  # (R, L, V)
        checked = 0
        for r in range(packed.shape[0]):
            starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist() + [packed.shape[1]]
            for start, end in zip(starts, starts[1:]):
                if not batch["token_mask"][r, start:end].all():
                    continue
                alone = model(input_ids=batch["input_ids"][r:r + 1, start:end]).logits[0]  # (n, V)
                assert torch.allclose(packed[r, start:end], alone, atol=1e-5, rtol=0)
                checked += 1
    assert checked == len(examples)


def test_a_key_value_cache_would_join_packed_examples_so_the_loss_builds_none():
    """transformers builds the per-example mask only without a cache: `loss_sum` passes
    use_cache=False, and this pins why."""
    model = _tiny_llama().eval()
    batch = PackingCollator(pad_token_id=PAD, pack_length=64)(_examples([10, 8]))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        apart = model(**inputs, use_cache=False).logits
        joined = model(**inputs).logits  # config.use_cache: a DynamicCache is made, the per-example mask is not
    second = slice(10, 18)
    alone = model(input_ids=batch["input_ids"][:, second], use_cache=False).logits
    assert torch.allclose(apart[:, second], alone, atol=1e-5)
    assert not torch.allclose(joined[:, second], alone, atol=1e-3)


@pytest.mark.parametrize("attn, packed_collator", [
    ("sdpa", PackingCollator(pad_token_id=PAD, pack_length=48)),
    ("lorakit", PackingCollator(pad_token_id=PAD, pack_length=48)),
    ("lorakit", PackingCollator(pad_token_id=PAD, varlen=True)),  # one row, example by example
    ("lorakit", PackingCollator(pad_token_id=PAD, varlen=True, share_prefix=True)),  # the prompt's head once
])
def test_loss_and_lora_gradients_of_a_packed_batch_equal_the_padded_batch(attn, packed_collator):
    register_lorakit_attention()
    model = get_peft_model(_tiny_llama(attn),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():  # nonzero B, so A has gradients too
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    examples = _prompted([17, 9, 5, 12, 3, 20, 7, 14])
    results = []
    for batch in (Collator(PAD)(examples), packed_collator(examples)):
        model.zero_grad(set_to_none=True)
        loss, count = loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), count, grads))
    (padded, padded_count, padded_grads), (packed, packed_count, packed_grads) = results
    assert packed_count == padded_count == sum(e.num_loss_tokens for e in examples)
    assert packed == pytest.approx(padded, rel=1e-5)
    assert len(padded_grads) == 12 and padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_supports_packing_by_model_type_and_attention():
    assert supports_packing(_tiny_llama("sdpa")) and supports_packing(_tiny_llama("eager"))
    assert supports_varlen(_tiny_llama("lorakit")) and not supports_varlen(_tiny_llama("sdpa"))
    assert supports_packing(get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])))
    flex = _tiny_llama()
    flex.config._attn_implementation = "flex_attention"
    assert not supports_packing(flex)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=64))
    assert not supports_packing(gpt2)


def _run_config(model_dir, run_dir, **overrides):
    values = dict(model=str(model_dir), data="task-api", train_examples=32, batch_size=8, grad_accum=2,
                  max_steps=4, learning_rate=3e-2, r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                  lora_dropout=0.0,  # dropout masks have the layout's shape: the runs would differ
                  eval_every=0, eval_examples=4, score_examples=0, save_every=0, log_every=1, precision="fp32",
                  run_dir=str(run_dir), name="packing")
    values.update(overrides)
    return TrainConfig.from_settings(**values)


@pytest.mark.slow  # needs the converted default model's tokenizer
def test_a_packed_training_run_follows_the_padded_run_step_for_step(tiny_model_dir, tmp_path):
    runs = {}
    for packing in (True, False):
        result = train(_run_config(tiny_model_dir, tmp_path / f"packing-{packing}", packing=packing), progress=False)
        losses = [m["loss"] for m in read_metrics(result.run_dir / "metrics.jsonl") if m["kind"] == "train"]
        runs[packing] = (result.summary, losses)
    (packed, packed_losses), (padded, padded_losses) = runs[True], runs[False]
    assert packed["packing"] is True and padded["packing"] is False
    assert packed["varlen"] is True  # lorakit's attention: one row a micro-batch, example by example
    assert packed["shared_prefix"] is True  # no dropout: task-api's system prompt computed once a micro-batch
    assert len(packed_losses) == 4 and packed_losses[-1] < packed_losses[0]  # it trains
    assert packed_losses == pytest.approx(padded_losses, rel=1e-4)  # joined examples miss by ~5e-4 by step 3
    assert packed["tokens"] == padded["tokens"] and packed["loss_tokens"] == padded["loss_tokens"]


@pytest.mark.slow  # needs the converted default model's tokenizer
def test_with_lora_dropout_the_examples_keep_their_own_prefix(tiny_model_dir, tmp_path):
    result = train(_run_config(tiny_model_dir, tmp_path / "run", lora_dropout=0.1, max_steps=1), progress=False)
    assert result.summary["varlen"] is True and result.summary["shared_prefix"] is False


@pytest.mark.slow  # needs the converted default model's tokenizer
@pytest.mark.filterwarnings("ignore:.*Conv1D")
def test_a_model_without_packing_support_falls_back_to_padded_batches_and_says_so(tiny_model_dir, tmp_path, capsys):
    gpt2_dir = tmp_path / "tiny-gpt2"
    gpt2_dir.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(tiny_model_dir / name, gpt2_dir / name)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=49152, n_positions=512,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(gpt2_dir)
    config = _run_config(gpt2_dir, tmp_path / "run", target_modules=["c_attn"], max_steps=1, grad_accum=1)
    result = train(config, progress=False)
    out = capsys.readouterr().out
    assert out.count("packing off") == 1 and "gpt2" in out and "padded batches" in out
    assert result.summary["packing"] is False and result.summary["tokens"] > 0
