"""MeZO (zeroth-order fine-tuning from forward passes) running as an inference workload on the engine."""
from .config import MeZOConfig
from .data import ClassificationExample, LMExample, load_examples
from .finetune import TrainResult, finetune, replay_trajectory
from .trainer import MeZOTrainer

__all__ = ["MeZOConfig", "MeZOTrainer", "TrainResult", "finetune", "replay_trajectory", "load_examples",
           "ClassificationExample", "LMExample"]
