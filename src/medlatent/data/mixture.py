"""One training set from several data sets: the union of their splits, read by index.

``--data bloodmnist --data pneumoniamnist ...`` (``DataConfig.mixture``) trains one encoder on
the union of the sources' training splits. Nothing is concatenated: a split's images are a
:class:`MixedImages`, a tensor-like over each source's own images (in memory or memory-mapped),
whose ``[index]`` gathers the rows from the sources they belong to. The rules:

* Channels: the mixture has the largest channel count of its sources; a 1-channel source of
  a 3-channel mixture is repeated to 3 channels when its rows are read (gray -> RGB, what timm
  and torchvision do with gray inputs to RGB models), so its rows stay 1-channel in memory. Any
  other difference is refused, naming the source.
* Sizes and dimensions: every source has the run's side and spatial dimensions (checked by the
  caller that loads them, :func:`medlatent.data.sources.load_dataset`).
* Labels: each source keeps its own (``Dataset.parts``) and every row has a source id
  (:meth:`MixedImages.source_ids`); the mixture itself is unlabelled, because the sources'
  classes are not one label space.
* Channel statistics: over the union's training split (each source's statistics, pooled by
  its number of images).
* Batch shares: by default every image of the union once per epoch (:func:`epoch_batches` over
  the union), so each source's share is its share of the images; with ``data.weights`` the
  epoch holds each source in its requested share (:func:`mixture_batches`). Either order is a
  pure function of (seed, epoch), so a resumed run sees the batches an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from medlatent.data.store import Dataset, ImageSet, channel_stats, epoch_batches, mix_seed, to_float
from medlatent.errors import DataError


def mixed_channels(name: str, channels: int, target: int) -> None:
    """The channel rule: ``channels`` may become ``target`` only if they are equal or a
    1-channel source meets a 3-channel run.

    Raises:
        DataError: ``name: has 4-channel images, the mixture 3; ...``.
    """
    if channels != target and not (channels == 1 and target == 3):
        raise DataError(f"{name}: has {channels}-channel images but the run takes {target} channels; only "
                        f"1-channel (gray) images are repeated to 3 (RGB), any other difference is refused")


class MixedImages:
    """The images of several sources as one read-only ``(N, C, *S)`` batch source.

    It answers what runs ask of an image tensor: ``len``, ``shape``, ``dtype``, ``device``,
    ``dim()``, ``[index]`` for an int, a slice or an index tensor (the result is a real
    tensor, rows in the order asked), ``to(device)`` and ``subset(positions)``. Row ``i`` of
    the union is row ``i - start[k]`` of source ``k``, the sources in order.

    Args:
        parts: each source's images, (N_k, C_k, *S), uint8 or float32 in [0, 1]: tensors (in
            memory or memory-mapped) or tensor-likes such as ``DecodedImages``.
        names: a name per source (for errors and descriptions).
        channels: the mixture's channel count C; a 1-channel part of a 3-channel mixture is
            repeated when read.
        shares: each source's share of the training batches (summing to 1), or None for
            proportional to its images (see :func:`batch_order`).
    """

    def __init__(self, parts: Sequence[Any], names: Sequence[str], channels: int,
                 shares: Sequence[float] | None = None) -> None:
        if not parts or len(parts) != len(names):
            raise ValueError(f"{len(parts)} parts for {len(names)} names")
        spatial = {tuple(p.shape[2:]) for p in parts}
        if len(spatial) != 1:
            raise DataError(f"{', '.join(names)}: images of different sizes {sorted(spatial)} cannot be mixed")
        for part, name in zip(parts, names):
            mixed_channels(name, int(part.shape[1]), channels)
        self.parts, self.names, self.channels = list(parts), list(names), channels
        self.shares = None if shares is None else [float(s) for s in shares]
        self.sizes = [len(p) for p in parts]
        self.starts = torch.tensor([0] + self.sizes[:-1]).cumsum(0)  # (K,) first row of each source
        self._ends = torch.tensor(self.sizes).cumsum(0)  # (K,) one past its last row
        self.shape = torch.Size((sum(self.sizes), channels) + tuple(parts[0].shape[2:]))
        self.dtype = torch.uint8 if all(p.dtype == torch.uint8 for p in parts) else torch.float32
        self.device = torch.device(getattr(parts[0], "device", "cpu"))

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the sources as stored (a 1-channel source counts once, not three times)."""
        return sum(int(p.nbytes) for p in self.parts)

    def source_ids(self) -> torch.Tensor:
        """(N,) int64: which source (its position in ``names``) each row comes from."""
        return torch.repeat_interleave(torch.arange(len(self.parts)), torch.tensor(self.sizes))

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> torch.Tensor:
        """Rows of the union: an int -> (C, *S); a slice or (B,) positions -> (B, C, *S)."""
        if isinstance(index, int):
            i = index + len(self) if index < 0 else index
            return self[torch.tensor([i])][0]
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero()[:, 0]
        index = index.reshape(-1).long()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} images")
        source = torch.bucketize(index, self._ends.to(index.device), right=True)  # (B,) source of each row
        out = torch.empty((len(index),) + tuple(self.shape[1:]), dtype=self.dtype, device=self.device)
        for k in source.unique().tolist():
            rows = (source == k).nonzero()[:, 0]  # positions in the batch
            local = index[rows] - int(self.starts[k])  # rows of source k
            out[rows.to(self.device)] = self._read(k, local)
        return out

    def _read(self, k: int, local: torch.Tensor) -> torch.Tensor:
        """Rows ``local`` of source ``k`` as the mixture's channels and dtype, (b, C, *S)."""
        part = self.parts[k]
        x = part[local.to(self.device) if isinstance(part, torch.Tensor) else local]  # only these rows are read
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, *x.shape[2:])  # gray -> RGB: the one channel repeated
        return to_float(x) if self.dtype != x.dtype else x

    def to(self, device: torch.device | str) -> "MixedImages":
        """The same sources on ``device`` (each as stored: a gray source stays 1-channel there)."""
        if torch.device(device) == self.device:
            return self
        return MixedImages([p.to(device) for p in self.parts], self.names, self.channels, self.shares)

    def subset(self, positions: list[int]) -> "MixedImages | torch.Tensor":
        """The rows at ``positions``: sorted positions stay lazy (a MixedImages over each
        source's rows); any other order is read as one tensor."""
        pos = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        if len(pos) == 0 or bool((pos[1:] < pos[:-1]).any()):
            return self[pos]
        source = torch.bucketize(pos, self._ends, right=True)
        parts, names = [], []
        for k in source.unique().tolist():
            local = pos[source == k] - int(self.starts[k])
            part = self.parts[k]
            if hasattr(part, "subset") and not isinstance(part, torch.Tensor):
                parts.append(part.subset(local.tolist()))
            elif torch.equal(local, torch.arange(int(local[0]), int(local[0]) + len(local))):
                parts.append(part[int(local[0]):int(local[0]) + len(local)])  # a run of rows: a view
            else:
                parts.append(part[local])
            names.append(self.names[k])
        return MixedImages(parts, names, self.channels)


# ------------------------------------------------------------------------------ building


def mix_datasets(parts: Sequence[Dataset], weights: Sequence[float] | None = None,
                 stats_split: str = "train") -> Dataset:
    """The union of ``parts`` (each loaded at the run's size) as one unlabelled Dataset.

    Every split that all sources have becomes a :class:`MixedImages` split; the source Datasets
    are kept in ``parts`` (their labels with them); ``stats`` holds the per-channel mean and std
    of the union's ``stats_split``.

    Raises:
        DataError: a source whose channels cannot join the mixture (:func:`mixed_channels`), or
            whose spatial dimensions or side differ from the first source's.
    """
    first = parts[0]
    names = [p.name for p in parts]
    channels = max(p.channels for p in parts)
    for p in parts:
        label = p.source or p.name
        mixed_channels(label, p.channels, channels)
        if p.spatial_dims != first.spatial_dims:
            raise DataError(f"{label}: has {p.spatial_dims}-D images, the mixture's first source "
                            f"{first.source or first.name} {first.spatial_dims}-D; a mixture's sources must agree")
        if p.image_size != first.image_size:
            raise DataError(f"{label}: holds {p.image_size}-px images, the run {first.image_size} px; every "
                            f"source of data.mixture must have the run's size")
    total = float(sum(weights)) if weights is not None else 0.0
    shares = None if weights is None else [w / total for w in weights]
    common = [s for s in first.splits if all(s in p.splits for p in parts)]
    splits = {s: ImageSet(MixedImages([p.splits[s].images for p in parts], names, channels,
                                      shares if s == stats_split else None)) for s in common}
    ds = Dataset("+".join(names), None, (), splits, "mixture of " + ", ".join(p.source or p.name for p in parts),
                 info=dict(mixture="yes"), parts=list(parts))
    if stats_split in splits:
        ds.stats = pooled_stats([_stats(p, stats_split, channels) for p in parts],
                                [len(p.splits[stats_split]) for p in parts])
    return ds


def _stats(part: Dataset, split: str, channels: int) -> tuple[list[float], list[float]]:
    """A source's per-channel mean and std of ``split``, repeated to ``channels`` when gray."""
    mean, std = part.stats if part.stats is not None and split == "train" else \
        channel_stats(part.splits[split].images)
    if len(mean) != channels:
        mean, std = mean * channels, std * channels
    return list(mean), list(std)


def pooled_stats(stats: Sequence[tuple[list[float], list[float]]],
                 counts: Sequence[int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a union from each part's (mean, std) and its number of
    images (same image size, so images count alike): mean = sum w_k m_k, var = sum w_k (s_k^2 +
    m_k^2) - mean^2 with w_k = n_k / N."""
    w = torch.tensor(counts, dtype=torch.float64) / max(sum(counts), 1)  # (K,)
    m = torch.tensor([s[0] for s in stats], dtype=torch.float64)  # (K, C)
    sd = torch.tensor([s[1] for s in stats], dtype=torch.float64)  # (K, C)
    mean = (w[:, None] * m).sum(0)
    var = (w[:, None] * (sd ** 2 + m ** 2)).sum(0) - mean ** 2
    return mean.float().tolist(), var.clamp_min(0).sqrt().float().clamp_min(1e-3).tolist()


def with_channels(data: Dataset, channels: int) -> Dataset:
    """``data`` as ``channels``-channel images by the mixture's rule (a 1-channel data set read
    as 3 channels for an RGB encoder); itself when it already has them. Labels are kept.

    Raises:
        DataError: any other channel difference, naming the data.
    """
    if data.channels == channels:
        return data
    mixed_channels(data.source or data.name, data.channels, channels)
    splits = {s: dataclasses.replace(v, images=MixedImages([v.images], [data.name], channels))
              for s, v in data.splits.items()}
    stats = None if data.stats is None else (data.stats[0] * channels, data.stats[1] * channels)
    return dataclasses.replace(data, splits=splits, stats=stats)


# ------------------------------------------------------------------------------ batch order


def shares_counts(shares: Sequence[float], n: int) -> list[int]:
    """``n`` images split by ``shares`` into whole counts that sum to ``n`` (largest
    remainder: each count is floor(share * n), the rest go to the largest fractions, ties to
    the first source)."""
    raw = [s * n for s in shares]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[:n - sum(counts)]:
        counts[k] += 1
    return counts


def mixture_batches(sizes: Sequence[int], shares: Sequence[float], batch_size: int, seed: int, epoch: int,
                    drop_last: bool = True) -> list[torch.Tensor]:
    """Index batches (rows of the union) of one epoch in which source k takes ``shares[k]`` of
    the rows; the order is a pure function of (seed, epoch).

    The epoch holds N = sum(sizes) rows: ``shares_counts(shares, N)[k]`` of source k. Each
    source's rows come from its own endless stream, one seeded permutation of its images after
    another (permutation c from (seed, k, c)), and epoch e takes the stream's next ``count_k``
    positions (from e * count_k on): an oversampled source repeats its images only after all
    were seen, an undersampled one shows the rest in the following epochs. The chosen rows are
    then shuffled together by (seed, epoch), so every batch holds the sources in about their
    shares (over an epoch exactly, less what ``drop_last`` cuts).
    """
    n = sum(sizes)
    counts = shares_counts(shares, n)
    rows, start = [], 0
    for k, (size, count) in enumerate(zip(sizes, counts)):
        if count:
            first = epoch * count  # position in source k's stream
            cycles = range(first // size, (first + count - 1) // size + 1)
            stream = torch.cat([torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(seed, k, c, 0x313)))
                                for c in cycles])
            offset = first - cycles[0] * size
            rows.append(start + stream[offset:offset + count])
        start += size
    union = torch.cat(rows)  # (N,)
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED))
    union = union[torch.randperm(n, generator=g)]
    stop = (n // batch_size) * batch_size if drop_last else n
    if stop == 0:
        raise DataError(f"{n} images are fewer than one batch of {batch_size}; lower train.batch_size")
    return list(union[:stop].split(batch_size))


def batch_order(images: Any, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The training loop's index batches for ``epoch``: :func:`mixture_batches` for a mixture
    with explicit shares, else :func:`epoch_batches` over all rows (the union of a
    proportional mixture is shuffled as one data set)."""
    if isinstance(images, MixedImages) and images.shares is not None:
        return mixture_batches(images.sizes, images.shares, batch_size, seed, epoch)
    return epoch_batches(len(images), batch_size, seed, epoch)
