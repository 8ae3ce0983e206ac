"""Training: `TrainConfig`, `train()`, checkpoints, evaluation and the run report."""

from lorakit.train.config import TrainConfig, load_train_config
from lorakit.train.evaluate import ScoreResult, heldout_loss, loss_sum, score_examples
from lorakit.train.loop import RunResult, train
from lorakit.train.schedule import lr_at

__all__ = [
    "TrainConfig", "load_train_config", "train", "RunResult", "lr_at",
    "loss_sum", "heldout_loss", "score_examples", "ScoreResult",
]
