"""Training: `TrainConfig`, `train()`, checkpoints and the run report (the loss and scores it
uses come from `lorakit.evaluation`, re-exported here)."""

from lorakit.evaluation import ScoreResult, heldout_loss, loss_sum, score_examples
from lorakit.train.config import TrainConfig, load_train_config
from lorakit.train.loop import RunResult, train
from lorakit.train.schedule import lr_at

__all__ = [
    "TrainConfig", "load_train_config", "train", "RunResult", "lr_at",
    "loss_sum", "heldout_loss", "score_examples", "ScoreResult",
]
