"""multidigits: two handwritten digits side by side, four tasks (MultiMNIST on data we can ship)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from .._optional import require
from ..tasks import Task
from .dataset import MultiTaskDataset

SPLITS = ("train", "test")
TEST_SHARE = 0.2  # of each class's source images
DEFAULT_SAMPLES = {"train": 10000, "test": 2000}
_PIXEL_MAX = 16.0  # load_digits' images are 4-bit grey levels, 0..16
SUM_MAX = 18.0  # the sum target is scaled to [0, 1] like the pixels, so that its MSE does not swamp the other losses

TASKS = (
    Task("left", "multiclass", num_outputs=10),
    Task("right", "multiclass", num_outputs=10),
    Task("sum", "regression"),
    Task("parity", "binary"),
)


@functools.lru_cache(maxsize=1)
def _digit_images():
    """The 1797 8x8 images and labels of scikit-learn's bundled digits (read from its package)."""
    datasets = require("sklearn.datasets", "fastmtl.data.multidigits")
    digits = datasets.load_digits()
    return digits.images.astype(np.float32) / _PIXEL_MAX, digits.target.astype(np.int64)


def source_image_split(seed: int = 0):
    """Indices into load_digits' images of the train and test pools: ``TEST_SHARE`` of each class's
    images, drawn with ``seed``, go to the test pool, so no test sample shows a training image."""
    _, labels = _digit_images()
    rng = np.random.default_rng([int(seed), 0])
    train, test = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        cut = int(round(TEST_SHARE * len(members)))
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def multidigits(
    split: str = "train", seed: int = 0, num_samples: int | None = None, missing_fraction: float = 0.0
) -> MultiTaskDataset:
    """Pairs of 8x8 handwritten digits side by side: 8 rows x 16 columns = 128 features in [0, 1].

    Tasks: ``left`` and ``right`` (multiclass, 10 classes: the two digits), ``sum`` (regression:
    their sum, 0..18) and ``parity`` (binary: 1 when the sum is even). Built from the digits that
    scikit-learn ships inside its package (``sklearn.datasets.load_digits``: 1797 images, no
    download), as the MultiMNIST of Sener & Koltun 2018 is built from MNIST.

    Args:
        split: ``"train"`` or ``"test"``. 20% of each digit's source images are kept for the test
            split (drawn with ``seed``): a test pair never contains an image seen in training.
        seed: fixes the source-image split and the pairing; the same arguments give the same data.
        num_samples: pairs to draw (default 10000 for train, 2000 for test), each side drawn
            uniformly from the split's images.
        missing_fraction: share of each task's labels hidden (see
            :meth:`MultiTaskDataset.with_missing_labels`).

    >>> train = multidigits("train", num_samples=100)
    >>> train.features.shape, train.task_names
    (torch.Size([100, 128]), ['left', 'right', 'sum', 'parity'])
    """
    if split not in SPLITS:
        raise ValueError(
            f"fastmtl.data.multidigits: argument 'split' expected one of {', '.join(SPLITS)}, got {split!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"fastmtl.data.multidigits: argument 'seed' expected an int, got {seed!r}")
    n = DEFAULT_SAMPLES[split] if num_samples is None else num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"fastmtl.data.multidigits: argument 'num_samples' expected an int >= 1, got {num_samples!r}")
    images, labels = _digit_images()
    pool = source_image_split(seed)[SPLITS.index(split)]
    rng = np.random.default_rng([int(seed), 1 + SPLITS.index(split)])
    left, right = rng.choice(pool, size=n), rng.choice(pool, size=n)
    pairs = np.concatenate([images[left], images[right]], axis=2)  # [n, 8 rows, 16 columns]
    digit_sum = labels[left] + labels[right]
    targets = {
        "left": torch.from_numpy(labels[left]),
        "right": torch.from_numpy(labels[right]),
        "sum": torch.from_numpy(digit_sum.astype(np.float32) / SUM_MAX),
        "parity": torch.from_numpy((digit_sum % 2 == 0).astype(np.float32)),
    }
    data = MultiTaskDataset(torch.from_numpy(pairs.reshape(n, -1)), targets, TASKS)
    if missing_fraction:
        data = data.with_missing_labels(missing_fraction, seed)
    data.source_indices = (torch.from_numpy(left), torch.from_numpy(right))  # into load_digits' images
    return data
