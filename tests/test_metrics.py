"""fastmtl.metrics against hand-computed values: accuracy, RMSE, MAE, AUC (against its pairwise definition,
ties included) with missing labels, Delta_m%."""

import math

import pytest
import torch

from fastmtl import Task
from fastmtl.metrics import all_task_metrics, delta_m, predictions, task_metrics

NAN = float("nan")


def test_multiclass_accuracy_ignores_missing_rows():
    task = Task("c", "multiclass", num_outputs=3)
    logits = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [5.0, 0, 0], [0, 9.0, 0]])
    target = torch.tensor([0, 2, 2, -100, 1])  # right, wrong, right, (missing), right
    assert task_metrics(task, logits, target) == {"accuracy": 0.75}


def test_binary_accuracy_thresholds_logits_at_zero():
    task = Task("b", "binary")
    logits = torch.tensor([[0.3], [-0.1], [2.0], [-4.0], [0.0]])
    target = torch.tensor([1.0, 1.0, NAN, 0.0, 0.0])  # right, wrong, (missing), right, right (0 -> class 0)
    assert task_metrics(task, logits, target) == {"accuracy": 0.75}
    assert predictions(task, logits).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_regression_rmse_and_mae_by_hand():
    task = Task("y", "regression")
    logits = torch.tensor([[1.0], [2.0], [4.0], [100.0]])
    target = torch.tensor([0.0, 2.0, 1.0, NAN])  # errors 1, 0, 3
    metrics = task_metrics(task, logits, target)
    assert metrics["rmse"] == pytest.approx(math.sqrt(10 / 3), rel=1e-12)
    assert metrics["mae"] == pytest.approx(4 / 3, rel=1e-12)


def test_multi_output_regression_counts_labelled_entries():
    task = Task("y", "regression", num_outputs=2)
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, NAN], [2.0, -2.0]])  # errors 0, -2, 2
    metrics = task_metrics(task, logits, target)
    assert metrics["rmse"] == pytest.approx(math.sqrt(8 / 3))
    assert metrics["mae"] == pytest.approx(4 / 3)


def test_a_task_without_labels_gets_nan():
    assert math.isnan(task_metrics(Task("b", "binary"), torch.zeros(2, 1), torch.full((2,), NAN))["accuracy"])
    assert all(
        math.isnan(v) for v in task_metrics(Task("y", "regression"), torch.zeros(2, 1), torch.full((2,), NAN)).values()
    )


def test_all_task_metrics_and_inputs_unmodified():
    tasks = [Task("c", "multiclass", num_outputs=2), Task("y", "regression")]
    logits = {"c": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "y": torch.tensor([[0.5], [1.5]])}
    targets = {"c": torch.tensor([0, 0]), "y": torch.tensor([0.5, NAN])}
    logits_before = {k: v.clone() for k, v in logits.items()}
    targets_before = {k: v.clone() for k, v in targets.items()}
    metrics = all_task_metrics(tasks, logits, targets)
    assert metrics == {"c": {"accuracy": 0.5}, "y": {"rmse": 0.0, "mae": 0.0}}
    assert all(torch.equal(logits[k], logits_before[k]) for k in logits)
    assert all(
        torch.equal(
            targets[k],
            targets_before[k],
        )
        if k == "c"
        else torch.allclose(targets[k], targets_before[k], equal_nan=True)
        for k in targets
    )


def test_delta_m_by_hand():
    baseline = {"a": {"accuracy": 0.5}, "b": {"rmse": 2.0, "mae": 4.0}}
    # a: +20% (0.6 vs 0.5, higher better); b: rmse 1.5 vs 2 -> +25%, mae 5 vs 4 -> -25%: mean 0
    model = {"a": {"accuracy": 0.6}, "b": {"rmse": 1.5, "mae": 5.0}}
    assert delta_m(model, baseline) == pytest.approx(10.0)
    assert delta_m(baseline, baseline) == 0.0
    worse = {"a": {"accuracy": 0.4}, "b": {"rmse": 3.0, "mae": 6.0}}  # -20%, mean(-50%, -50%) -> -35%
    assert delta_m(worse, baseline) == pytest.approx(-35.0)


def test_delta_m_bad_inputs():
    with pytest.raises(ValueError, match="non-zero baseline"):
        delta_m({"a": {"rmse": 1.0}}, {"a": {"rmse": 0.0}})
    with pytest.raises(ValueError, match="no task 'b'"):
        delta_m({"a": {"rmse": 1.0}}, {"b": {"rmse": 1.0}})
    with pytest.raises(ValueError, match="unknown metric"):
        delta_m({"a": {"f1": 1.0}}, {"a": {"f1": 1.0}})
    with pytest.raises(ValueError, match="at least one task"):
        delta_m({}, {})


def test_metrics_shape_mismatch_names_logits():
    with pytest.raises(ValueError, match="logits"):
        task_metrics(Task("y", "regression"), torch.zeros(3, 1), torch.zeros(2))


# ---- AUC


def _pairwise_auc(scores, labels):
    """The definition: the share of (positive, negative) pairs ranked right, a tie counting one half."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_the_pairwise_definition_with_ties_and_missing_labels():
    from fastmtl.metrics import auc

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(2, 60, (1,), generator=generator))
        scores = torch.randint(0, 6, (n,), generator=generator).float()  # few distinct values: many ties
        labels = torch.randint(0, 2, (n,), generator=generator).float()
        labels[torch.rand(n, generator=generator) < 0.2] = NAN
        labelled = ~torch.isnan(labels)
        kept_scores, kept_labels = scores[labelled].tolist(), labels[labelled].tolist()
        before = (scores.clone(), labels.clone())
        value = auc(scores, labels)
        if 0 < sum(kept_labels) < len(kept_labels):
            assert value == pytest.approx(_pairwise_auc(kept_scores, kept_labels), abs=1e-12), trial
        else:
            assert math.isnan(value)
        assert torch.equal(scores, before[0]) and torch.equal(torch.isnan(labels), torch.isnan(before[1]))
        assert torch.equal(torch.nan_to_num(labels, 7.0), torch.nan_to_num(before[1], 7.0))  # inputs unmodified


def test_auc_extremes_and_ties():
    from fastmtl.metrics import auc

    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), labels) == 1.0
    assert auc(torch.tensor([4.0, 3.0, 2.0, 1.0]), labels) == 0.0
    assert auc(torch.zeros(4), labels) == 0.5  # all tied: no information
    assert math.isnan(auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, NAN])))  # no negative


def test_auc_bad_inputs_name_the_argument():
    from fastmtl.metrics import auc

    with pytest.raises(ValueError, match="'scores' and 'labels'"):
        auc(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="'labels' expected 0/1"):
        auc(torch.zeros(2), torch.tensor([0.0, 2.0]))
    with pytest.raises(TypeError, match="'scores'"):
        auc([0.1, 0.2], torch.zeros(2))


def test_binary_task_scored_by_auc_over_labelled_entries_only():
    task = Task("click", "binary")
    logits = torch.tensor([[-1.0], [2.0], [0.5], [9.0], [-3.0]])
    target = torch.tensor([0.0, 1.0, 1.0, NAN, 0.0])
    assert task_metrics(task, logits, target, metrics=["auc"]) == {"auc": 1.0}
    both = task_metrics(task, logits, target, metrics=("accuracy", "auc"))
    assert both == {"accuracy": 1.0, "auc": 1.0}
    assert all_task_metrics([task], {"click": logits}, {"click": target}, {"click": ["auc"]}) == {"click": {"auc": 1.0}}
    with pytest.raises(ValueError, match="'metrics' expected names among accuracy, auc"):
        task_metrics(task, logits, target, metrics=["rmse"])
    with pytest.raises(ValueError, match="'metrics'"):
        task_metrics(Task("c", "multiclass", num_outputs=3), torch.zeros(2, 3), torch.tensor([0, 1]), metrics=["auc"])


def test_delta_m_of_auc_is_higher_is_better():
    assert delta_m({"click": {"auc": 0.66}}, {"click": {"auc": 0.60}}) == pytest.approx(10.0)
