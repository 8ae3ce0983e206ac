"""lorakit's DPO and ORPO against TRL's own trainers (with PEFT) on the same tiny model, the same
pairs and the same adapter weights: loss, rewards and every adapter gradient within fp32 rounding,
for the padded batch (TRL's layout) and for lorakit's stream (each prompt computed once)."""

import copy
import random

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, PeftModel
from lorakit.data import PairCollator, PairStreamCollator, PreferenceExample
from lorakit.evaluation.preference import answer_log_probs
from lorakit.models.speedup import speed_up
from lorakit.train.preference import REFERENCE_ADAPTER, PreferenceObjective

from .trl_reference import trl_dpo, trl_orpo

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pairs(n=4, seed=0):
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, 128) for _ in range(k)]  # noqa: E731
    return [(ids(rng.randint(2, 9)), ids(rng.randint(1, 6)), ids(rng.randint(1, 6))) for _ in range(n)]


def _models(tmp_path, with_ref=False):
    """(PEFT's model, lorakit's model) with the same base and the same non-zero adapter weights."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    base = LlamaForCausalLM(config)
    ours_base = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                       init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = PeftModel.from_pretrained(ours_base, tmp_path / "adapter", is_trainable=True)
    if with_ref:  # a run that started from an adapter: its start, frozen, is the reference
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))  # trained away from where it started
        theirs.load_adapter(tmp_path / "adapter", adapter_name=REFERENCE_ADAPTER)
        theirs.set_adapter("default")
        theirs.save_pretrained(tmp_path / "trained")
        ours = PeftModel.from_pretrained(copy.deepcopy(ours_base), tmp_path / "trained", is_trainable=True)
        ours.load_adapter(tmp_path / "adapter", adapter_name=REFERENCE_ADAPTER)
        ours.set_adapter("default")
    return theirs, ours


def _ours(model, pairs, objective, collate):
    examples = [PreferenceExample(p, c, r, f"pair {i}") for i, (p, c, r) in enumerate(pairs)]
    model.zero_grad(set_to_none=True)
    batch = collate(examples)
    loss, count, stats = objective(model, batch)
    (loss / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item() / count, stats, grads, batch


def _peft_name(name: str) -> str:
    """PEFT's name of one of lorakit's adapter parameters (``...q_proj.adapters.default.lora_A``)."""
    module, _, rest = name.partition(".adapters.")
    adapter, _, tensor = rest.partition(".")
    return f"{module}.{tensor}.{adapter}.weight"


def _assert_grads_equal(ours, theirs):
    theirs = {n: g for n, g in theirs.items() if ".default." in n}
    assert len(ours) == len(theirs) == 2 * len(TARGETS) * 2
    for name, grad in ours.items():
        other = theirs[_peft_name(name)]
        assert torch.allclose(grad, other, atol=1e-6, rtol=1e-4), (name, (grad - other).abs().max())


@pytest.fixture(params=["padded", "stream"])
def collate(request):
    return request.param


def _collator(kind, model):
    if kind == "stream":
        speed_up(model, attention="lorakit")  # lorakit's attention takes the stream's segments
        return PairStreamCollator()
    return PairCollator(0)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                       ("robust", 0.1), (("sigmoid", "sft"), 0.0)])
def test_dpo_loss_rewards_and_gradients_equal_trls(tmp_path, collate, loss_type, label_smoothing):
    theirs, ours = _models(tmp_path)
    pairs = _pairs()
    want = trl_dpo(theirs, pairs, beta=0.1, loss_type=list(loss_type) if isinstance(loss_type, tuple) else loss_type,
                   label_smoothing=label_smoothing)
    objective = PreferenceObjective("dpo", beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing)
    loss, stats, grads, _ = _ours(ours, pairs, objective, _collator(collate, ours))
    assert loss == pytest.approx(want["loss"], abs=1e-6, rel=1e-5)
    n = len(pairs)
    assert stats["rewards_chosen"].item() / n == pytest.approx(want["rewards_chosen"].mean().item(), abs=1e-6)
    assert stats["rewards_rejected"].item() / n == pytest.approx(want["rewards_rejected"].mean().item(), abs=1e-6)
    assert stats["reward_accuracy"].item() / n == pytest.approx(want["metrics"]["rewards/accuracies"], abs=1e-6)
    assert stats["reward_margin"].item() / n == pytest.approx(want["metrics"]["rewards/margins"], abs=1e-5)
    _assert_grads_equal(grads, want["grads"])


def test_dpo_log_probabilities_of_each_answer_equal_trls(tmp_path, collate):
    theirs, ours = _models(tmp_path)
    pairs = _pairs(5, seed=1)
    want = trl_dpo(theirs, pairs)
    examples = [PreferenceExample(p, c, r, "x") for p, c, r in pairs]
    with torch.no_grad():
        got = answer_log_probs(ours, _collator(collate, ours)(examples))
        with ours.disable_adapter():
            reference = answer_log_probs(ours, _collator(collate, ours)(examples))
    assert torch.allclose(got.chosen, want["chosen_logps"], atol=1e-5)
    assert torch.allclose(got.rejected, want["rejected_logps"], atol=1e-5)
    assert torch.allclose(reference.chosen, want["ref_chosen_logps"], atol=1e-5)
    assert torch.allclose(reference.rejected, want["ref_rejected_logps"], atol=1e-5)
    assert not torch.allclose(got.chosen, reference.chosen, atol=1e-3)  # the adapter matters here


def test_dpo_from_an_existing_adapter_takes_it_as_the_reference_as_trl_does(tmp_path, collate):
    theirs, ours = _models(tmp_path, with_ref=True)
    pairs = _pairs(3, seed=2)
    want = trl_dpo(theirs, pairs, ref_adapter=REFERENCE_ADAPTER)
    loss, stats, grads, _ = _ours(ours, pairs, PreferenceObjective("dpo"), _collator(collate, ours))
    assert loss == pytest.approx(want["loss"], abs=1e-6, rel=1e-5)
    assert stats["rewards_chosen"].item() / 3 == pytest.approx(want["rewards_chosen"].mean().item(), abs=1e-6)
    assert abs(want["rewards_chosen"]).max() > 1e-3  # the reference is not the policy
    _assert_grads_equal(grads, want["grads"])
    assert all(p.grad is None for n, p in ours.named_parameters() if f".{REFERENCE_ADAPTER}" in n)


def test_reference_free_dpo_takes_the_reference_log_probabilities_as_zero(tmp_path):
    _, ours = _models(tmp_path)
    pairs = _pairs()
    examples = [PreferenceExample(p, c, r, "x") for p, c, r in pairs]
    batch = PairCollator(0)(examples)
    loss, count, stats = PreferenceObjective("dpo", beta=0.2, reference_free=True)(ours, batch)
    with torch.no_grad():
        logps = answer_log_probs(ours, batch)
    hand = -torch.nn.functional.logsigmoid(0.2 * (logps.chosen - logps.rejected)).sum()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    assert stats["rewards_chosen"].item() == pytest.approx(0.2 * logps.chosen.sum().item(), rel=1e-6)


def test_orpo_loss_rewards_and_gradients_equal_trls(tmp_path, collate):
    theirs, ours = _models(tmp_path)
    pairs = _pairs()
    want = trl_orpo(theirs, pairs, beta=0.1)
    loss, stats, grads, _ = _ours(ours, pairs, PreferenceObjective("orpo", beta=0.1), _collator(collate, ours))
    assert loss == pytest.approx(want["loss"], abs=1e-6, rel=1e-5)
    n = len(pairs)
    assert stats["nll"].item() / n == pytest.approx(want["nll_loss"], abs=1e-6, rel=1e-6)
    assert stats["log_odds_ratio"].item() / n == pytest.approx(want["log_odds_ratio"], abs=1e-6, rel=1e-5)
    assert stats["rewards_chosen"].item() / n == pytest.approx(want["rewards_chosen"].mean().item(), abs=1e-6)
    assert stats["rewards_rejected"].item() / n == pytest.approx(want["rewards_rejected"].mean().item(), abs=1e-6)
    _assert_grads_equal(grads, want["grads"])
