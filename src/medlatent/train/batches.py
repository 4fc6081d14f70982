"""Reading each step's images from the store: kept on the device, or gathered by index.

A small store is copied to the training device once and each step indexes it there (what the
loop always did). A store that should not be copied whole, because it is a memory-mapped file
(``torch.from_numpy(np.load(path, mmap_mode="c"))``, tens of GB) or larger than half the free
device memory, stays where it is: each step gathers its rows on the CPU, pins them when the
device is CUDA and copies them ``non_blocking``. One batch is read ahead by a single background
thread, so the next step's disk / page-cache read overlaps this step's compute (torch releases
the GIL while it indexes). Either way a step sees exactly ``images[index]``, so which path is
taken never changes the numbers.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from medlatent.data.mixture import MixedImages


def is_file_backed(images: torch.Tensor) -> bool:
    """True when ``images`` lives in a memory mapping of a file (``np.load(mmap_mode=...)``,
    ``torch.from_file``), read from ``/proc/self/maps``; False where that cannot be read (not
    Linux), for tensors off the CPU and for ordinary (anonymous) memory."""
    if images.device.type != "cpu" or images.numel() == 0:
        return False
    ptr = images.untyped_storage().data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)  # range perms offset dev inode [path]
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= ptr < high:
                    return len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/")
    except (OSError, ValueError, IndexError):
        return False
    return False


def keep_on_device(images: torch.Tensor, device: torch.device) -> bool:
    """The rule for keeping the whole store on ``device`` and indexing it there: never for a
    memory-mapped file (even on the CPU, where gathering in the background overlaps the disk
    reads); yes when it is already there; on the CPU always (nothing is copied); on a GPU when
    it takes at most half of the free device memory. Images that are not a tensor (decoded
    on demand from a CSV manifest) are always read by index. A mixture of data sets
    (:class:`~medlatent.data.mixture.MixedImages`) is kept when every source could be, their
    stored bytes together counted against the device memory."""
    parts = images.parts if isinstance(images, MixedImages) else [images]
    if not all(isinstance(p, torch.Tensor) for p in parts) or any(is_file_backed(p) for p in parts):
        return False
    if all(p.device == device for p in parts) or device.type == "cpu":
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return sum(p.nbytes for p in parts) <= free // 2
    return True


class BatchReader:
    """``images[index]`` on ``device`` for each step, read ahead by one batch when the store
    stays off the device.

    Args:
        images: the store (N, C, *S), on any device, possibly memory-mapped.
        device: the training device.
        resident: copy the store to the device once (True), gather each batch by index (False),
            or decide by :func:`keep_on_device` (None).
    """

    def __init__(self, images: torch.Tensor, device: torch.device, resident: bool | None = None) -> None:
        self.device = device
        self.resident = keep_on_device(images, device) if resident is None else resident
        self.images = images.to(device) if self.resident else images
        self._pool = None if self.resident else ThreadPoolExecutor(1, thread_name_prefix="medlatent-read")
        self._ahead: tuple[torch.Tensor, Future[torch.Tensor]] | None = None

    def read(self, index: torch.Tensor, next_index: torch.Tensor | None = None) -> torch.Tensor:
        """The rows ``index`` (B,) of the store on the device, (B, C, *S); starts reading
        ``next_index`` (the next step's rows) in the background."""
        if self.resident:
            return self.images[index.to(self.device)]
        index = index.cpu()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and torch.equal(ahead[0], index):
            batch = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # not this batch after all (a resume or a skipped step): dropped
            batch = self._gather(index)
        if next_index is not None and self._pool is not None:
            nxt = next_index.cpu()
            self._ahead = (nxt, self._pool.submit(self._gather, nxt))
        return batch.to(self.device, non_blocking=True)

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` (B,) -> (B, C, *S); only these rows are read from the file.

        A CPU tensor is gathered by numpy, on this thread alone: torch's indexing would start a
        second OpenMP team of workers beside the training thread's (with the OpenMP build, two
        threads of two workers each on two cores), which slowed 224-px views by a third."""
        if isinstance(self.images, torch.Tensor) and self.images.device.type == "cpu":
            batch = torch.from_numpy(self.images.numpy()[index.numpy()])
        else:
            batch = self.images[index]
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def close(self) -> None:
        """Stop the read-ahead thread (a batch still being read is finished, then dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._ahead = None
