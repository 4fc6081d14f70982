"""The MedMNIST catalogue: every 2-D and 3-D subset with its official file, md5, task and labels.

Facts are those of the official ``medmnist/info.py`` (medmnist 3.0.2, MedMNIST v3 files on
Zenodo record 10519652) and the MedMNIST v2 paper (Yang et al., Scientific Data 2023). The
``medmnist`` package itself is not a dependency: it needs torchvision. This module imports
nothing heavy, so ``medlatent data list`` is instant.
"""

from __future__ import annotations

from dataclasses import dataclass

ZENODO = "https://zenodo.org/records/10519652/files"

# MedMNIST task names, exactly as MedMNIST's evaluator spells them.
MULTI_CLASS = "multi-class"
BINARY = "binary-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
TASKS = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)


@dataclass(frozen=True)
class MedMNISTInfo:
    """One MedMNIST subset.

    Attributes:
        name: flag used in file names, e.g. ``bloodmnist``.
        task: one of :data:`TASKS`.
        labels: class (or, for multi-label, finding) names in label order.
        channels: 1 (grayscale) or 3 (RGB).
        splits: number of images in the train, val and test splits.
        md5: official md5 of the file for each image size (28 is the plain ``name.npz``).
        licence: data licence.
        spatial_dims: 2 for images, 3 for 28^3 / 64^3 volumes.
        modality: what the images show, for the catalogue listing.
    """

    name: str
    task: str
    labels: tuple[str, ...]
    channels: int
    splits: dict[str, int]
    md5: dict[int, str]
    licence: str
    spatial_dims: int
    modality: str

    def filename(self, size: int = 28) -> str:
        """File name for one image size: ``bloodmnist.npz`` (28) or ``bloodmnist_64.npz``."""
        return f"{self.name}.npz" if size == 28 else f"{self.name}_{size}.npz"

    def url(self, size: int = 28) -> str:
        """Official download address for one image size."""
        return f"{ZENODO}/{self.filename(size)}?download=1"

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.md5))

    @property
    def n_classes(self) -> int:
        return len(self.labels)


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
           "liver", "lung-left", "lung-right", "pancreas", "spleen")


def _e(name: str, task: str, labels: tuple[str, ...], channels: int, n: tuple[int, int, int],
       md5: tuple[str, ...], modality: str, licence: str = "CC BY 4.0") -> MedMNISTInfo:
    spatial_dims = 3 if name.endswith("3d") else 2
    sizes = (28, 64) if spatial_dims == 3 else (28, 64, 128, 224)
    return MedMNISTInfo(name, task, labels, channels, dict(train=n[0], val=n[1], test=n[2]),
                        dict(zip(sizes, md5, strict=True)), licence, spatial_dims, modality)


CATALOGUE: dict[str, MedMNISTInfo] = {e.name: e for e in [
    _e("pathmnist", MULTI_CLASS, ("adipose", "background", "debris", "lymphocytes", "mucus",
       "smooth muscle", "normal colon mucosa", "cancer-associated stroma",
       "colorectal adenocarcinoma epithelium"), 3, (89996, 10004, 7180),
       ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
        "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
       "colon pathology (H&E)"),
    _e("chestmnist", MULTI_LABEL, ("atelectasis", "cardiomegaly", "effusion", "infiltration",
       "mass", "nodule", "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema",
       "fibrosis", "pleural", "hernia"), 1, (78468, 11219, 22433),
       ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
        "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
       "chest X-ray"),
    _e("dermamnist", MULTI_CLASS, ("actinic keratoses and intraepithelial carcinoma",
       "basal cell carcinoma", "benign keratosis-like lesions", "dermatofibroma", "melanoma",
       "melanocytic nevi", "vascular lesions"), 3, (7007, 1003, 2005),
       ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
        "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
       "dermatoscope", licence="CC BY-NC 4.0"),
    _e("octmnist", MULTI_CLASS, ("choroidal neovascularization", "diabetic macular edema",
       "drusen", "normal"), 1, (97477, 10832, 1000),
       ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
        "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
       "retinal OCT"),
    _e("pneumoniamnist", BINARY, ("normal", "pneumonia"), 1, (4708, 524, 624),
       ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
        "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
       "paediatric chest X-ray"),
    _e("retinamnist", ORDINAL, ("0", "1", "2", "3", "4"), 3, (1080, 120, 400),
       ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
        "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
       "fundus camera (DR grade)"),
    _e("breastmnist", BINARY, ("malignant", "normal, benign"), 1, (546, 78, 156),
       ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
        "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
       "breast ultrasound"),
    _e("bloodmnist", MULTI_CLASS, ("basophil", "eosinophil", "erythroblast",
       "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
       "monocyte", "neutrophil", "platelet"), 3, (11959, 1712, 3421),
       ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
        "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
       "blood cell microscope"),
    _e("tissuemnist", MULTI_CLASS, ("Collecting Duct, Connecting Tubule",
       "Distal Convoluted Tubule", "Glomerular endothelial cells",
       "Interstitial endothelial cells", "Leukocytes", "Podocytes",
       "Proximal Tubule Segments", "Thick Ascending Limb"), 1, (165466, 23640, 47280),
       ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
        "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
       "kidney cortex microscope"),
    _e("organamnist", MULTI_CLASS, _ORGANS, 1, (34561, 6491, 17778),
       ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
        "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
       "abdominal CT (axial)"),
    _e("organcmnist", MULTI_CLASS, _ORGANS, 1, (12975, 2392, 8216),
       ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
        "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
       "abdominal CT (coronal)"),
    _e("organsmnist", MULTI_CLASS, _ORGANS, 1, (13932, 2452, 8827),
       ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
        "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
       "abdominal CT (sagittal)"),
    _e("organmnist3d", MULTI_CLASS, ("liver", "kidney-right", "kidney-left", "femur-right",
       "femur-left", "bladder", "heart", "lung-right", "lung-left", "spleen", "pancreas"), 1,
       (971, 161, 610),
       ("a0c5a1ff56af4f155c46d46fbb45a2fe", "58a2205adf14a9d0a189cb06dc78bf10"),
       "abdominal CT (3-D)"),
    _e("nodulemnist3d", BINARY, ("benign", "malignant"), 1, (1158, 165, 310),
       ("8755a7e9e05a4d9ce80a24c3e7a256f3", "c47c5b7d457bf6332200d2ea6d64ecd8"),
       "chest CT (3-D)"),
    _e("adrenalmnist3d", BINARY, ("normal", "hyperplasia"), 1, (1188, 98, 298),
       ("bbd3c5a5576322bc4cdfea780653b1ce", "17721accfe9fb005146a47d33bc54b2f"),
       "shape from abdominal CT (3-D)"),
    _e("fracturemnist3d", MULTI_CLASS, ("buckle rib fracture", "nondisplaced rib fracture",
       "displaced rib fracture"), 1, (1027, 103, 240),
       ("6aa7b0143a6b42da40027a9dda61302f", "f01d7e6316aedf4210da0da5b7437b42"),
       "chest CT (3-D)"),
    _e("vesselmnist3d", BINARY, ("vessel", "aneurysm"), 1, (1335, 191, 382),
       ("b41fd4f7e7e2feedddb201585ecafa1b", "6bb274a8846e1097066dcd64e2c4520f"),
       "shape from brain MRA (3-D)"),
    _e("synapsemnist3d", BINARY, ("inhibitory synapse", "excitatory synapse"), 1,
       (1230, 177, 352),
       ("1235b78a3cd6280881dd7850a78eadb6", "43bd14ebf3af9d3dd072446fedc14d5e"),
       "electron microscope (3-D)"),
]}


def get_info(name: str) -> MedMNISTInfo:
    """Catalogue entry by name (case-insensitive); an unknown name lists the known ones."""
    from medlatent.errors import DataError

    key = name.lower()
    if key not in CATALOGUE:
        raise DataError(f"unknown MedMNIST subset '{name}' (known: {', '.join(CATALOGUE)})")
    return CATALOGUE[key]


def split_size(name: str, split: str = "train") -> int | None:
    """Images in one split (``train``, ``val``, ``test``) of a catalogued subset; None for a name
    the catalogue does not hold (an ``.npz`` file or an image folder)."""
    info = CATALOGUE.get(name.lower())
    return info.splits[split] if info else None
