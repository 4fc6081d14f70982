"""View recipes: how a batch of stored images becomes the augmented views a method trains on.

A :class:`ViewRecipe` turns ``(B, C, *S)`` uint8/float images into a list of normalised views
``(B, C, *size)``, all on the batch's device, reproducible for a given generator seed. The
recipe is data (a :class:`~medlatent.config.ViewConfig` per view), so methods with asymmetric
views (BYOL) or several crop sizes (DINO) describe them rather than re-implement them.

How each setting follows the image side (28, 64, 128, 224 px; 28 and 64 for volumes):

* Crops (``crop_scale``, ``crop_ratio``, DINO's global and local scales) are fractions of the
  field of view, the same at every size: MedMNIST's 64-224 px files (MedMNIST+, Doerrich et al.
  2024) show the same field of view as the 28-px ones, so a quarter of the area holds the same
  part of a cell or a lung at every size. SimCLR's 0.08 floor is for ImageNet photos, not a
  rule of resolution. DINO's local crop side is 3/7 of the side: 12, 28, 56, 96 px.
* Blur sigma is in pixels, so it scales with the side: :func:`blur_sigma` gives SimCLR's and
  BYOL's (0.1, 2.0) px at 224 px (Chen et al. 2020, App. A; Grill et al. 2020, Table 6) times
  max(size / 224, 1/2): (0.05, 1.0) px at 28 and 64 (a weaker blur would change less than a
  pixel), (0.057, 1.14) at 128, (0.1, 2.0) at 224. The kernel (``ops.gaussian_blur``) spans
  +-3 sigma of the largest sigma at 28 and 64 px (7 taps), and from 96 px +-ceil(3 sigma) of each
  sample's own sigma (at most 9 taps at 128, 13 at 224; fewer for a small sigma). SimCLR's kernel of
  10% of the side (23 taps at 224) adds taps holding 0.1% of the weight, so it is not copied.
  ``ViewConfig.blur_sigma`` (used when ``views.blur`` is set for SimCLR or MoCo) is taken as
  given, in pixels of the view.
* Flip and rotation probabilities, rotation degrees, colour and intensity jitter, solarisation
  and noise act on angles and intensities, not pixels: the same at every size.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from medlatent.augment import ops
from medlatent.config import ViewConfig
from medlatent.data.store import to_float

# Subsets whose images have no canonical orientation (cells, tissue, skin), where vertical
# flips and 90-degree rotations are label-preserving. X-rays, CT, OCT, fundus and ultrasound
# have an up and a down.
ORIENTATION_FREE = frozenset({"bloodmnist", "pathmnist", "tissuemnist", "dermamnist"})

# Subsets where colour is the class signal rather than a nuisance, so colour jitter and random
# grayscale would teach the encoder to discard it. In a peripheral blood smear (one staining
# protocol for the whole set) eosinophils are told by red-orange granules, basophils by dark
# purple ones, erythroblasts and platelets by their stain. Measured on BloodMNIST: SimCLR, 5
# CPU-minutes, linear probe 0.808 with SimCLR's colour distortion, 0.859 without (README).
# Pathology and dermoscopy keep the jitter: there stain and camera colour vary between sites.
COLOUR_IS_CLASS = frozenset({"bloodmnist"})


# Gaussian blur sigma of SimCLR (Chen et al. 2020, App. A) and BYOL (Table 6) at 224 px, in pixels.
PAPER_BLUR_SIGMA = (0.1, 2.0)

_CPU_VIEW_VALUES = 2 ** 21  # values per chunk of a view on a CPU (8 MB of float32), see ViewRecipe


def _one_thread() -> None:
    torch.get_num_threads()  # the thread's first torch call takes the default count ...
    torch.set_num_threads(1)  # ... so this setting is not undone by it later


@functools.cache
def _chunk_pool(workers: int) -> ThreadPoolExecutor:
    """Threads for the chunks of CPU views, each running torch ops on one intra-op thread.

    ``torch.set_num_threads`` sets the calling thread's OpenMP team size (the caller keeps its
    own) and also the default that a thread takes at its first torch op, so each worker makes
    that first call before setting one thread, and once every worker has, the caller's count
    is set again as the default."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="medlatent-views", initializer=_one_thread)
    started = threading.Barrier(workers)
    list(pool.map(lambda _: started.wait(), range(workers)))  # every worker thread exists and is set to one
    torch.set_num_threads(workers)
    return pool


if hasattr(os, "register_at_fork"):  # a forked child (DataLoader workers) has none of the parent's threads
    os.register_at_fork(after_in_child=_chunk_pool.cache_clear)


def blur_sigma(size: int) -> tuple[float, float]:
    """Range of the Gaussian blur sigma, in pixels, for views of side ``size``.

    The papers' (0.1, 2.0) px at 224 px, scaled with the side but never under half of it:
    (0.05, 1.0) px up to 112 px (the range BYOL and DINO have used at 28 px), (0.1, 2.0) at 224.
    """
    f = max(size / 224, 0.5)
    return (PAPER_BLUR_SIGMA[0] * f, PAPER_BLUR_SIGMA[1] * f)


def resolve(cfg: ViewConfig, data_name: str) -> ViewConfig:
    """Fill the data-dependent defaults (vflip, rot90, color_jitter, grayscale) of a view config."""
    free = data_name.lower() in ORIENTATION_FREE
    colour_is_class = data_name.lower() in COLOUR_IS_CLASS

    def pick(value: float | None, default: float) -> float:
        return value if value is not None else default

    return dataclasses.replace(
        cfg,
        vflip=pick(cfg.vflip, 0.5 if free else 0.0),
        rot90=pick(cfg.rot90, 0.5 if free else 0.0),
        color_jitter=pick(cfg.color_jitter, 0.0 if colour_is_class else 0.8),
        grayscale=pick(cfg.grayscale, 0.0 if colour_is_class else 0.2),
    )


def geometric_only(cfg: ViewConfig, crop_scale: tuple[float, float]) -> ViewConfig:
    """``cfg`` with every photometric distortion off: crops, flips and rotations only (the views
    of masked-image and reconstruction methods, for which the pixels are the target)."""
    return dataclasses.replace(cfg, crop_scale=crop_scale, color_jitter=0.0, grayscale=0.0, intensity_jitter=0.0,
                               blur=0.0, solarize=0.0, noise=0.0)


def augment(x: torch.Tensor, cfg: ViewConfig, size: int, g: torch.Generator) -> torch.Tensor:
    """One augmented view of a uint8 batch or a float one in [0, 1]: (B, C, *S) -> float
    (B, C, *size), in [0, 1].

    The order is SimCLR's: crop and flip, then photometric distortion, then blur. Geometry is
    one resampling and colour one matrix product per sample (see ops.py). ``cfg`` is a
    :func:`resolve`-d config; a data-dependent field left at None counts as off.
    """
    v = ops.random_geometry(x, size, g, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, cfg.vflip or 0.0,
                            cfg.rot90 or 0.0, cfg.rotation_degrees)  # one resampling
    if x.shape[1] == 3:
        s = cfg.color_jitter_strength
        v = ops.color_jitter(v, cfg.color_jitter or 0.0, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, g, cfg.grayscale or 0.0)
    else:
        v = ops.intensity_jitter(v, cfg.intensity_jitter, cfg.intensity_strength, g)
    if cfg.blur:
        v = ops.gaussian_blur(v, cfg.blur, cfg.blur_sigma, g)
    if cfg.solarize:
        v = ops.random_solarize(v, cfg.solarize, g)
    if cfg.noise:
        v = ops.gaussian_noise(v, cfg.noise, cfg.noise_std, g)
    return v


@dataclass
class ViewRecipe:
    """A list of (view config, output size) pairs plus the input standardisation.

    Attributes:
        views: one (config, size) per view the method consumes, in order.
        mean: per-channel mean of the training images, in [0, 1] units.
        std: per-channel standard deviation.
    """

    views: list[tuple[ViewConfig, int]]
    mean: list[float]
    std: list[float]

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        """(B, C, *S) uint8/float images -> len(views) normalised float views.

        On a CPU, a batch of large images is augmented a few images at a time (about 2^21
        values per chunk: 13 images at 224 px RGB, 170 at 64 px, any batch up to 891 at 28 px), each chunk
        written into the view's output: every op makes a new tensor, and a new 150-MB tensor
        (256 images at 224 px) is fresh memory that the kernel maps page by page, 5x the cost of
        the arithmetic on it; chunks reuse the allocator's memory and stay in cache (2x faster
        views at 224 px, docs/data-at-scale.md). The chunks are spread over ``torch.get_num_threads()``
        threads, each op on one thread: large views crop and resize image by image, which one
        op cannot spread over the cores, and two chunks at once use both cores where one chunk
        on two threads left one waiting. Each chunk draws from its own generator, seeded from
        ``g`` in chunk order, so the views are a function of the seed and the batch whatever the
        number of threads. A batch that fits in one chunk draws from ``g`` itself, as before."""
        mean = torch.tensor(self.mean, device=images.device)
        std = torch.tensor(self.std, device=images.device)
        chunk = len(images)
        if images.device.type == "cpu":
            largest = max(images[0].numel(), *(images.shape[1] * size ** (images.dim() - 2) for _, size in self.views))
            chunk = max(1, _CPU_VIEW_VALUES // largest)
        if chunk >= len(images):
            x = to_float(images)
            return [ops.normalize(augment(x, cfg, size, g), mean, std) for cfg, size in self.views]
        starts = range(0, len(images), chunk)
        views = [torch.empty(len(images), images.shape[1], *[size] * (images.dim() - 2)) for _, size in self.views]
        tasks = [(v, a, int(seed)) for v in range(len(self.views))
                 for a, seed in zip(starts, torch.randint(0, 2 ** 62, (len(starts),), generator=g))]

        def one(task: tuple[int, int, int]) -> None:
            v, a, seed = task
            cfg, size = self.views[v]
            x = augment(images[a:a + chunk], cfg, size, torch.Generator().manual_seed(seed))
            ops.normalize(x, mean, std, out=views[v][a:a + chunk])

        workers = torch.get_num_threads()
        if workers == 1:
            for task in tasks:
                one(task)
        else:
            list(_chunk_pool(workers).map(one, tasks))  # list(): re-raises a worker's exception here
        return views

    def plain(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """The un-augmented, normalised input used for evaluation: (B, C, *S) -> (B, C, *size)."""
        x = to_float(images)
        if size is not None:
            x = ops.center_resize(x, size)
        mean = torch.tensor(self.mean, device=x.device)
        std = torch.tensor(self.std, device=x.device)
        return ops.normalize(x, mean, std)
