"""Training: TrainConfig, the DeepSpeed trainer with curriculum and exact resume, MLflow tracking.

Heavy imports (DeepSpeed, MLflow) happen inside the trainer, so importing the config is cheap.
"""

from sar_scale.training.config import StageConfig, TrainConfig

__all__ = ["StageConfig", "TrainConfig"]
