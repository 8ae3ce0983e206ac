"""What both playground test files train: the runs directory the page and its endpoints read."""

import json

from lorakit.train import TrainConfig, train

COMMON = dict(batch_size=8, learning_rate=5e-2, r=4, target_modules=["q_proj", "v_proj", "lm_head"], log_every=1,
              precision="fp32")


def ok_records():
    """Chats answered "ok" three times in four, "no" otherwise: an adapter trained on them says
    "ok", right on some held-out examples and wrong on the others, where the base model is wrong."""
    return [{"messages": [{"role": "user", "content": f"request number {i}"},
                          {"role": "assistant", "content": "ok" if i % 4 else "no"}]} for i in range(48)]


def train_runs(root, tiny_model_dir):
    """``root/runs`` with "tasks" (task-api, its built-in held-out split, 4 steps) and "ok" (the
    chats above in a JSONL file, val_fraction 0.25, 20 steps); returns ``root/runs``."""
    data = root / "ok.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ok_records()))
    common = dict(model=str(tiny_model_dir), **COMMON)
    train(TrainConfig.from_settings(**common, data="task-api", train_examples=48, max_steps=4, eval_every=2,
                                    eval_examples=8, score_examples=4, max_new_tokens=6, save_every=4,
                                    run_dir=str(root / "runs" / "tasks"), name="tasks"), progress=False)
    train(TrainConfig.from_settings(**common, data=str(data), val_fraction=0.25, max_steps=20, eval_every=10,
                                    eval_examples=12, score_examples=12, max_new_tokens=4, save_every=20,
                                    run_dir=str(root / "runs" / "ok"), name="ok"), progress=False)
    return root / "runs"
