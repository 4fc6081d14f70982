"""Configuration as dataclasses: one per component, defaults explained, unknown keys rejected.

YAML is read only at the CLI edge (:func:`load_yaml`); everything below takes explicit keyword
arguments. :func:`from_dict` builds a (nested) dataclass from a mapping and names the exact key
that is unknown or mistyped, e.g. ``config.yaml: optim.lrr is not a known key (known: name, lr, ...)``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

from medlatent.errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# generic mapping <-> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses.

    Raises:
        ConfigError: on an unknown key or a value of the wrong type, naming ``where.key``.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}.{key} is not a known key (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    obj = cls(**kwargs)
    check_ranges(obj, where, recurse=False)  # nested dataclasses were checked when built
    return obj


def bounded(default: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, ordered: bool = False) -> Any:
    """A dataclass field whose value (or each item of a tuple value) must lie in a range.

    ``ordered=True`` also asks a pair such as ``(low, high)`` to have low <= high. Checked by
    :func:`check_ranges`; None values (optional fields) are not checked.
    """
    return field(default=default, metadata=dict(gt=gt, ge=ge, lt=lt, le=le, ordered=ordered))


def check_ranges(obj: Any, where: str = "config", recurse: bool = True) -> None:
    """Reject out-of-range values of a config dataclass, naming the key.

    Every float must be finite (no NaN or infinity); fields made with :func:`bounded` must lie
    in their range; a dataclass with a ``check(where)`` method (rules across its fields, e.g.
    :meth:`DataConfig.check`) is checked by it too.

    Raises:
        ConfigError: ``where.key: value is out of range (must be > 0)``.
    """
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{where}.{f.name}"
        if dataclasses.is_dataclass(value):
            if recurse:
                check_ranges(value, key)
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            if f.metadata and isinstance(item, (int, float)) and not isinstance(item, bool):
                _check_bounds(item, f.metadata, key, value)
        if f.metadata.get("ordered") and len(items) == 2 and items[0] > items[1]:
            raise ConfigError(f"{key}: {list(value)} must be [low, high] with low <= high")
    check = getattr(obj, "check", None)  # rules across fields (DataConfig: mixture and weights)
    if callable(check):
        check(where)


def _check_bounds(x: float, m: Mapping[str, Any], key: str, value: Any) -> None:
    rules = [("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
             ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")]
    for name, ok, sign in rules:
        if m.get(name) is not None and not ok(x, m[name]):
            wanted = " and ".join(f"{s} {m[n]:g}" for n, _, s in rules if m.get(n) is not None)
            raise ConfigError(f"{key}: {value!r} is out of range (must be {wanted})")


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain data (tuples become lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def apply_set(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override (the CLI's ``--set``) to a config mapping in place;
    the value is read as YAML (``0.1``, ``true``, ``[0.3, 1]``). The result still goes through
    :func:`from_dict`, which checks keys, types and ranges.

    Raises:
        ConfigError: no ``=``, an empty key part, a key through a non-section, or a value that
            is not YAML.
    """
    import yaml

    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    key, raw = assignment.split("=", 1)
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment}: the value {raw!r} is not valid YAML (e.g. 0.1, true, [0.3, 1])") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a one-line ConfigError."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (data, backbone, ...), got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------
# pretraining configuration


@dataclass
class DataConfig:
    """Which images to learn from."""

    # A MedMNIST subset name (see `medlatent data list`), a .npz in MedMNIST layout, a store
    # written by `medlatent data prepare`, or an image folder (class-per-subfolder or flat).
    # With a mixture, the run records its first source here.
    name: str = "bloodmnist"
    # Pretrain one encoder on the union of these data sets' training splits (each anything
    # `name` can be; `--data A --data B`); empty: `name` alone. Every source is read at the run's
    # size (data.size, else the first source's own side); a store or .npz of another size is
    # refused. The run has the largest channel count of its sources: a 1-channel source is
    # repeated to 3 channels for an RGB mixture (gray -> RGB, as timm and torchvision feed gray
    # images to RGB models); any other difference is refused. The sources' labels are not one
    # label space, so a mixture is for self-supervised pretraining; evaluate on one source
    # (`medlatent probe RUN --data NAME`).
    mixture: list[str] = field(default_factory=list)
    # Share of each source in the training batches, one positive weight per source of
    # `mixture` (normalised to sum to 1). None: proportional to each source's training images,
    # i.e. every image of the union once per epoch, as if the sources were one data set. With
    # weights an epoch still holds as many images as the union; a source given more than its
    # size repeats its images (in a new order each time), one given less shows the rest of its
    # images in the next epochs.
    weights: list[float] | None = bounded(None, gt=0)
    # Image side in pixels; None: the data's own (a store's or .npz's side, a folder's first
    # image; MedMNIST subsets 28 px, the CPU working size: 64 px costs ~5x per step on a 2-core
    # machine, and MedMNIST+ ships 64, 128 and 224). A run records the side it used.
    size: int | None = bounded(None, ge=8, le=4096)
    # Where data files live; None means $MEDLATENT_DATA, else ~/.cache/medlatent.
    data_dir: str | None = None
    # Decode processes when `name` is a CSV manifest read without `data prepare` (2: this
    # machine's cores; on a GPU box give it most of the CPU cores).
    workers: int = bounded(2, ge=1, le=256)
    # Split used for pretraining. Labels are never read by the self-supervised methods.
    split: str = "train"
    # Train only on the images of these classes (anomaly detection: the normal classes);
    # None: every image. Evaluation always sees every class.
    classes: list[int] | None = bounded(None, ge=0)
    # 2 for images, 3 for volumes (MedMNIST 3-D subsets, NIfTI folders).
    spatial_dims: int = bounded(2, ge=2, le=3)
    # Intensity normalisation for image folders: "none" keeps 8-bit values, "percentile" maps
    # the 0.5-99.5 percentiles to [0, 1] (robust for 16-bit microscopy/X-ray), "window" uses
    # window_center/window_width (CT in Hounsfield units).
    normalize: Literal["none", "percentile", "window"] = "percentile"
    window_center: float = 40.0
    window_width: float = bounded(400.0, gt=0)
    # Train with the labels of only this stratified, seeded fraction of the split (per class
    # ceil(fraction * n_c), at least one: medlatent.eval.fractions.label_fraction with
    # label_seed, the draw every label-efficiency protocol makes), as a user who has that many
    # labels would; the other images count as unlabelled. Only class-conditional generative
    # models read labels: those that learn the unconditional model alongside (classifier-free
    # guidance's null class, Ho & Salimans 2022: ddpm, ldm) train on the unlabelled images as
    # that class; the others (gan, vae) train on the labelled images only. None: every label.
    # `generate augment --protocol fraction` sets it for each generator it trains.
    label_fraction: float | None = bounded(None, gt=0, le=1)
    # Seed of the label_fraction draw (the classifier's seed for the same fraction draws the same images).
    label_seed: int = bounded(0, ge=0)

    def check(self, where: str = "data") -> None:
        """Rules across fields: a mixture names two or more distinct sources, ``weights`` has
        one entry per source, ``classes`` (one data set's class indices) needs a single source,
        and ``label_fraction`` needs a single source with all its classes.

        Raises:
            ConfigError: naming ``data.mixture``, ``data.weights`` or ``data.classes``.
        """
        if len(self.mixture) == 1:
            raise ConfigError(f"{where}.mixture: names one data set ({self.mixture[0]}); a mixture needs two or "
                              f"more (for one, give data.name)")
        seen = [m for i, m in enumerate(self.mixture) if m in self.mixture[:i]]
        if seen:
            raise ConfigError(f"{where}.mixture: {seen[0]} is named twice")
        if self.weights is not None:
            if not self.mixture:
                raise ConfigError(f"{where}.weights: needs data.mixture (one weight per source); a single data "
                                  f"set has no weights")
            if len(self.weights) != len(self.mixture):
                raise ConfigError(f"{where}.weights: {len(self.weights)} weights for the {len(self.mixture)} "
                                  f"sources of data.mixture ({', '.join(self.mixture)}); give one per source")
        if self.mixture and self.classes is not None:
            raise ConfigError(f"{where}.classes: selects classes of one data set; a mixture's sources have no "
                              f"common label space")
        if self.label_fraction is not None and (self.mixture or self.classes is not None):
            raise ConfigError(f"{where}.label_fraction: draws labels of one data set's whole split; it cannot be "
                              f"combined with data.{'mixture' if self.mixture else 'classes'}")


@dataclass
class BackboneConfig:
    """The encoder whose representation is learned."""

    # resnet18 (64-128-256-512), resnet18-half (32-64-128-256), resnet18-quarter (16-32-64-128),
    # resnet50 (bottleneck blocks 3-4-6-3, 2048-d), vit-tiny (dim 192), vit-small (ViT-S: dim 384,
    # 6 heads) or vit-base (ViT-B: dim 768, 12 heads), ViTs 12 blocks deep. Quarter width is the CPU
    # default: on the 2-core CI host it runs 3.3x faster than half width, and with the same
    # 10 minutes of SimCLR on BloodMNIST its linear probe reached 0.852 test ACC against 0.826.
    # On a GPU, choose resnet18.
    name: str = "resnet18-quarter"
    # ViT patch side; None picks 4 px for <= 32 px images, 8 for <= 64, else 16 (7-8 patches a side).
    patch_size: int | None = bounded(None, ge=1)
    # ViT depth; None keeps the preset's 12 blocks (fewer train faster on a CPU).
    depth: int | None = bounded(None, ge=1)
    # ViT read-out for probes and fine-tuning: the CLS token, or the mean of the patch tokens
    # (the I-JEPA paper's probe). CLS is the default for every method: on our two 5 CPU-minute
    # I-JEPA runs it gave the higher linear probe (0.839 vs 0.789, 0.849 vs 0.837; README).
    pool: Literal["cls", "mean"] = "cls"
    # ResNet first layers: "cifar" (3x3 stride 1, no max-pool) or "imagenet" (7x7 stride 2 +
    # max-pool, He et al. 2016). None picks by image size: cifar below 128 px (at 28 px the
    # ImageNet stem would leave 7 px for the first stage), imagenet from 128 px (13x faster
    # than the cifar stem there on this CPU; a 224-px image then costs what it costs everyone).
    stem: Literal["cifar", "imagenet"] | None = None
    # Start from existing weights instead of random ones (continued pretraining, as REMEDIS
    # does): a medlatent run folder, or a .safetensors/.pt/.pth state dict in MONAI, timm,
    # DINO/DINOv2, MAE or torchvision layout. Tensors matching by name and shape are loaded and
    # the rest reported; heads and teachers are built around the loaded encoder. None: random.
    init: str | None = None


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    # adamw needs no LR tuning across batch sizes at this scale; lars is SimCLR's choice for
    # large batches; sgd for reference.
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    # Peak learning rate for batch 256, scaled linearly with batch size (Goyal et al. 2017).
    lr: float = bounded(2e-3, gt=0)
    # Weight decay (not applied to biases and normalisation weights).
    weight_decay: float = bounded(1e-4, ge=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    # AdamW betas; GANs use a smaller beta1 (0.5, Radford et al. 2016) for less lag between
    # the two networks.
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    # Linear warm-up, then cosine decay to final_lr_fraction * lr (SimCLR, Chen et al. 2020).
    # The warm-up is capped at a fifth of the run's steps.
    warmup_epochs: float = bounded(2.0, ge=0)
    final_lr_fraction: float = bounded(0.01, ge=0, le=1)
    # Clip the global gradient norm; None disables. Guards the first steps of contrastive training.
    clip_grad_norm: float | None = bounded(5.0, gt=0)


@dataclass
class TrainConfig:
    """How long and how to run."""

    # Passes over the training split; a fraction is allowed (1.5: the schedule spans
    # round(1.5 x steps per epoch) steps), so a wall-clock budget can be filled exactly.
    epochs: float = bounded(30, gt=0)
    # Global batch (split across processes under torchrun). Contrastive methods want many
    # negatives; 256 fits a 2-core CPU at 28 px.
    batch_size: int = bounded(256, ge=2)
    # Weight initialisation, data order, views and masks all derive from it (step-indexed, so a
    # resumed run draws what the uninterrupted one would have).
    seed: int = bounded(0, ge=0)
    # auto: bf16 autocast where the hardware has bf16 matmul (AVX-512 BF16/AMX CPUs, Ampere+
    # GPUs), else fp32. bf16 is ~3x faster on a Zen 4 CPU but ~12x slower on an AVX2-only one.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto: channels_last for convolutional encoders (1.2-3x on CPU), not for ViTs.
    channels_last: Literal["auto", "on", "off"] = "auto"
    # torch.compile the encoder: ~1.2x faster steps on CPU after a 40-90 s first step.
    compile: bool = False
    # Save a checkpoint every this many optimiser steps (0: at the end of every epoch).
    checkpoint_every: int = bounded(0, ge=0)
    # Also save at least every this many seconds, so a killed run loses little (0: off).
    checkpoint_seconds: float = bounded(600.0, ge=0)
    # Checkpoints kept on disk (the newest ones).
    keep_checkpoints: int = bounded(2, ge=1)
    # Write a metrics line every this many steps.
    log_every: int = bounded(10, ge=1)
    # Draw a 2-D map of the val embeddings (t-SNE, or UMAP if installed; coloured by label)
    # into <run>/maps/epoch-XXXX.png every this many epochs, and before the first, to watch the
    # representation form (0: off). Costs a few seconds per map on a CPU.
    map_every: int = bounded(0, ge=0)
    # auto: CUDA if available, else CPU.
    device: str = "auto"
    # Stop after this many seconds of training (a wall-clock budget); 0 means no limit. The
    # schedule still spans `epochs`, so a budgeted run is a truncated run, not a shorter one.
    time_budget_s: float = bounded(0.0, ge=0)
    # Experiment trackers written beside metrics.jsonl, inside the run folder: "tensorboard"
    # (<run>/tensorboard/) and/or "mlflow" (<run>/mlruns/, or $MLFLOW_TRACKING_URI). They get
    # every metric by step, this config as flattened parameters, the final metrics and the
    # figures. Optional packages: pip install 'medlatent[track]'. Empty: metrics.jsonl only.
    log: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)
    # The global batch is cut into this many equal slices and slice k's views are drawn from a
    # generator seeded by (seed, step, k), so the views do not depend on how many processes
    # share the batch: one process with view_shards=2 draws what two processes draw. None: the
    # number of processes (one process: one slice, as runs always drew). Must be a multiple of
    # the number of processes and divide batch_size.
    view_shards: int | None = bounded(None, ge=1)


@dataclass
class ViewConfig:
    """How a batch of images becomes augmented views (see medlatent.augment.views)."""

    # Random resized crop: area fraction range. SimCLR uses (0.08, 1) at 224 px; at 28 px such
    # small crops keep too little of a cell or lung, so the floor is raised.
    crop_scale: tuple[float, float] = bounded((0.25, 1.0), gt=0, le=1, ordered=True)
    crop_ratio: tuple[float, float] = bounded((0.75, 4 / 3), gt=0, ordered=True)
    hflip: float = bounded(0.5, ge=0, le=1)
    # Vertical flips and 90-degree rotations: right for microscopy and pathology, where
    # orientation carries no meaning; wrong for chest X-rays. None lets the data set decide.
    vflip: float | None = bounded(None, ge=0, le=1)
    rot90: float | None = bounded(None, ge=0, le=1)
    # Free rotation in degrees (0 disables).
    rotation_degrees: float = bounded(0.0, ge=0, le=180)
    # RGB colour jitter (SimCLR strength s: brightness/contrast/saturation 0.8s, hue 0.2s) and
    # random grayscale. None lets the data set decide: SimCLR's 0.8 and 0.2, except where the
    # stain colour is what tells the classes apart (blood smears), where both are off.
    color_jitter: float | None = bounded(None, ge=0, le=1)
    color_jitter_strength: float = bounded(0.5, ge=0)
    grayscale: float | None = bounded(None, ge=0, le=1)
    # Grayscale intensity jitter (brightness, contrast, gamma) in place of colour jitter.
    intensity_jitter: float = bounded(0.8, ge=0, le=1)
    intensity_strength: float = bounded(0.4, ge=0)
    blur: float = bounded(0.0, ge=0, le=1)
    blur_sigma: tuple[float, float] = bounded((0.1, 2.0), gt=0, ordered=True)
    solarize: float = bounded(0.0, ge=0, le=1)
    noise: float = bounded(0.0, ge=0, le=1)
    noise_std: float = bounded(0.05, ge=0)


@dataclass
class PretrainConfig:
    """Everything a training run of any family needs (the name is historical: it also describes
    generative, restoration and anomaly-detector runs); written resolved into the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # A method name from medlatent.methods.registry (simclr, ...).
    method: str = "simclr"
    # Keyword arguments of the method's own config dataclass; unknown keys are rejected.
    method_options: dict[str, Any] = field(default_factory=dict)
    views: ViewConfig = field(default_factory=ViewConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
