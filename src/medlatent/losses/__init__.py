"""Losses: small nn.Modules with the paper and formula in the docstring."""

from medlatent.losses.contrastive import BatchContrastLoss, InfoNCELoss, TripletLoss
from medlatent.losses.distillation import BYOLLoss, DINOLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from medlatent.losses.fixmatch import FixMatchLoss, pseudo_labels
from medlatent.losses.ntxent import NTXentLoss
from medlatent.losses.reconstruction import MaskedPatchLoss

__all__ = ["NTXentLoss", "InfoNCELoss", "BatchContrastLoss", "TripletLoss", "BYOLLoss", "DINOLoss",
           "IBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp", "MaskedPatchLoss", "FixMatchLoss", "pseudo_labels"]
