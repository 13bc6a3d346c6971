"""Lazy imports of optional packages: a missing one names the extra that brings it."""

import importlib
from types import ModuleType

from .errors import MissingExtra

# module to import -> extra of pyproject.toml that installs it
EXTRA_OF = {
    "torch": "cuda",
    "pynvml": "cuda",
    "docker": "docker",
    "anthropic": "agent",
    "mlx": "mlx",
    "mlx_lm": "mlx",
    "ray": "cluster",
    "matplotlib": "plot",
}


def require(module: str) -> ModuleType:
    """Import `module` or raise MissingExtra naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but one of its own imports failed: show that as is
        raise MissingExtra(top, EXTRA_OF.get(top, "dev")) from None
