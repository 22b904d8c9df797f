"""Trainers for the kernel and the encoder (not shipped with the Slicer extension)."""
