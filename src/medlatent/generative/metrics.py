"""Sample-quality metrics in the feature space of a domain encoder.

No Inception weights are available offline and they fit medical images poorly, so features
come from an encoder trained on the real training split (named in every output).

* Frechet distance (Heusel et al., NeurIPS 2017): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2),
  computed by MONAI's ``FIDMetric`` on our features.
* Precision and recall (Kynkaanniemi et al., NeurIPS 2019): the real manifold is the union of
  balls around each real feature with radius its k-th nearest real neighbour; precision is the
  share of generated samples inside it, recall the share of real samples inside the generated
  manifold.
* Memorisation: each sample's distance to its nearest training image, divided by the median of
  the same distance for real test images (which were never trained on). Ratios well below 1
  flag samples closer to a training patient than unseen real images are.
"""

from __future__ import annotations

import torch


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """(N, D), (M, D) features -> Frechet distance between the two fitted Gaussians."""
    import warnings

    from monai.metrics import FIDMetric

    with warnings.catch_warnings():  # MONAI passes scipy's deprecated sqrtm(disp=...)
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(FIDMetric()(fake.double(), real.double()))


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)  # (N, N)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall with k-NN manifolds (k = 3 as in the paper)."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # (M, N)
    precision = (d <= r_real[None, :]).any(dim=1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(dim=1).double().mean()
    return dict(precision=float(precision), recall=float(recall))


def memorisation(train: torch.Tensor, samples: torch.Tensor, test: torch.Tensor, below: float = 0.5
                 ) -> dict[str, object]:
    """Nearest-training-image distances of samples relative to real test images.

    Returns:
        ratio (M,) per sample, nearest (M,) training indices, the test median, and the share of
        samples with ratio < ``below``.
    """
    d_s, nearest = torch.cdist(samples.double(), train.double()).min(dim=1)  # (M,)
    d_t = torch.cdist(test.double(), train.double()).min(dim=1).values  # (T,)
    median = d_t.median()
    ratio = d_s / median
    return dict(ratio=ratio.float(), nearest=nearest, test_median=float(median),
                share_below=float((ratio < below).double().mean()), below=below)
