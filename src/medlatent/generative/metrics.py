"""Sample-quality metrics in the feature space of a domain encoder.

No Inception weights are available offline and they fit medical images poorly, so features
come from an encoder trained on the real training split (named in every output).

* Frechet distance (Heusel et al., NeurIPS 2017): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2),
  on our features, with the matrix square root of ``scipy.linalg.sqrtm`` handled as pytorch-fid
  does (equal to MONAI's ``FIDMetric``, which passes ``sqrtm(disp=False)``, gone in scipy 1.18).
* Precision and recall (Kynkaanniemi et al., NeurIPS 2019): the real manifold is the union of
  balls around each real feature with radius its k-th nearest real neighbour; precision is the
  share of generated samples inside it, recall the share of real samples inside the generated
  manifold.
* Memorisation: each sample's distance to its nearest training image, divided by the median of
  the same distance for real test images (which were never trained on). Ratios well below 1
  flag samples closer to a training patient than unseen real images are.
"""

from __future__ import annotations

import numpy as np
import torch


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal square root of a (D, D) matrix; scipy's singular-matrix warning is silenced
    because the caller checks the result (covariances of fewer samples than features are singular)."""
    import warnings

    import scipy.linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return np.asarray(scipy.linalg.sqrtm(a))


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                       eps: float = 1e-6) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2): means (D,), covariances (D, D).

    As pytorch-fid (Seitzer 2020): if (S1 S2)^1/2 is not finite, eps * I is added to both
    covariances; a complex root (numerical error) keeps its real part once the imaginary part of
    its diagonal is below 1e-3."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} too high")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """(N, D), (M, D) features -> Frechet distance between the two fitted Gaussians (sample
    means and unbiased covariances, as MONAI's ``FIDMetric`` and pytorch-fid)."""
    r, f = real.double().cpu().numpy(), fake.double().cpu().numpy()
    return frechet_from_stats(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))


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
