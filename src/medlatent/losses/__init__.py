"""Losses: small nn.Modules with the paper and formula in the docstring."""

from medlatent.losses.ntxent import NTXentLoss

__all__ = ["NTXentLoss"]
