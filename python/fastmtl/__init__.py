"""fastmtl: fast multi-task learning for PyTorch.

A shared trunk feeds one head per task; fastmtl computes the trunk, all heads, all losses and the
summed per-task gradient in a few fused C++ calls (``torch.ops.fastmtl.*``), with a plain-PyTorch
reference of every op in :mod:`fastmtl.reference`.
"""

__version__ = "0.1.0"


def _check_torch_version() -> None:
    # A C++ extension is tied to the torch it was compiled against: loading it under another torch
    # fails with undefined symbols or, worse, crashes. Say what to do instead.
    import torch

    try:
        from . import _build_config
    except ImportError:
        raise ImportError(
            "fastmtl's compiled part is missing (this looks like an unbuilt source tree); build it with "
            "`pip install --no-build-isolation .` from the fastmtl source tree, after installing torch"
        ) from None

    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if running != _build_config.TORCH_MAJOR_MINOR:
        raise ImportError(
            f"fastmtl was built against torch {_build_config.TORCH_VERSION} but torch {torch.__version__} "
            f"is installed; rebuild fastmtl against this torch: `pip install --no-build-isolation --force-reinstall .` "
            f"from the fastmtl source tree"
        )


_check_torch_version()

import torch  # noqa: E402

# _C first: loading it registers torch.ops.fastmtl.*, which the other modules' fake kernels refer to.
# data imports scikit-learn (for multidigits) only when called.
from . import (  # noqa: E402
    _C,
    aggregation,
    data,
    metrics,
    nn,
    ops,
    reference,
    weighting,
)
from .convert import ConversionReport, convert, unconvert  # noqa: E402
from .engine import mtl_backward  # noqa: E402,F401
from .tasks import Task  # noqa: E402


def build_info() -> dict:
    """What this build is: version, torch (built against and running), CUDA kernels, threads."""
    info = dict(_C.build_info())
    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    return info


__all__ = [
    "Task",
    "ConversionReport",
    "build_info",
    "convert",
    "unconvert",
    "mtl_backward",
    "nn",
    "ops",
    "reference",
    "aggregation",
    "weighting",
    "data",
    "metrics",
    "__version__",
]
