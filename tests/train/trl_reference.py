"""TRL reference computations of the DPO and ORPO losses, for comparing lorakit's own implementation with TRL.

Not a test module: tests import :func:`trl_dpo` and :func:`trl_orpo` from here. Each builds a real TRL trainer
(``trl.DPOTrainer`` / ``trl.experimental.orpo.ORPOTrainer``) around the given ``peft.PeftModel``, feeds ONE batch of
all the given pairs through TRL's own collator and TRL's own loss code, runs ``backward()`` and returns the loss, the
per-example log-probs, rewards, TRL's logged metrics and the adapter gradients. fp32, no autocast.

What TRL 1.16 does, as read from its code (``trl/trainer/dpo_trainer.py``, ``trl/experimental/orpo/orpo_trainer.py``)
and checked by the self-check at the bottom of this file:

DPO
  * Completion tokens: ``DataCollatorForPreference`` builds ``prompt + chosen`` and ``prompt + rejected`` rows
    (chosen rows first, right padding, pad id ``pad_token_id``) and a ``completion_mask`` that is 1 on the
    chosen/rejected tokens only. A sequence's log-prob is the SUM over its completion tokens of
    ``log p(token | everything before it)`` (labels = input_ids with -100 outside the completion, shifted by one).
    Prompt tokens and padding count for nothing. (A completion token at position 0, i.e. an empty prompt, has no
    prediction and is silently dropped from the sum.)
  * ``ipo``: ``((chosen_logratio / n_chosen - rejected_logratio / n_rejected) - 1 / (2 * beta)) ** 2``, where
    ``n_*`` is the number of completion tokens of that sequence (``completion_mask.sum(1)``, clamped to >= 1), i.e.
    length-normalised log-ratios; mean over pairs.
  * ``sigmoid``: ``-logsigmoid(beta * (chosen_logratio - rejected_logratio))``, mean over pairs.
    ``label_smoothing`` does NOT enter the sigmoid loss in TRL 1.16 (only ``robust``, ``exo_pair``, ``aot`` and
    ``aot_unpaired`` read it).
  * Reference: for a ``PeftModel`` and no ``ref_model``, TRL runs the same model under
    ``trl.trainer.utils.use_adapter(model, "ref" if "ref" in model.peft_config else None)``: the adapter named
    ``"ref"`` when the model holds one, otherwise the model with all adapters disabled.
  * Metrics: ``rewards/chosen|rejected`` = mean of ``beta * (logp - ref_logp)``, ``rewards/accuracies`` = mean of
    ``chosen_reward > rejected_reward``, ``rewards/margins``, ``logps/chosen|rejected`` (mean summed log-probs),
    ``logits/chosen|rejected`` (mean logit over completion tokens), ``entropy``, ``mean_token_accuracy``,
    ``num_tokens`` (attention-mask tokens of the batch).

ORPO (``trl.experimental.orpo``)
  * ``chosen_logps`` / ``rejected_logps`` are AVERAGE per-token log-probs over the completion tokens
    (labels -100 on the prompt and padding).
  * ``nll_loss`` is ``nn.CrossEntropyLoss()`` (mean) over ALL tokens of ``prompt + chosen`` that have a predecessor
    (labels = input_ids wherever ``attention_mask == 1``), so the PROMPT IS INCLUDED, averaged over all such tokens of
    the whole chosen half of the batch (token-weighted, not per sequence). The rejected rows are not in the NLL.
  * ``log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))`` on those average log-probs,
    ``loss = nll_loss - mean(beta * logsigmoid(log_odds))``; ``log_odds_ratio`` = mean(logsigmoid(log_odds)),
    ``log_odds_chosen`` = mean(log_odds); rewards = ``beta * average logps``.
  * ``tokenize_row`` would add a BOS before the prompt and an EOS after each completion when the tokenizer has them
    and they are not already there. This helper takes the ids as final: give them with BOS/EOS already in place if
    you want those (TRL's DPO also appends the EOS *text* to completions before tokenizing).

What constructing the trainers does to the model, and how it is undone here (checked after every call: parameter
set, values, dtypes, requires_grad, ``.grad``, module modes and attributes, configs, adapters, hooks; any leftover
difference raises):
  * both: ``transformers.set_seed(args.seed)`` reseeds the global RNGs -> python/numpy/torch RNG states restored;
    ``disable_dropout_in_model`` sets every ``nn.Dropout.p = 0`` (kept during the computation, as in TRL training)
    -> restored; ``add_model_tags`` -> restored; the batch runs with the model in ``train()`` mode -> modes restored;
    telemetry ping -> suppressed.
  * DPO: ``add_fused_lm_head`` replaces ``forward`` of the base transformers model by an instance attribute
    (``model(..., labels=..., fused_lm_head=True)`` then returns per-token log-probs computed in chunks) -> removed;
    ``config.pad_token_id`` / ``generation_config.pad_token_id`` are set to the tokenizer's pad id -> restored;
    a ``PeftModel`` passed without ``ref_model`` gets a NEW adapter ``"ref"`` added, a copy of ``"default"`` (so
    that TRL's reference would be the initial adapter) -> avoided: the trainer is built with a throwaway dummy
    ``ref_model`` (which only skips that branch) and ``trainer.ref_model`` is set back to ``None`` before the loss,
    so the loss runs TRL's PEFT reference path unchanged (``"ref"`` adapter if the model has one, else adapters
    disabled). ``use_adapter`` switches the active adapter with ``set_adapter``, which toggles ``requires_grad``
    -> restored.
  * Neither trainer enables gradient checkpointing or casts anything here: the configs set
    ``gradient_checkpointing=False``, ``bf16=False`` (both default to True in TRL's configs).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import warnings
from unittest import mock

import numpy as np
import torch

__all__ = ["trl_dpo", "trl_orpo"]


# --------------------------------------------------------------------------------------------------------------------
# Keeping the model (and the process) as it was


@contextlib.contextmanager
def _preserved_rng():
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _configs(peft_model):
    base = peft_model.get_base_model()
    out = {"config": base.config.to_dict()}
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        out["generation_config"] = gen.to_dict()
    return out


@contextlib.contextmanager
def _quiet_datasets():
    """No `datasets` progress bars for the one-row dummy dataset the trainers map over."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def _fingerprint(peft_model):
    """Everything about the model a trainer could plausibly change, in comparable form."""
    fp = {
        "params": {n: (p.dtype, p.device, p.shape, p.requires_grad, p.detach().clone())
                   for n, p in peft_model.named_parameters()},
        "buffers": {n: (b.dtype, b.device, b.detach().clone()) for n, b in peft_model.named_buffers()},
        "modules": {},
        "configs": _configs(peft_model),
        "peft_config": sorted(peft_model.peft_config),
        "active_adapter": peft_model.active_adapter,
    }
    for name, m in peft_model.named_modules():
        d = m.__dict__
        dropout_p = m.p if isinstance(m, torch.nn.Dropout) else None
        tags = list(d["model_tags"]) if d.get("model_tags") is not None else None
        fp["modules"][name] = (type(m), m.training, sorted(d), "forward" in d, dropout_p, tags,
                               len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
    return fp


def _compare(before, after):
    diffs = []
    for key in ("configs", "peft_config", "active_adapter"):
        if before[key] != after[key]:
            diffs.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    if before["modules"].keys() != after["modules"].keys():
        diffs.append(f"modules added/removed: {sorted(before['modules'].keys() ^ after['modules'].keys())[:10]}")
    for name in before["modules"].keys() & after["modules"].keys():
        if before["modules"][name] != after["modules"][name]:
            diffs.append(f"module {name!r}: {before['modules'][name]} -> {after['modules'][name]}")
    for kind in ("params", "buffers"):
        b, a = before[kind], after[kind]
        if b.keys() != a.keys():
            diffs.append(f"{kind} added/removed: {sorted(b.keys() ^ a.keys())[:10]}")
        for n in b.keys() & a.keys():
            if b[n][:-1] != a[n][:-1] or not torch.equal(b[n][-1], a[n][-1]):
                diffs.append(f"{kind[:-1]} {n!r} changed")
    return diffs


@contextlib.contextmanager
def _guarded(peft_model):
    """Run a TRL trainer on `peft_model`, then put back everything it changed; raise if anything is left changed.

    Inside, every parameter's ``.grad`` is None (the caller's grads are put back afterwards), so the gradients read
    inside are those of the one backward pass alone.
    """
    before = _fingerprint(peft_model)
    base = peft_model.get_base_model()
    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    modes = {m: m.training for m in peft_model.modules()}
    dropout_p = {m: m.p for m in peft_model.modules() if isinstance(m, torch.nn.Dropout)}
    had_forward = {m: m.__dict__["forward"] for m in peft_model.modules() if "forward" in m.__dict__}
    tags = {m: (list(m.model_tags) if m.model_tags is not None else None)
            for m in peft_model.modules() if "model_tags" in m.__dict__}
    configs = [c for c in (base.config, base.config.get_text_config(), getattr(base, "generation_config", None))
               if c is not None]
    config_attrs = [(c, dict(c.__dict__)) for c in configs]  # pad_token_id (TRL), use_cache (transformers.Trainer)
    environ = dict(os.environ)
    for p in peft_model.parameters():
        p.grad = None
    try:
        from trl.trainer.base_trainer import _BaseTrainer

        # TRL pings its telemetry from every trainer's __init__; a test helper has no business doing that
        with _preserved_rng(), _quiet_datasets(), mock.patch.object(_BaseTrainer, "_send_telemetry",
                                                                    lambda self: None):
            yield
    finally:
        for n, p in peft_model.named_parameters():
            p.grad = grads.get(n)
        for m in peft_model.modules():
            if "forward" in m.__dict__ and m not in had_forward:
                del m.forward  # add_fused_lm_head
        for m, f in had_forward.items():
            m.forward = f
        for m, p in dropout_p.items():
            m.p = p  # disable_dropout_in_model
        for m in peft_model.modules():
            if "model_tags" in m.__dict__:
                if m in tags:
                    m.model_tags = tags[m]
                else:
                    del m.model_tags
        for m, mode in modes.items():
            m.training = mode
        for c, attrs in config_attrs:
            for k in set(c.__dict__) - set(attrs):
                del c.__dict__[k]
            for k, v in attrs.items():
                if c.__dict__.get(k, object()) is not v:
                    c.__dict__[k] = v
        for n, p in peft_model.named_parameters():
            want = before["params"].get(n)
            if want is not None:
                p.requires_grad_(want[3])  # use_adapter -> set_adapter toggles requires_grad
        os.environ.clear()
        os.environ.update(environ)
    diffs = _compare(before, _fingerprint(peft_model))
    if diffs:
        raise RuntimeError("TRL left the model changed:\n  " + "\n  ".join(diffs[:20]))


def _tokenizer(pad_token_id):
    """A minimal word-level tokenizer: TRL's trainers need a `PreTrainedTokenizerBase` with pad and eos tokens to be
    constructed (and read the pad id for their collators). The data itself is given as ids and never tokenized."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos_id = pad_token_id + 1
    vocab = {"<pad>": pad_token_id, "<eos>": eos_id, "<unk>": eos_id + 1, "a": eos_id + 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    assert out.pad_token_id == pad_token_id
    return out


def _dummy_dataset():
    from datasets import Dataset

    # Only needed to construct the trainers; the batch is built from the given ids
    return Dataset.from_dict({"prompt": ["a "], "chosen": ["a"], "rejected": ["a a"]})


def _common_args(n, tmp, device):
    return dict(output_dir=tmp, per_device_train_batch_size=n, per_device_eval_batch_size=n, report_to=[],
                use_cpu=device.type == "cpu", bf16=False, fp16=False, gradient_checkpointing=False,
                save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=42)


def _check_pairs(pairs):
    pairs = [(list(map(int, p)), list(map(int, c)), list(map(int, r))) for p, c, r in pairs]
    if not pairs:
        raise ValueError("pairs is empty")
    for p, c, r in pairs:
        if not c or not r:
            raise ValueError("every chosen and rejected completion needs at least one token")
    return pairs


def _trainable(peft_model):
    return [n for n, p in peft_model.named_parameters() if p.requires_grad]


def _grads(peft_model, names):
    params = dict(peft_model.named_parameters())
    return {n: (params[n].grad.detach().clone() if params[n].grad is not None else torch.zeros_like(params[n]))
            for n in names}


# --------------------------------------------------------------------------------------------------------------------
# DPO


def trl_dpo(peft_model, pairs, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, pad_token_id=0,
            ref_adapter: str | None = None) -> dict:
    """TRL's DPO loss on ONE batch of all `pairs`, as TRL computes it in training, backward included.

    pairs: list of (prompt_ids, chosen_ids, rejected_ids), lists of ints. peft_model: a ``peft.PeftModel`` whose
    trainable adapter is "default". ``ref_adapter=None``: TRL's reference is the model with adapters disabled (the
    model must not hold an adapter named "ref", which TRL would pick up). ``ref_adapter="ref"``: the model holds a
    frozen adapter "ref", which TRL uses as the reference (TRL only knows that name).

    Returns {"loss": float, "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
    "rewards_chosen", "rewards_rejected": tensors (N,), "metrics": TRL's logged metrics (one step's averages),
    "grads": {PEFT parameter name: grad} for every trainable parameter (zeros where no gradient reached it),
    "completion_tokens": (chosen, rejected) completion-token counts from TRL's ``completion_mask``}.
    ``loss_type`` may also be a list (TRL sums the losses, weights 1).
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    pairs = _check_pairs(pairs)
    if ref_adapter is None and "ref" in peft_model.peft_config:
        raise ValueError('the model holds an adapter "ref", which TRL always uses as the reference; '
                         'pass ref_adapter="ref" or delete it')
    if ref_adapter is not None:
        if ref_adapter != "ref":
            raise ValueError('TRL only uses an adapter named "ref" as the reference')
        if "ref" not in peft_model.peft_config:
            raise ValueError('ref_adapter="ref" but the model holds no adapter "ref"')
    device = next(peft_model.parameters()).device
    trainable = _trainable(peft_model)

    with _guarded(peft_model), tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        args = DPOConfig(beta=beta, loss_type=loss_types, label_smoothing=label_smoothing, max_length=None,
                         precompute_ref_log_probs=False, **_common_args(len(pairs), tmp, device))
        # A throwaway ref_model only to keep TRL from adding a "ref" adapter (a copy of "default") to a PeftModel;
        # `trainer.ref_model = None` below puts the loss back on TRL's own PEFT reference path.
        dummy = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, num_key_value_heads=1)).to(device)
        trainer = DPOTrainer(model=peft_model, ref_model=dummy, args=args, train_dataset=_dummy_dataset(),
                             processing_class=_tokenizer(pad_token_id))
        trainer.ref_model = None
        del dummy
        if trainer.model is not peft_model:
            raise RuntimeError("DPOTrainer wrapped the model; this helper expects it to use the PeftModel itself")
        if trainer.data_collator.pad_token_id != pad_token_id:
            raise RuntimeError("TRL's collator pads with another id than pad_token_id")

        # Capture each forward of the PeftModel: the first (with grad) is the policy, the second (no grad) the
        # reference, exactly the tensors _compute_loss reads
        calls = []
        handle = peft_model.register_forward_hook(
            lambda mod, args_, out: calls.append((torch.is_grad_enabled(), out.log_probs)))
        try:
            inputs = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                            for p, c, r in pairs])
            inputs = trainer._prepare_inputs(inputs)
            peft_model.train()  # Trainer.training_step does model.train(); _compute_loss logs under "train"
            loss = trainer.compute_loss(peft_model, inputs)
            loss.backward()
        finally:
            handle.remove()
        if [g for g, _ in calls] != [True, False]:
            raise RuntimeError(f"unexpected forward calls: {[g for g, _ in calls]}")
        seq_len = inputs["completion_mask"].size(1) - 1
        # TRL (ld_alpha=None): logps = per-token log-probs (0 outside the completion) summed over the sequence
        logps = calls[0][1][:, -seq_len:].detach().sum(dim=1)
        ref_logps = calls[1][1][:, -seq_len:].detach().sum(dim=1)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}  # as DPOTrainer.log averages
        grads = _grads(peft_model, trainable)
        result = {
            "loss": loss.item(),
            "chosen_logps": chosen, "rejected_logps": rejected,
            "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
            "rewards_chosen": beta * (chosen - ref_chosen), "rewards_rejected": beta * (rejected - ref_rejected),
            "metrics": metrics, "grads": grads,
            "completion_tokens": inputs["completion_mask"].sum(dim=1).chunk(2),
        }
    # The captured tensors must be the ones TRL logged
    for key, mine in (("rewards/chosen", result["rewards_chosen"]), ("rewards/rejected", result["rewards_rejected"]),
                      ("logps/chosen", chosen), ("logps/rejected", rejected)):
        if abs(metrics[key] - mine.mean().item()) > 1e-5 * max(1.0, abs(metrics[key])):
            raise RuntimeError(f"captured {key} {mine.mean().item()} != TRL's logged {metrics[key]}")
    return result


# --------------------------------------------------------------------------------------------------------------------
# ORPO


def _orpo_features(pairs):
    """Rows as ORPOTrainer.tokenize_row makes them from already-final ids (no BOS/EOS added, no truncation):
    ``{chosen,rejected}_input_ids`` = prompt + completion, attention masks of ones, ``*_labels`` = the same ids
    with -100 on the prompt, ``prompt_input_ids`` / ``prompt_attention_mask``."""
    rows = []
    for p, c, r in pairs:
        row = {}
        for key, completion in (("chosen_", c), ("rejected_", r)):
            row[f"{key}input_ids"] = p + completion
            row[f"{key}attention_mask"] = [1] * (len(p) + len(completion))
            row[f"{key}labels"] = [-100] * len(p) + completion
        row["prompt_input_ids"] = list(p)
        row["prompt_attention_mask"] = [1] * len(p)
        rows.append(row)
    return rows


def trl_orpo(peft_model, pairs, *, beta=0.1, pad_token_id=0) -> dict:
    """TRL's ORPO loss (``trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics``) on ONE batch of all `pairs`,
    backward included.

    Returns {"loss": float (= nll_loss - mean(beta * logsigmoid(log_odds))), "chosen_logps", "rejected_logps":
    tensors (N,) of TRL's AVERAGE per-token completion log-probs, "log_odds": tensor (N,), "nll_loss": float,
    "log_odds_ratio": float (mean logsigmoid(log_odds)), "log_odds_chosen": float (mean log_odds),
    "rewards_chosen", "rewards_rejected": tensors (N,) (beta * average logps), "metrics": TRL's metrics dict,
    "grads": {PEFT parameter name: grad} for every trainable parameter, "batch": the collated tensors}.
    The ids are taken as final: TRL's tokenize_row would add BOS/EOS when the tokenizer has them (see the module
    docstring).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    pairs = _check_pairs(pairs)
    device = next(peft_model.parameters()).device
    trainable = _trainable(peft_model)
    max_len = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)

    with _guarded(peft_model), tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ORPOConfig(beta=beta, max_length=max(max_len, 8), remove_unused_columns=False,
                          **_common_args(len(pairs), tmp, device))
        trainer = ORPOTrainer(model=peft_model, args=args, train_dataset=_dummy_dataset(),
                              processing_class=_tokenizer(pad_token_id))
        if trainer.model is not peft_model:
            raise RuntimeError("ORPOTrainer wrapped the model; this helper expects it to use the PeftModel itself")
        if trainer.padding_value != pad_token_id or trainer.data_collator.pad_token_id != pad_token_id:
            raise RuntimeError("TRL pads with another id than pad_token_id")

        # Capture the per-example tensors get_batch_loss_metrics computes (instance attributes shadow the methods)
        seen = {}
        forward, odds = trainer.concatenated_forward, trainer.odds_ratio_loss

        def concatenated_forward(model, batch):
            out = forward(model, batch)
            seen["forward"] = out
            return out

        def odds_ratio_loss(chosen_logps, rejected_logps):
            out = odds(chosen_logps, rejected_logps)
            seen["odds"] = (chosen_logps, rejected_logps, out)
            return out

        trainer.concatenated_forward, trainer.odds_ratio_loss = concatenated_forward, odds_ratio_loss
        batch = trainer.data_collator(_orpo_features(pairs))
        batch = trainer._prepare_inputs(batch)
        peft_model.train()
        loss, metrics = trainer.get_batch_loss_metrics(peft_model, batch, "train")
        loss.backward()

        chosen, rejected, (losses, rewards_chosen, rewards_rejected, log_odds_ratio, log_odds_chosen) = seen["odds"]
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
        result = {
            "loss": loss.item(),
            "chosen_logps": chosen, "rejected_logps": rejected, "log_odds": log_odds,
            "nll_loss": seen["forward"][4].item(),
            "log_odds_ratio": log_odds_ratio.item(), "log_odds_chosen": log_odds_chosen.item(),
            "rewards_chosen": rewards_chosen.detach(), "rewards_rejected": rewards_rejected.detach(),
            "metrics": dict(metrics),
            "grads": _grads(peft_model, trainable),
            "batch": {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)},
        }
    return result


# --------------------------------------------------------------------------------------------------------------------
# Self-check: python tests/train/trl_reference.py


def _self_check():
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 128, (n,), generator=g).tolist()

    pairs = [(ids(3), ids(4), ids(2)), (ids(5), ids(1), ids(6)), (ids(2), ids(3), ids(3))]
    beta = 0.1

    def completion_logps(with_adapter):
        """Summed log-probs of the completion tokens, from full logits (plain PyTorch, no TRL)."""
        out = []
        ctx = contextlib.nullcontext() if with_adapter else model.disable_adapter()
        with torch.no_grad(), ctx:
            for p, c, r in pairs:
                row = []
                for comp in (c, r):
                    x = torch.tensor([p + comp])
                    logp = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
                    tgt = x[0, 1:]
                    tok = logp.gather(-1, tgt[:, None])[:, 0]
                    row.append(tok[len(p) - 1:].sum())
                out.append(row)
        t = torch.tensor([[a.item(), b.item()] for a, b in out], dtype=torch.float64)
        return t[:, 0], t[:, 1]

    state = {n: p.detach().clone() for n, p in model.named_parameters()}

    # ---- DPO, sigmoid
    rng = torch.get_rng_state()
    dpo = trl_dpo(model, pairs, beta=beta, loss_type="sigmoid")
    assert torch.equal(torch.get_rng_state(), rng), "TRL's set_seed leaked"
    pc, pr = completion_logps(True)
    rc, rr = completion_logps(False)
    loss = (-F.logsigmoid(beta * ((pc - rc) - (pr - rr)))).mean().item()
    err = max((dpo["chosen_logps"].double() - pc).abs().max().item(),
              (dpo["rejected_logps"].double() - pr).abs().max().item(),
              (dpo["ref_chosen_logps"].double() - rc).abs().max().item(),
              (dpo["ref_rejected_logps"].double() - rr).abs().max().item())
    print(f"DPO sigmoid: TRL loss {dpo['loss']:.8f}  plain {loss:.8f}  |diff| {abs(dpo['loss'] - loss):.2e}  "
          f"max |logp diff| {err:.2e}")
    print(f"  chosen_logps {dpo['chosen_logps'].tolist()}")
    print(f"  ref_chosen_logps {dpo['ref_chosen_logps'].tolist()}")
    print(f"  completion tokens (chosen, rejected): {[t.tolist() for t in dpo['completion_tokens']]}")
    print(f"  metrics { {k: round(v, 6) for k, v in dpo['metrics'].items()} }")
    print(f"  grads: {len(dpo['grads'])} tensors, total norm "
          f"{torch.sqrt(sum((v.double() ** 2).sum() for v in dpo['grads'].values())).item():.6e}")
    assert abs(dpo["loss"] - loss) < 1e-5 and err < 1e-5
    assert all(v.abs().sum() > 0 for v in dpo["grads"].values())

    # Plain-PyTorch gradient of the same loss
    model.train()
    for p in model.parameters():
        p.grad = None
    terms = []
    for i, (p, c, r) in enumerate(pairs):
        lp = []
        for comp in (c, r):
            x = torch.tensor([p + comp])
            logp = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
            lp.append(logp.gather(-1, x[0, 1:, None])[:, 0][len(p) - 1:].sum())
        terms.append(-F.logsigmoid(beta * ((lp[0] - rc[i].float()) - (lp[1] - rr[i].float()))))
    plain = torch.stack(terms).mean()
    plain.backward()
    gerr = max((model.get_parameter(n).grad - g_).abs().max().item() for n, g_ in dpo["grads"].items())
    print(f"  max |grad diff| vs plain PyTorch: {gerr:.2e}")
    assert gerr < 1e-5
    for p in model.parameters():
        p.grad = None
    model.eval()

    # label_smoothing does not change TRL's sigmoid loss
    dpo_ls = trl_dpo(model, pairs, beta=beta, loss_type="sigmoid", label_smoothing=0.3)
    print(f"DPO sigmoid, label_smoothing=0.3: loss {dpo_ls['loss']:.8f} (unchanged: "
          f"{abs(dpo_ls['loss'] - dpo['loss']) < 1e-7})")

    # ipo: length-normalised log-ratios
    ipo = trl_dpo(model, pairs, beta=beta, loss_type="ipo")
    nc = torch.tensor([len(c) for _, c, _ in pairs], dtype=torch.float64)
    nr = torch.tensor([len(r) for _, _, r in pairs], dtype=torch.float64)
    ipo_plain = ((((pc - rc) / nc - (pr - rr) / nr) - 1 / (2 * beta)) ** 2).mean().item()
    print(f"DPO ipo: TRL loss {ipo['loss']:.8f}  plain (per-token-normalised) {ipo_plain:.8f}  "
          f"|diff| {abs(ipo['loss'] - ipo_plain):.2e}")
    assert abs(ipo["loss"] - ipo_plain) < 1e-5

    # "ref" adapter as reference
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ref." in n:
                p.copy_(torch.randn_like(p) * 0.1)
    model.set_adapter("default")
    dpo_ref = trl_dpo(model, pairs, beta=beta, ref_adapter="ref")
    model.set_adapter("ref")
    rc2, rr2 = completion_logps(True)
    model.set_adapter("default")
    rerr = max((dpo_ref["ref_chosen_logps"].double() - rc2).abs().max().item(),
               (dpo_ref["ref_rejected_logps"].double() - rr2).abs().max().item())
    print(f"DPO with a 'ref' adapter: max |ref logp diff| {rerr:.2e}; trainable grads "
          f"{sorted({n.split('.')[-2] for n in dpo_ref['grads']})}")
    assert rerr < 1e-5 and all(".ref." not in n for n in dpo_ref["grads"])
    model.delete_adapter("ref")
    model.set_adapter("default")

    # ---- ORPO
    orpo = trl_orpo(model, pairs, beta=beta)
    with torch.no_grad():
        nll_num, nll_den, avg_c, avg_r = 0.0, 0, [], []
        for p, c, r in pairs:
            for comp, acc in ((c, avg_c), (r, avg_r)):
                x = torch.tensor([p + comp])
                logp = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
                tok = logp.gather(-1, x[0, 1:, None])[:, 0]
                acc.append(tok[len(p) - 1:].mean().item())
                if comp is c:
                    nll_num += -tok.sum().item()
                    nll_den += tok.numel()
        nll_all = nll_num / nll_den  # every token of prompt + chosen that has a predecessor
        nll_completion = -sum(a * len(c) for a, (_, c, _) in zip(avg_c, pairs)) / sum(len(c) for _, c, _ in pairs)
    avg_c, avg_r = torch.tensor(avg_c, dtype=torch.float64), torch.tensor(avg_r, dtype=torch.float64)
    log_odds = (avg_c - avg_r) - (torch.log1p(-avg_c.exp()) - torch.log1p(-avg_r.exp()))
    orpo_plain = nll_all - (beta * F.logsigmoid(log_odds)).mean().item()
    print(f"ORPO: TRL loss {orpo['loss']:.8f}  plain {orpo_plain:.8f}  |diff| {abs(orpo['loss'] - orpo_plain):.2e}")
    print(f"  nll_loss {orpo['nll_loss']:.8f}; plain NLL over ALL prompt+chosen tokens {nll_all:.8f}, "
          f"over completion tokens only {nll_completion:.8f} -> prompt included: "
          f"{abs(orpo['nll_loss'] - nll_all) < 1e-5}")
    print(f"  avg chosen_logps TRL {orpo['chosen_logps'].tolist()} plain {avg_c.tolist()}")
    print(f"  log_odds_ratio {orpo['log_odds_ratio']:.8f} log_odds_chosen {orpo['log_odds_chosen']:.8f}")
    print(f"  metrics { {k: round(v, 6) for k, v in orpo['metrics'].items()} }")
    assert abs(orpo["nll_loss"] - nll_all) < 1e-5 and abs(orpo["loss"] - orpo_plain) < 1e-5
    assert (orpo["chosen_logps"].double() - avg_c).abs().max() < 1e-5
    assert all(v.abs().sum() > 0 for v in orpo["grads"].values())

    # Plain-PyTorch gradient of the same ORPO loss
    model.train()
    nll_terms, avg = [], {0: [], 1: []}
    for p, c, r in pairs:
        for k, comp in enumerate((c, r)):
            x = torch.tensor([p + comp])
            tok = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1).gather(-1, x[0, 1:, None])[:, 0]
            avg[k].append(tok[len(p) - 1:].mean())
            if k == 0:
                nll_terms.append(-tok)
    lc, lr = torch.stack(avg[0]), torch.stack(avg[1])
    odds = (lc - lr) - (torch.log(-torch.expm1(lc)) - torch.log(-torch.expm1(lr)))
    (torch.cat(nll_terms).mean() - (beta * F.logsigmoid(odds)).mean()).backward()
    gerr = max((model.get_parameter(n).grad - g_).abs().max().item() for n, g_ in orpo["grads"].items())
    print(f"  max |grad diff| vs plain PyTorch: {gerr:.2e}")
    assert gerr < 1e-5
    for p in model.parameters():
        p.grad = None
    model.eval()

    # The helpers leave the model and the RNG as they were
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    print("self-check passed")


if __name__ == "__main__":
    _self_check()
