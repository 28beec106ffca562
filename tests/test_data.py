"""fastmtl.data: shapes, label ranges, determinism, the train/test separation of multidigits, the
correlation of synthetic_tasks, the recommender's fields and funnel (conversion labelled only where
clicked), the Dataset interface, label hiding and the label-scarce subsets; EW learns multidigits."""

import pytest
import torch

from fastmtl import Task
from fastmtl.cli.training import TrainingConfig, train_run
from fastmtl.data import MultiTaskDataset, multidigits, recommender, synthetic_tasks
from fastmtl.data.multidigits import SUM_MAX, source_image_split

sklearn = pytest.importorskip("sklearn", reason="multidigits needs the apps extra (scikit-learn)")


@pytest.fixture(scope="module")
def digits_train():
    return multidigits("train", num_samples=3000)


@pytest.fixture(scope="module")
def digits_test():
    return multidigits("test", num_samples=1000)


# ---- multidigits


def test_multidigits_shapes_and_ranges(digits_train):
    data = digits_train
    assert data.features.shape == (3000, 128) and data.features.dtype == torch.float32
    assert float(data.features.min()) == 0.0 and float(data.features.max()) == 1.0
    assert [t.name for t in data.tasks] == ["left", "right", "sum", "parity"]
    assert [t.kind for t in data.tasks] == ["multiclass", "multiclass", "regression", "binary"]
    left, right = data.targets["left"], data.targets["right"]
    assert left.dtype == right.dtype == torch.int64
    assert set(left.unique().tolist()) == set(range(10)) == set(right.unique().tolist())
    digit_sum = left + right
    torch.testing.assert_close(data.targets["sum"], digit_sum.float() / SUM_MAX)
    torch.testing.assert_close(data.targets["parity"], (digit_sum % 2 == 0).float())


def test_multidigits_puts_the_two_source_images_side_by_side(digits_train):
    images = sklearn.datasets.load_digits().images / 16.0
    left_index, right_index = digits_train.source_indices
    pixels = digits_train.features[:5].reshape(5, 8, 16)
    torch.testing.assert_close(pixels[:, :, :8], torch.from_numpy(images[left_index[:5].numpy()]).float())
    torch.testing.assert_close(pixels[:, :, 8:], torch.from_numpy(images[right_index[:5].numpy()]).float())
    labels = torch.from_numpy(sklearn.datasets.load_digits().target)
    assert torch.equal(labels[left_index], digits_train.targets["left"])


def test_multidigits_is_deterministic_and_the_seed_matters():
    a, b = multidigits("train", seed=3, num_samples=200), multidigits("train", seed=3, num_samples=200)
    assert torch.equal(a.features, b.features)
    assert all(torch.equal(a.targets[n], b.targets[n]) for n in a.task_names)
    c = multidigits("train", seed=4, num_samples=200)
    assert not torch.equal(a.features, c.features)


@pytest.mark.parametrize("seed", [0, 1])
def test_multidigits_test_images_never_appear_in_training(seed):
    train_pool, test_pool = source_image_split(seed)
    assert len(set(train_pool.tolist()) & set(test_pool.tolist())) == 0
    assert len(train_pool) + len(test_pool) == 1797
    train, test = multidigits("train", seed=seed), multidigits("test", seed=seed)
    train_images = set(torch.cat(train.source_indices).tolist())
    test_images = set(torch.cat(test.source_indices).tolist())
    assert train_images.isdisjoint(test_images)
    assert test_images <= set(test_pool.tolist())
    # every digit is in both pools (the split is per class)
    assert set(test.targets["left"].tolist()) == set(range(10))


def test_multidigits_default_sizes_and_missing_labels():
    assert len(multidigits("test")) == 2000
    data = multidigits("train", num_samples=400, missing_fraction=0.25)
    assert data.labelled_counts() == {"left": 300, "right": 300, "sum": 300, "parity": 300}
    assert int((data.targets["left"] == -100).sum()) == 100
    assert int(torch.isnan(data.targets["parity"]).sum()) == 100
    full = multidigits("train", num_samples=400)
    assert torch.equal(data.features, full.features) and torch.equal(data.source_indices[0], full.source_indices[0])
    hidden = synthetic_tasks(50, in_features=4, missing_fraction=0.2)
    assert hidden.labelled_counts() == {"task0": 40, "task1": 40} and hidden.task_weight_vectors.shape == (2, 4)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(split="validation"), "split"),
        (dict(num_samples=0), "num_samples"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_multidigits_bad_arguments_name_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        multidigits(**kwargs)


def test_short_equal_weighting_run_reaches_85_percent_on_left_and_right(digits_test):
    train = multidigits("train")
    config = TrainingConfig(epochs=3, hidden=(128, 128))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: one thread is the fastest, and the test stays ~1 s
    try:
        result = train_run("EW", "EW", train, digits_test, config)
    finally:
        torch.set_num_threads(threads)
    assert result.metrics["left"]["accuracy"] >= 0.85, result.metrics
    assert result.metrics["right"]["accuracy"] >= 0.85, result.metrics


# ---- synthetic_tasks


def test_synthetic_tasks_shapes_and_weight_vector_cosines():
    data = synthetic_tasks(500, in_features=12, num_tasks=4, correlation=0.3, seed=1)
    assert data.features.shape == (500, 12) and data.task_names == ["task0", "task1", "task2", "task3"]
    assert all(t.kind == "regression" for t in data.tasks)
    assert all(data.targets[n].shape == (500,) and data.targets[n].dtype == torch.float32 for n in data.task_names)
    w = data.task_weight_vectors.double()
    expected = torch.full((4, 4), 0.3, dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(w @ w.T, expected, rtol=0, atol=1e-6)


def test_synthetic_tasks_label_correlation_follows_the_setting():
    def label_correlation(p):
        data = synthetic_tasks(4000, in_features=20, num_tasks=2, correlation=p, seed=0)
        return float(torch.corrcoef(torch.stack([data.targets["task0"], data.targets["task1"]]))[0, 1])

    low, high, negative = label_correlation(0.1), label_correlation(0.9), label_correlation(-0.8)
    assert negative < -0.5 < low < 0.5 < high
    assert abs(high - 0.9) < 0.1 and abs(low - 0.1) < 0.1


def test_synthetic_tasks_splits_share_the_tasks_not_the_inputs():
    train = synthetic_tasks(100, in_features=8, num_tasks=2, correlation=0.5, seed=2, split="train")
    again = synthetic_tasks(100, in_features=8, num_tasks=2, correlation=0.5, seed=2, split="train")
    test = synthetic_tasks(100, in_features=8, num_tasks=2, correlation=0.5, seed=2, split="test")
    assert torch.equal(train.features, again.features) and torch.equal(train.targets["task0"], again.targets["task0"])
    assert torch.equal(train.task_weight_vectors, test.task_weight_vectors)
    assert not torch.equal(train.features, test.features)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(n=0), "'n'"),
        (dict(in_features=1, num_tasks=2), "in_features"),
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=3, correlation=-0.9), "correlation"),
        (dict(correlation=1.5), "correlation"),
        (dict(split="val"), "split"),
    ],
)
def test_synthetic_tasks_bad_arguments_name_them(kwargs, argument):
    args = dict(n=10, in_features=4, num_tasks=2, correlation=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        synthetic_tasks(**args)


# ---- MultiTaskDataset and label hiding


def small_dataset():
    tasks = [Task("r", "regression", num_outputs=2), Task("b", "binary"), Task("c", "multiclass", num_outputs=3)]
    g = torch.Generator().manual_seed(0)
    targets = {
        "r": torch.randn(10, 2, generator=g),
        "b": (torch.rand(10, generator=g) > 0.5).float(),
        "c": torch.randint(0, 3, (10,), generator=g),
    }
    return MultiTaskDataset(torch.rand(10, 5, generator=g), targets, tasks)


def test_dataset_works_with_a_dataloader_and_the_model():
    import fastmtl

    data = small_dataset()
    model = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(5, [8]), fastmtl.nn.MultiTaskHeads(8, data.tasks))
    x, targets = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert x.shape == (4, 5) and targets["r"].shape == (4, 2) and targets["c"].dtype == torch.int64
    assert torch.isfinite(model.losses(x, targets)).all()


def test_batches_cover_every_row_once():
    data = small_dataset()
    rows = torch.cat([x for x, _ in data.batches(3, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert rows.shape == (10, 5)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, data.features.tolist()))
    assert [len(x) for x, _ in data.batches(4)] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(0))


def test_with_missing_labels_hides_exact_shares_and_leaves_the_original_alone():
    data = small_dataset()
    before = {k: v.clone() for k, v in data.targets.items()}
    hidden = data.with_missing_labels({"r": 0.5, "c": 0.3}, seed=4)
    assert all(torch.equal(data.targets[k], before[k]) for k in before)
    assert (torch.isnan(hidden.targets["r"]).sum(dim=0) == 5).all()  # each column on its own
    assert int((hidden.targets["c"] == -100).sum()) == 3
    assert hidden.labelled_counts() == {"r": 10, "b": 10, "c": 7}
    labelled = hidden.targets["c"] != -100
    assert torch.equal(hidden.targets["c"][labelled], before["c"][labelled])
    everything = data.with_missing_labels(1.0)
    assert everything.labelled_counts() == {"r": 0, "b": 0, "c": 0}


@pytest.mark.parametrize("fraction, message", [(1.5, "fraction"), ({"zzz": 0.1}, "unknown tasks"), (-0.1, "fraction")])
def test_with_missing_labels_bad_fraction(fraction, message):
    with pytest.raises(ValueError, match=message):
        small_dataset().with_missing_labels(fraction)


def test_dataset_bad_inputs_name_the_argument():
    tasks = [Task("c", "multiclass", num_outputs=3)]
    with pytest.raises(ValueError, match="features"):
        MultiTaskDataset(torch.zeros(4), {"c": torch.zeros(4, dtype=torch.long)}, tasks)
    with pytest.raises(ValueError, match="keys"):
        MultiTaskDataset(torch.zeros(4, 2), {"d": torch.zeros(4, dtype=torch.long)}, tasks)
    with pytest.raises(ValueError, match=r"targets\['c'\].*shape"):
        MultiTaskDataset(torch.zeros(4, 2), {"c": torch.zeros(5, dtype=torch.long)}, tasks)
    with pytest.raises(ValueError, match="integer class indices"):
        MultiTaskDataset(torch.zeros(4, 2), {"c": torch.zeros(4)}, tasks)
    with pytest.raises(ValueError, match="floating"):
        MultiTaskDataset(torch.zeros(4, 2), {"y": torch.zeros(4, dtype=torch.long)}, [Task("y", "regression")])


# ---- recommender


def test_recommender_fields_tasks_and_the_click_conversion_funnel():
    from fastmtl.data.recommender import CARDINALITIES, RATES

    data = recommender(20000, seed=3)
    assert data.features.shape == (20000, 6) and data.task_names == ["click", "conversion", "like"]
    assert data.field_cardinalities == list(CARDINALITIES)
    assert data.metrics == {"click": ("auc",), "conversion": ("auc",), "like": ("auc",)}
    fields = data.features
    assert torch.equal(fields, fields.round()) and bool((fields >= 0).all())
    assert bool((fields < torch.tensor(CARDINALITIES, dtype=fields.dtype)).all())
    # A user always has the same group, an item the same category.
    for key, derived in ((0, 2), (1, 3)):
        pairs = {(int(a), int(b)) for a, b in fields[:, [key, derived]]}
        assert len({a for a, _ in pairs}) == len(pairs)
    click, conversion, like = (data.targets[n] for n in ("click", "conversion", "like"))
    assert not bool(torch.isnan(click).any()) and not bool(torch.isnan(like).any())
    assert torch.equal(~torch.isnan(conversion), click == 1)  # labelled exactly where clicked
    assert abs(float(click.mean()) - RATES["click"]) < 0.02 and abs(float(like.mean()) - RATES["like"]) < 0.02
    assert abs(float(torch.nanmean(conversion)) - RATES["conversion"]) < 0.03
    # The labels follow data.probabilities, which carry the signal a model can learn (AUC well above 0.5).
    from fastmtl.metrics import auc

    for name in data.task_names:
        assert 0.75 < auc(data.probabilities[name], data.targets[name]) < 0.9


def test_recommender_is_deterministic_and_splits_share_the_world_not_the_impressions():
    a, b = recommender(500, seed=1), recommender(500, seed=1)
    assert torch.equal(a.features, b.features)
    assert all(torch.equal(torch.nan_to_num(a.targets[n], 9), torch.nan_to_num(b.targets[n], 9)) for n in a.task_names)
    test = recommender(500, seed=1, split="test")
    assert not torch.equal(a.features, test.features)
    # The same user in both splits has the same group: one world.
    train_group = {int(u): int(g) for u, g in a.features[:, [0, 2]]}
    shared = [(int(u), int(g)) for u, g in test.features[:, [0, 2]] if int(u) in train_group]
    assert shared and all(train_group[u] == g for u, g in shared)
    assert not torch.equal(recommender(500, seed=2).features, a.features)


@pytest.mark.parametrize(
    "kwargs, argument", [({"n": 0}, "'n'"), ({"split": "val"}, "'split'"), ({"seed": 1.5}, "'seed'")]
)
def test_recommender_bad_arguments_name_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        recommender(**{"n": 10, **kwargs})


# ---- label-scarce subsets, metrics and fields carried along


def test_with_task_subsets_gives_each_task_its_own_rows():
    data = multidigits("train", num_samples=400)
    before = {n: t.clone() for n, t in data.targets.items()}
    scarce = data.with_task_subsets(30, seed=5)
    assert len(scarce) == 4 * 30 and scarce.labelled_counts() == {"left": 30, "right": 30, "sum": 30, "parity": 30}
    from fastmtl.data import labelled_mask

    masks = torch.stack([labelled_mask(t, scarce.targets[t.name]) for t in scarce.tasks])
    assert torch.equal(masks.sum(0), torch.ones(120, dtype=torch.long))  # every row labelled for exactly one task
    # The labels kept are the original rows' labels.
    index = {tuple(row.tolist()): i for i, row in enumerate(data.features)}
    rows = torch.tensor([index[tuple(row.tolist())] for row in scarce.features])
    for t in scarce.tasks:
        kept = masks[scarce.tasks.index(t)]
        assert torch.equal(scarce.targets[t.name][kept], data.targets[t.name][rows][kept])
    assert all(torch.equal(before[n], data.targets[n]) for n in before)  # the original is untouched
    assert torch.equal(data.with_task_subsets(30, seed=5).features, scarce.features)
    assert not torch.equal(data.with_task_subsets(30, seed=6).features, scarce.features)


@pytest.mark.parametrize("labels, message", [(0, "an int >= 1"), (101, "at most 100"), (2.0, "an int >= 1")])
def test_with_task_subsets_bad_sizes(labels, message):
    with pytest.raises(ValueError, match=f"with_task_subsets: argument 'labels_per_task' expected {message}"):
        multidigits("train", num_samples=400).with_task_subsets(labels)


def test_metrics_and_fields_survive_subsets_and_hidden_labels():
    data = recommender(300)
    for derived in (data.subset(slice(0, 50)), data.with_missing_labels(0.5), data.with_task_subsets(20)):
        assert derived.metrics == data.metrics and derived.field_cardinalities == data.field_cardinalities


def test_dataset_metrics_and_fields_are_checked():
    tasks = [Task("b", "binary"), Task("y", "regression")]
    x, targets = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), {"b": torch.tensor([0.0, 1.0]), "y": torch.zeros(2)}
    data = MultiTaskDataset(x, targets, tasks, metrics={"b": ["auc"]}, field_cardinalities=[3, 2])
    assert data.metrics == {"b": ("auc",), "y": ("rmse", "mae")}
    with pytest.raises(ValueError, match="'metrics' names unknown tasks"):
        MultiTaskDataset(x, targets, tasks, metrics={"c": ["auc"]})
    with pytest.raises(ValueError, match="'metrics' expected names among rmse, mae"):
        MultiTaskDataset(x, targets, tasks, metrics={"y": ["auc"]})
    with pytest.raises(ValueError, match="feature column 0 expected category indices in \\[0, 2\\)"):
        MultiTaskDataset(x, targets, tasks, field_cardinalities=[2, 2])
    with pytest.raises(ValueError, match="'field_cardinalities' expected 2 ints"):
        MultiTaskDataset(x, targets, tasks, field_cardinalities=[3])
