"""Training: GPT-style models on Ray Train (DDP or FSDP), checkpointed, resumable, registered on finish.

`train(config, storage=, engine=)` (in `run`) is the driver; `loop.train_func` runs on every
worker; `checkpoint` writes checkpoints that are complete HF model directories.
"""

from lmaas.train.config import TrainConfig

__all__ = ["TrainConfig"]
