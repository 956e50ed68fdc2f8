"""Example adapters for the default model: how they are trained (train.py), their effects and measures."""
