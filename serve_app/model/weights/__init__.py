"""Pretrained face-embedding weights: where they come from and how they become torch state dicts."""
