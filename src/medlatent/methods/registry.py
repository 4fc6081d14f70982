"""Method registry: name -> MethodSpec. A new method is one file with a SPEC, listed here."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from medlatent.config import PretrainConfig, from_dict
from medlatent.errors import ConfigError
from medlatent.methods.contract import MethodSpec

# name -> module defining SPEC; imported on demand so listing methods stays cheap.
METHODS: dict[str, str] = {
    "simclr": "medlatent.ssl.simclr",
    "mocov2": "medlatent.ssl.mocov2",
    "mocov3": "medlatent.ssl.mocov3",
    "byol": "medlatent.ssl.byol",
    "dino": "medlatent.ssl.dino",
    "dinov2": "medlatent.ssl.dinov2",
    "mae": "medlatent.ssl.mae",
    "ijepa": "medlatent.ssl.ijepa",
    "rotation": "medlatent.ssl.rotation",
    "autoencoder": "medlatent.ssl.autoencoder",
    "denoising-autoencoder": "medlatent.ssl.autoencoder:DENOISING_SPEC",
}
# Generative models train through the same loop (``medlatent generate train --method NAME``).
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


def resolve_config(tree: Mapping[str, Any] | None = None, where: str = "config") -> PretrainConfig:
    """A run's config from a mapping (a YAML file, flags, ``--set``): the method's own training
    defaults (``MethodSpec.defaults``) first, the given keys over them, then every key, type
    and range checked. The CLI and the API both build runs through this.

    Raises:
        ConfigError: an unknown method, key or type, or a value out of range (named).
    """
    tree = dict(tree or {})
    method = tree.get("method", PretrainConfig.method)
    spec = get_method(method) if isinstance(method, str) else None
    return from_dict(PretrainConfig, _merge(spec.defaults if spec else {}, tree), where)


def default_config(method: str) -> PretrainConfig:
    """``method``'s config with its own training defaults (what ``medlatent ... --method`` uses)."""
    return resolve_config({"method": method})


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, merging nested sections."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
