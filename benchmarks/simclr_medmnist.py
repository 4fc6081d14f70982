"""SimCLR pretraining + probes on a MedMNIST subset: ``pretrain_probe.py --method simclr``.

Kept under this name because the README's SimCLR rows were made with it:
    python benchmarks/simclr_medmnist.py --data bloodmnist --epochs 33
    python benchmarks/simclr_medmnist.py --data pneumoniamnist --epochs 80
(--backbone defaults to resnet18-quarter, --budget-min to 30; all pretrain_probe.py options apply.)
"""

import sys

from pretrain_probe import main

if __name__ == "__main__":
    sys.argv[1:1] = ["--method", "simclr"]
    main()
