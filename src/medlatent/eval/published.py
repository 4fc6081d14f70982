"""Published MedMNIST results at 28 px, shown beside ours (test split): the one copy of them.

MedMNIST v2 (Yang et al., Scientific Data 2023, Table 3): ResNet-18 (28) trained end to end with
all labels. MedMNIST+ (Doerrich et al. 2024): frozen ImageNet-pretrained DINO ViT-B/16 at 28 px
with a linear probe and k-NN. The HTML report (``report/html.py``) and the benchmark scripts
(``benchmarks/``) read these rows; nothing else keeps the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

# How a protocol is named inside a row's label.
PROTOCOL_WORDS = {"supervised": "supervised", "linear": "linear probe", "knn": "k-NN"}


@dataclass(frozen=True)
class PublishedResult:
    """One model's published test-split results on one MedMNIST subset.

    Attributes:
        data: MedMNIST subset, e.g. ``bloodmnist``.
        source: the benchmark, as tables name it (``MedMNIST v2``).
        citation: where the numbers stand.
        model: the network, with ``frozen`` where only its features were probed.
        acc, auc: trained end to end with all labels (None: not reported).
        linear_acc, linear_auc: linear probe on the frozen features (None: not reported).
        knn_acc, knn_auc: k-NN on the frozen features (None: not reported).
        size: image side in pixels.
    """

    data: str
    source: str
    citation: str
    model: str
    acc: float | None = None
    auc: float | None = None
    linear_acc: float | None = None
    linear_auc: float | None = None
    knn_acc: float | None = None
    knn_auc: float | None = None
    size: int = 28

    def results(self) -> list[tuple[str, float, float | None]]:
        """``(protocol, ACC, AUC)`` for each protocol reported: supervised, linear, knn, in that order."""
        rows = [("supervised", self.acc, self.auc), ("linear", self.linear_acc, self.linear_auc),
                ("knn", self.knn_acc, self.knn_auc)]
        return [(p, acc, auc) for p, acc, auc in rows if acc is not None]

    def label(self, protocol: str | None = None) -> str:
        """The row's name in a table: ``MedMNIST v2 ResNet-18 (28), supervised``, or
        ``MedMNIST+ frozen ImageNet DINO ViT-B/16 (28)``; with a frozen-feature protocol,
        ``MedMNIST+ frozen ImageNet DINO ViT-B/16, linear probe (28)``."""
        if protocol in (None, "supervised"):
            trained = ", supervised" if self.acc is not None else ""
            return f"{self.source} {self.model} ({self.size}){trained}"
        return f"{self.source} {self.model}, {PROTOCOL_WORDS[protocol]} ({self.size})"


_V2 = ("MedMNIST v2", "Yang et al., Scientific Data 2023, Table 3", "ResNet-18")
_PLUS = ("MedMNIST+", "Doerrich et al. 2024", "frozen ImageNet DINO ViT-B/16")

PUBLISHED: tuple[PublishedResult, ...] = (
    PublishedResult("bloodmnist", *_V2, acc=0.958, auc=0.998),
    PublishedResult("bloodmnist", *_PLUS, linear_acc=0.888, knn_acc=0.852),
    PublishedResult("pneumoniamnist", *_V2, acc=0.854, auc=0.944),
    PublishedResult("pneumoniamnist", *_PLUS, linear_acc=0.866, knn_acc=0.857),
    PublishedResult("breastmnist", *_V2, acc=0.863, auc=0.901),
    PublishedResult("retinamnist", *_V2, acc=0.524, auc=0.717),
)


def published(data: str) -> list[PublishedResult]:
    """The published rows for one data set (none for a data set without any)."""
    return [p for p in PUBLISHED if p.data == data]


def protocol_rows(data: str) -> list[tuple[str, str, float, float | None]]:
    """``(label, protocol, ACC, AUC)``, one per reported protocol: the rows of a results table."""
    return [(p.label(), protocol, acc, auc) for p in published(data) for protocol, acc, auc in p.results()]
