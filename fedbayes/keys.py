"""The one spelling rule of fedbayes' configuration keys.

Python names are snake_case (``batch_size``); every key a user, a preset, ``config.json``, Flower's run config
or a client's ConfigRecord sees is kebab-case (``batch-size``).  Both spellings are accepted on input and
normalised here, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["kebab", "kebab_keys"]


def kebab(name: str) -> str:
    """``"batch_size"`` -> ``"batch-size"``."""
    return str(name).replace("_", "-")


def kebab_keys(d: Mapping[str, Any] | None) -> dict[str, Any]:
    """A mapping with its keys in kebab-case (values untouched); None gives ``{}``."""
    return {kebab(k): v for k, v in (d or {}).items()}
