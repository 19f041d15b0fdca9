"""Glue for training frameworks: Hugging Face Trainer and Accelerate, Lightning, config-driven trainers.

Each submodule imports its framework lazily, so ``import snoo`` never needs them.
"""
