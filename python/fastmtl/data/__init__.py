"""Data sets that ship with fastmtl (no downloads), as in-memory torch Datasets.

==================  ===================================================================
``multidigits``     two 8x8 handwritten digits side by side (scikit-learn's bundled digits);
                    tasks left, right (10 classes each), sum (regression), parity (binary)
``synthetic_tasks`` the regression tasks of the MMoE paper, pairwise correlation set by the user
``recommender``     feed impressions: six categorical fields (user, item, ...), click, conversion
                    (labelled only where clicked, as ESMM's) and like, scored by AUC
==================  ===================================================================

Each returns a :class:`MultiTaskDataset`: ``dataset[i] = (x, {task name: target})`` for a DataLoader,
``dataset.batches(batch_size)`` for fast in-memory batching, ``dataset.with_missing_labels(fraction)``
to hide a share of each task's labels (NaN, or -100 for multiclass, as ``model.losses`` expects).
``dataset.with_task_subsets(n)`` labels each task on its own n rows only (the label-scarce regime).
``multidigits`` needs scikit-learn (``pip install "fastmtl-torch[apps]"``).
"""

from .dataset import IGNORE_INDEX, MultiTaskDataset, labelled_mask, missing_value
from .multidigits import multidigits
from .recommender import recommender
from .synthetic import synthetic_tasks

#: The data sets by the name the command line uses (the function's name).
DATASETS = {"multidigits": multidigits, "synthetic_tasks": synthetic_tasks, "recommender": recommender}

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "MultiTaskDataset",
    "labelled_mask",
    "missing_value",
    "multidigits",
    "recommender",
    "synthetic_tasks",
]
