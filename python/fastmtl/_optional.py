"""The apps' optional dependencies (scikit-learn, matplotlib, tqdm), imported only where needed.

The core package (ops, modules, MTL methods) must import without them; the data sets, the command
line and the plots need them, and say how to get them when they are missing.
"""

from __future__ import annotations

import importlib

EXTRA = "apps"
INSTALL_HINT = f'pip install "fastmtl-torch[{EXTRA}]"'


def require(module: str, purpose: str):
    """``importlib.import_module(module)``, or an ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the optional dependency {module.split('.')[0]!r}, which is not installed; "
            f"install fastmtl's '{EXTRA}' extra: {INSTALL_HINT}"
        ) from error
