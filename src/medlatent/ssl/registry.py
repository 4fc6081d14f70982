"""Method registry: name -> MethodSpec. A new method is one file with a SPEC, listed here."""

from __future__ import annotations

import importlib

from medlatent.errors import ConfigError
from medlatent.ssl.base import MethodSpec

# name -> module defining SPEC; imported on demand so listing methods stays cheap.
METHODS: dict[str, str] = {
    "simclr": "medlatent.ssl.simclr",
    "mocov2": "medlatent.ssl.mocov2",
    "mocov3": "medlatent.ssl.mocov3",
    "byol": "medlatent.ssl.byol",
    "dino": "medlatent.ssl.dino",
    "mae": "medlatent.ssl.mae",
    "ijepa": "medlatent.ssl.ijepa",
    "rotation": "medlatent.ssl.rotation",
    "autoencoder": "medlatent.ssl.autoencoder",
    "denoising-autoencoder": "medlatent.ssl.autoencoder:DENOISING_SPEC",
}
# Generative models train through the same loop (``medlatent generate train --model NAME``).
GENERATIVE: dict[str, str] = {
    "vae": "medlatent.generative.vae",
    "gan": "medlatent.generative.gan",
    "ddpm": "medlatent.generative.ddpm",
    "ldm": "medlatent.generative.ldm",
}
# Supervised restoration (``medlatent restore train``) uses the loop the same way.
RESTORATION: dict[str, str] = {"restore": "medlatent.restore.tasks",
                               "restore-diffusion": "medlatent.restore.paired_diffusion"}


def _known() -> dict[str, str]:
    return {**METHODS, **GENERATIVE, **RESTORATION}


def get_method(name: str) -> MethodSpec:
    known = _known()
    if name not in known:
        raise ConfigError(f"method: unknown method '{name}' (known: {', '.join(METHODS)}; generative: "
                          f"{', '.join(GENERATIVE)})")
    module, _, attr = known[name].partition(":")
    return getattr(importlib.import_module(module), attr or "SPEC")


def upgrade_saved_options(method: object, options: object) -> object:
    """A saved run's ``method_options`` under today's defaults (see ``MethodSpec.upgrade_saved``);
    anything unrecognised passes through unchanged for the config check to report."""
    if not isinstance(method, str) or not isinstance(options, dict):
        return options
    spec = get_method(method) if method in _known() else None
    return spec.upgrade_saved(options) if spec is not None and spec.upgrade_saved else options
