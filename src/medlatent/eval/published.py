"""Published MedMNIST results at 28 px, shown beside ours (test split).

MedMNIST v2 (Yang et al., Scientific Data 2023, Table 3): ResNet-18 (28) trained end to end with
all labels. MedMNIST+ (Doerrich et al. 2024): frozen ImageNet-pretrained DINO ViT-B/16 at 28 px
with a linear probe and k-NN.
"""

from __future__ import annotations

PUBLISHED: dict[str, list[dict]] = {
    "bloodmnist": [
        dict(source="MedMNIST v2 ResNet-18 (28), supervised", protocol="supervised", acc=0.958, auc=0.998),
        dict(source="MedMNIST+ frozen ImageNet DINO ViT-B/16 (28)", protocol="linear", acc=0.888, auc=None),
        dict(source="MedMNIST+ frozen ImageNet DINO ViT-B/16 (28)", protocol="knn", acc=0.852, auc=None),
    ],
    "pneumoniamnist": [
        dict(source="MedMNIST v2 ResNet-18 (28), supervised", protocol="supervised", acc=0.854, auc=0.944),
        dict(source="MedMNIST+ frozen ImageNet DINO ViT-B/16 (28)", protocol="linear", acc=0.866, auc=None),
        dict(source="MedMNIST+ frozen ImageNet DINO ViT-B/16 (28)", protocol="knn", acc=0.857, auc=None),
    ],
    "breastmnist": [dict(source="MedMNIST v2 ResNet-18 (28), supervised", protocol="supervised", acc=0.863, auc=0.901)],
    "retinamnist": [dict(source="MedMNIST v2 ResNet-18 (28), supervised", protocol="supervised", acc=0.524, auc=0.717)],
}
