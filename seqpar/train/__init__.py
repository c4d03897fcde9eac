"""Recipes to training runs: schema and validation, data, LoRA, DeepSpeed engine, checkpoints, metrics.

``seqpar train RECIPE [key=value ...]`` (seqpar/train/cli.py) is the entry point; ``train(recipe)`` in
seqpar/train/trainer.py is the same thing as a function.
"""
