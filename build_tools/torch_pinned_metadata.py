"""scikit-build-core dynamic-metadata provider: ties the wheel to the torch it is built against.

A C++ extension compiled against torch X.Y refuses to load under another torch (fastmtl's
``__init__`` checks; without the check it would fail on undefined symbols or crash). So the wheel's
metadata must say so, or pip pairs it with a torch it then cannot import under:

* ``dependencies``: ``torch==X.Y.*`` (any patch release of the torch minor it was compiled against;
  a local build tag such as ``+cpu`` or ``+cu130`` matches too) and numpy;
* ``version``: the project's version with a local tag naming that torch, ``0.1.0+pt213`` (and
  ``+pt213cu130`` for a CUDA build), as PyTorch extension wheels do.

It reads the torch installed in the building Python, so it needs ``--no-build-isolation`` (the
project's documented way to build): in an isolated build environment torch is absent, and the
error says so rather than letting pip install an unrelated torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["dynamic_metadata"]


def _installed_torch():
    try:
        import torch
    except ImportError:
        raise RuntimeError(
            "fastmtl's build needs the torch it will run with installed in the building Python: "
            "install torch first (pip install torch==2.13.0), then build with "
            "pip install --no-build-isolation ... (or pip wheel --no-build-isolation . -w dist)"
        ) from None
    public = torch.__version__.split("+")[0]
    major, minor = public.split(".")[:2]
    return major, minor, torch.version.cuda


def dynamic_metadata(field: str, settings: Mapping[str, Any]) -> Any:
    """The hook scikit-build-core calls for ``[tool.scikit-build.metadata.<field>]`` (its in-tree
    provider form: ``provider-path``). ``version`` takes the setting ``base-version`` (the public
    version, e.g. ``"0.1.0"``); ``dependencies`` takes none."""
    expected = {"version": {"base-version"}, "dependencies": set()}
    if field not in expected:
        raise RuntimeError(f"torch_pinned_metadata: provides 'version' and 'dependencies', not {field!r}")
    if set(settings) != expected[field]:
        raise RuntimeError(
            f"torch_pinned_metadata: field {field!r} expected settings {sorted(expected[field])}, got {sorted(settings)}"
        )
    major, minor, cuda = _installed_torch()
    if field == "dependencies":
        return [f"torch=={major}.{minor}.*", "numpy"]
    base = settings["base-version"]
    if not isinstance(base, str) or not base:
        raise RuntimeError(f"torch_pinned_metadata: setting 'base-version' expected a version string, got {base!r}")
    return f"{base}+pt{major}{minor}" + (f"cu{cuda.replace('.', '')}" if cuda else "")
