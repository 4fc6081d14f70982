"""Multiple-instance learning: one label per bag of images.

* Attention-based MIL pooling: Ilse, Tomczak and Welling, "Attention-based Deep Multiple
  Instance Learning", ICML 2018 (gated attention, Eq. 9):
  ``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``, ``z = sum_i a_i h_i``, bag logit
  ``= c(z)``. The weights a_i say which instances made the bag positive.
* Prompt-MIL: Zhang et al., "Prompt-MIL: Boosting Multi-Instance Learning Schemes via
  Task-specific Prompt Tuning", MICCAI 2023: the feature extractor stays frozen and a few
  prompt tokens are trained end to end together with the MIL head.

Bags are built from labelled images: a bag is positive when it holds at least one image of a
chosen class (the whole-slide setting: one tumour patch makes the slide positive).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from medlatent.adapt.prompts import PromptedViT


class AttentionMIL(nn.Module):
    """(B, N, D) instance embeddings -> ((B,) bag logits, (B, N) attention weights)."""

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))  # (B, N, hidden)
        a = torch.softmax(self.w(self.drop(gate)).squeeze(-1), dim=1)  # (B, N)
        z = torch.einsum("bn,bnd->bd", a, h)  # (B, D)
        return self.classifier(z).squeeze(-1), a


class PromptMIL(nn.Module):
    """Frozen ViT with trainable prompts as the instance encoder, then attention MIL.

    (B, N, C, *S) bags of images -> ((B,) logits, (B, N) attention)."""

    def __init__(self, prompted: PromptedViT, hidden: int = 128) -> None:
        super().__init__()
        self.encoder = prompted
        self.mil = AttentionMIL(prompted.out_dim, hidden)

    def forward(self, bags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = bags.shape[:2]
        h = self.encoder(bags.flatten(0, 1)).view(b, n, -1)  # (B, N, D)
        return self.mil(h)


def make_bags(labels: torch.Tensor, positive_class: int, n_bags: int, bag_size: int, seed: int = 0,
              max_positives: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags of image indices; half positive (1 to ``max_positives`` images of the class, default
    a quarter of the bag), half negative (none).

    Returns:
        (n_bags, bag_size) indices, (n_bags,) bag labels, (n_bags, bag_size) instance is-positive.
    """
    rng = np.random.default_rng(seed)
    y = labels.reshape(len(labels), -1)[:, 0].numpy()
    pos, neg = np.flatnonzero(y == positive_class), np.flatnonzero(y != positive_class)
    if len(pos) == 0 or len(neg) < bag_size:
        raise ValueError(f"class {positive_class}: needs images of the class and {bag_size} others")
    most = max_positives or max(1, bag_size // 4)
    bags, bag_y = [], []
    for i in range(n_bags):
        k = int(rng.integers(1, most + 1)) if i % 2 == 0 else 0
        members = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, bag_size - k, replace=False)])
        bags.append(rng.permutation(members))
        bag_y.append(int(k > 0))
    idx = torch.as_tensor(np.stack(bags))
    return idx, torch.tensor(bag_y), torch.as_tensor(y[idx.numpy()] == positive_class)


def train_mil(model: nn.Module, inputs: torch.Tensor, bag_y: torch.Tensor, steps: int = 300, batch: int = 16,
              lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Adam on the bag-level BCE loss. ``inputs``: (n_bags, N, D) embeddings or (n_bags, N, C, *S)
    images, whichever ``model`` takes; only its trainable parameters change."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        # a CPU generator: the same bags on any device
        i = torch.randint(0, len(inputs), (min(batch, len(inputs)),), generator=g)
        logits, _ = model(inputs[i.to(inputs.device)])
        loss = F.binary_cross_entropy_with_logits(logits, bag_y[i].float().to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def evaluate_mil(model: nn.Module, inputs: torch.Tensor, bag_y: torch.Tensor, positive: torch.Tensor,
                 batch: int = 64) -> dict[str, float]:
    """Bag AUC and ACC, and the share of attention mass on positive instances in positive bags."""
    model.eval()
    logits, att = zip(*(model(inputs[i:i + batch]) for i in range(0, len(inputs), batch)))
    s, a = torch.cat(logits).float().cpu(), torch.cat(att).float().cpu()  # (n,), (n, N)
    p = bag_y.bool()
    mass = (a[p] * positive[p]).sum(1).mean()  # attention on the positive images of positive bags
    share = positive[p].float().mean()  # ... what uniform attention would give
    return dict(auc=float(roc_auc_score(bag_y.numpy(), s.numpy())), acc=float(((s > 0) == p).float().mean()),
                attention_on_positives=float(mass), uniform_share=float(share))
