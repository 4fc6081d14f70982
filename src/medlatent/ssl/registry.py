"""Method registry: name -> MethodSpec. A new method is one file with a SPEC, listed here."""

from __future__ import annotations

import importlib

from medlatent.errors import ConfigError
from medlatent.ssl.base import MethodSpec

# name -> module defining SPEC; imported on demand so listing methods stays cheap.
METHODS: dict[str, str] = {
    "simclr": "medlatent.ssl.simclr",
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"method: unknown method '{name}' (known: {', '.join(METHODS)})")
    return importlib.import_module(METHODS[name]).SPEC
