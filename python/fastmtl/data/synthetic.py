"""synthetic_tasks: regression tasks of tunable correlation (Ma et al. 2018, the MMoE paper)."""

from __future__ import annotations

import torch

from ..tasks import Task
from .dataset import MultiTaskDataset

SPLITS = ("train", "test")
NUM_SINES = 10  # m in the paper
SINE_PARAM_STD = 0.1  # alpha_i, beta_i ~ N(0, 0.01): variance 0.01
NOISE_STD = 0.1  # epsilon ~ N(0, 0.01)


def task_names(num_tasks: int):
    return [f"task{t}" for t in range(num_tasks)]


def synthetic_tasks(
    n: int,
    in_features: int = 100,
    num_tasks: int = 2,
    correlation: float = 0.5,
    seed: int = 0,
    split: str = "train",
    scale: float = 1.0,
    missing_fraction: float = 0.0,
) -> MultiTaskDataset:
    """The synthetic regression tasks of Ma et al. 2018 (MMoE), whose pairwise correlation is set.

    As in the paper: task weight vectors ``w_t = scale * v_t`` with ``<v_s, v_t> = correlation``
    (s != t) and ``|v_t| = 1``, inputs ``x ~ N(0, I)``, and
    ``y_t = w_t.x + sum_i sin(alpha_i w_t.x + beta_i) + eps_t``, with ``m = 10`` sines whose
    ``alpha_i, beta_i ~ N(0, 0.01)`` are shared by the tasks and ``eps_t ~ N(0, 0.01)``. The paper
    builds two tasks from two orthogonal unit vectors, ``v_2 = p u_1 + sqrt(1 - p^2) u_2``; here
    ``V = C^(1/2) U`` for ``num_tasks`` orthonormal rows ``U`` and ``C = (1 - p) I + p 1 1^T``, which
    is the same for two tasks and gives every pair the cosine ``p``. ``C`` is a correlation matrix
    only for ``p`` in ``[-1/(num_tasks - 1), 1]``.

    Args:
        n: samples. in_features: input width (``>= num_tasks``). num_tasks: tasks ``task0, task1, ...``
        correlation: the cosine ``p`` between every two tasks' weight vectors.
        seed: fixes the tasks (weight vectors, sines) and, with ``split``, the samples: ``"train"``
            and ``"test"`` of one seed are the same tasks on independent inputs.
        scale: ``c`` in the paper. missing_fraction: share of each task's labels hidden.

    >>> data = synthetic_tasks(200, in_features=16, num_tasks=3, correlation=0.9)
    >>> data.features.shape, data.task_names
    (torch.Size([200, 16]), ['task0', 'task1', 'task2'])
    """
    where = "fastmtl.data.synthetic_tasks"
    for name, value, low in (("n", n, 1), ("in_features", in_features, 1), ("num_tasks", num_tasks, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: argument '{name}' expected an int >= {low}, got {value!r}")
    if in_features < num_tasks:
        raise ValueError(
            f"{where}: argument 'in_features' expected >= num_tasks = {num_tasks} (one orthogonal "
            f"direction per task), got {in_features}"
        )
    lowest = -1.0 / (num_tasks - 1) if num_tasks > 1 else -1.0
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float)) or not lowest <= correlation <= 1:
        raise ValueError(
            f"{where}: argument 'correlation' expected a number in [{lowest:.4g}, 1] for "
            f"{num_tasks} tasks, got {correlation!r}"
        )
    if split not in SPLITS:
        raise ValueError(f"{where}: argument 'split' expected one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}: argument 'seed' expected an int, got {seed!r}")

    task_rng = torch.Generator().manual_seed(2 * seed)
    orthonormal, _ = torch.linalg.qr(torch.randn(in_features, num_tasks, generator=task_rng, dtype=torch.float64))
    corr = (1 - correlation) * torch.eye(num_tasks, dtype=torch.float64) + correlation
    eigenvalues, eigenvectors = torch.linalg.eigh(corr)
    sqrt_corr = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    weights = scale * sqrt_corr @ orthonormal.T  # [T, in_features], rows of norm `scale`, cosines `correlation`
    alpha = SINE_PARAM_STD * torch.randn(NUM_SINES, generator=task_rng, dtype=torch.float64)
    beta = SINE_PARAM_STD * torch.randn(NUM_SINES, generator=task_rng, dtype=torch.float64)

    sample_rng = torch.Generator().manual_seed(2 * seed + 1 + SPLITS.index(split) * 7919)
    x = torch.randn(n, in_features, generator=sample_rng, dtype=torch.float64)
    projections = x @ weights.T  # [n, T]
    sines = torch.sin(projections.unsqueeze(-1) * alpha + beta).sum(-1)
    y = projections + sines + NOISE_STD * torch.randn(n, num_tasks, generator=sample_rng, dtype=torch.float64)
    names = task_names(num_tasks)
    tasks = [Task(name, "regression") for name in names]
    targets = {name: y[:, t].float().contiguous() for t, name in enumerate(names)}
    data = MultiTaskDataset(x.float(), targets, tasks)
    if missing_fraction:
        data = data.with_missing_labels(missing_fraction, seed)
    data.task_weight_vectors = weights.float()
    return data
