"""Batched, seeded augmentation on the training device (ops.py) and view recipes (views.py)."""
