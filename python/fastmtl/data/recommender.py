"""recommender: feed impressions with sparse categorical fields and three tasks, click, conversion
(labelled only where clicked, as in ESMM) and like, drawn from a latent-factor model in code."""

from __future__ import annotations

import math

import torch

from ..tasks import Task
from .dataset import MultiTaskDataset

SPLITS = ("train", "test")
DEFAULT_SAMPLES = {"train": 40000, "test": 20000}

# The world (users, items and their factors) is fixed by the seed; the splits are independent
# impressions of it. Cardinalities: every user is seen ~40 times and every item ~80 times in the
# default 40,000 training impressions, enough for their embeddings to learn something, few enough
# that the rarer task (conversion, labelled on ~1 impression in 5) is label-scarce per user.
NUM_USERS, NUM_ITEMS = 1000, 500
NUM_USER_GROUPS, NUM_CATEGORIES = 10, 20  # a user's group, an item's category: coarse fields that generalise
NUM_DEVICES, NUM_HOURS = 3, 24  # of the impression itself
FIELDS = ("user", "item", "user_group", "item_category", "device", "hour")
CARDINALITIES = (NUM_USERS, NUM_ITEMS, NUM_USER_GROUPS, NUM_CATEGORIES, NUM_DEVICES, NUM_HOURS)
FACTORS = 8
# How much of each task's preference direction is shared with the other tasks: related but not the
# same tasks, the middle of the range the MMoE paper (Ma et al. 2018) studies.
TASK_CORRELATION = 0.5
LOGIT_STD = 1.5  # spread of a task's logit over impressions: a good model reaches AUC ~0.8, not 1
# Base rates, of the order of public feed / e-commerce logs: click-through 20%, conversion 25% of
# clicks (5% of impressions), like 10% of impressions.
RATES = {"click": 0.20, "conversion": 0.25, "like": 0.10}

TASKS = (Task("click", "binary"), Task("conversion", "binary"), Task("like", "binary"))
#: Binary tasks with rare positives are scored by AUC (accuracy would reward predicting "no").
METRICS = {task.name: ("auc",) for task in TASKS}


def _intercept(scores: torch.Tensor, rate: float, weights: torch.Tensor) -> float:
    """The b with the weighted mean of sigmoid(b + scores) equal to ``rate`` (bisection: it increases
    with b). Weights: the probability that the label is observed (a click, for conversion)."""
    low, high = -20.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2
        mean = float((torch.sigmoid(middle + scores) * weights).sum() / weights.sum())
        low, high = (middle, high) if mean < rate else (low, middle)
    return (low + high) / 2


def _world(seed: int):
    """Users' and items' fields and latent factors, each task's preference weights and field biases."""
    g = torch.Generator().manual_seed(4 * seed + 1)
    user_group = torch.randint(NUM_USER_GROUPS, (NUM_USERS,), generator=g)
    item_category = torch.randint(NUM_CATEGORIES, (NUM_ITEMS,), generator=g)
    # A user's factors are its group's plus its own; an item's its category's plus its own: the
    # coarse fields carry half the signal, so a model can generalise to rarely seen users and items.
    half = math.sqrt(0.5)
    users = half * torch.randn(NUM_USER_GROUPS, FACTORS, generator=g)[user_group] + half * torch.randn(
        NUM_USERS, FACTORS, generator=g
    )
    items = half * torch.randn(NUM_CATEGORIES, FACTORS, generator=g)[item_category] + half * torch.randn(
        NUM_ITEMS, FACTORS, generator=g
    )

    def related(*shape):
        """One draw per task, every two of them at correlation TASK_CORRELATION."""
        shared = torch.randn(*shape, generator=g)
        return {
            t.name: math.sqrt(TASK_CORRELATION) * shared
            + math.sqrt(1 - TASK_CORRELATION) * torch.randn(*shape, generator=g)
            for t in TASKS
        }

    preference = related(FACTORS)
    # Main effects: how much a user clicks / buys / likes at all, how appealing an item is; in logs
    # they carry much of the signal, and an embedding learns them from the field alone.
    user_bias, item_bias = related(NUM_USERS), related(NUM_ITEMS)
    device_bias = {t.name: 0.3 * torch.randn(NUM_DEVICES, generator=g) for t in TASKS}
    hour_bias = {
        t.name: 0.3 * torch.sin(2 * math.pi * (torch.arange(NUM_HOURS) / NUM_HOURS + torch.rand(1, generator=g)))
        for t in TASKS
    }
    return user_group, item_category, users, items, preference, user_bias, item_bias, device_bias, hour_bias


def recommender(n: int | None = None, split: str = "train", seed: int = 0) -> MultiTaskDataset:
    """Feed impressions: six categorical fields (``user``, ``item``, ``user_group``,
    ``item_category``, ``device``, ``hour``; their category indices stored as floats, the
    cardinalities in ``field_cardinalities``, for an embedding front such as
    :class:`fastmtl.nn.FieldEmbedding`) and three binary tasks scored by AUC.

    Each task t has the logit ``b_t + s (user_t + item_t + <u * w_t, v> / sqrt(k)) + device_t + hour_t``:
    the user's and the item's main effects, the affinity of their k = 8 latent factors ``u, v`` (half
    from the user's group / item's category) under the task's preference weights ``w_t``, and small
    biases of the device and the hour; every task-specific draw is correlated 0.5 between tasks;
    ``s`` makes the logit's spread 1.5 and ``b_t`` fixes the base rate (click 20%, conversion 25%
    of clicks, like 10%). ``data.probabilities`` holds the true probabilities (the best scores). ``click`` and ``like`` are labelled on every impression; ``conversion`` only
    where the impression was clicked (NaN elsewhere): ESMM's setting (Ma et al. 2018, "Entire Space
    Multi-Task Model"), where the conversion model has a fifth of the labels.

    Args:
        n: impressions (default 40,000 train, 20,000 test).
        split: ``"train"`` or ``"test"``: independent impressions of the same users and items.
        seed: fixes the world (users, items, tasks) and, with ``split``, the impressions.

    >>> data = recommender(1000)
    >>> data.features.shape, data.task_names, data.field_cardinalities
    (torch.Size([1000, 6]), ['click', 'conversion', 'like'], [1000, 500, 10, 20, 3, 24])
    >>> labelled = data.labelled_counts()
    >>> labelled["conversion"] == int(data.targets["click"].sum())
    True
    """
    where = "fastmtl.data.recommender"
    if split not in SPLITS:
        raise ValueError(f"{where}: argument 'split' expected one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}: argument 'seed' expected an int, got {seed!r}")
    n = DEFAULT_SAMPLES[split] if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: argument 'n' expected an int >= 1, got {n!r}")
    (user_group, item_category, users, items, preference, user_bias, item_bias, device_bias, hour_bias) = _world(seed)

    g = torch.Generator().manual_seed(4 * seed + 2 + SPLITS.index(split))
    # Popular items and active users appear more often (a mild Zipf law), as in real logs.
    user = torch.multinomial(1.0 / torch.arange(1, NUM_USERS + 1) ** 0.5, n, replacement=True, generator=g)
    item = torch.multinomial(1.0 / torch.arange(1, NUM_ITEMS + 1) ** 0.5, n, replacement=True, generator=g)
    device = torch.randint(NUM_DEVICES, (n,), generator=g)
    hour = torch.randint(NUM_HOURS, (n,), generator=g)
    # The scale and the intercepts come from the world (a fixed sample of it), not from the split,
    # so train and test impressions follow the same law.
    reference = torch.Generator().manual_seed(4 * seed + 3)
    ref = [
        torch.randint(count, (20000,), generator=reference) for count in (NUM_USERS, NUM_ITEMS, NUM_DEVICES, NUM_HOURS)
    ]

    def score(name, scale, u, i, d, h):
        affinity = ((users[u] * preference[name]) * items[i]).sum(1) / math.sqrt(FACTORS)  # variance ~1
        return scale * (user_bias[name][u] + item_bias[name][i] + affinity) + device_bias[name][d] + hour_bias[name][h]

    targets, probabilities = {}, {}
    clicked, ref_click = None, torch.ones(20000)
    for task in TASKS:
        scale = LOGIT_STD / float(score(task.name, 1.0, *ref).std())
        ref_score = score(task.name, scale, *ref)
        observed = ref_click if task.name == "conversion" else torch.ones(20000)
        intercept = _intercept(ref_score, RATES[task.name], observed)
        probability = torch.sigmoid(intercept + score(task.name, scale, user, item, device, hour))
        label = torch.bernoulli(probability, generator=g)
        probabilities[task.name] = probability
        if task.name == "click":
            clicked, ref_click = label.bool(), torch.sigmoid(intercept + ref_score)
        if task.name == "conversion":  # observed only after a click
            label = torch.where(clicked, label, math.nan)
        targets[task.name] = label.float()
    fields = torch.stack([user, item, user_group[user], item_category[item], device, hour], dim=1).float()
    data = MultiTaskDataset(fields, targets, TASKS, metrics=METRICS, field_cardinalities=CARDINALITIES)
    data.probabilities = probabilities  # the true probability of each label: the Bayes-optimal scores
    return data
