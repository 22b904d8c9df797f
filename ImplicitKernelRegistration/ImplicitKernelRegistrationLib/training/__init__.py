"""Trainers for the kernel and the encoder (not shipped with the Slicer extension)."""

from .train import train_main
from .train_encoder import default_encoder_config, train_encoder_main

__all__ = ["default_encoder_config", "train_encoder_main", "train_main"]
