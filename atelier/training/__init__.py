"""LoRA training on a model already resident: the loop (``LoraTrainer``) and its files.

Library code only: the runner (actors/runner.py) decides when to step, checkpoint and sample.
"""

from atelier.training.trainer import ADAPTER, LoraTrainer, make_class_images

__all__ = ["ADAPTER", "LoraTrainer", "make_class_images"]
