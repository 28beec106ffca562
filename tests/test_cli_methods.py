"""The methods added in issue 17 run from the command line (``--method``): every new Gram aggregator and
weighting trains a tiny model to finite metrics, and so does every method that needs the per-task gradients
(the fused engine supplies them in exact mode), and so do the cross-Gram methods (model.mtl_backward
gives them the cross-Gram of each batch's two halves)."""

import json
import math

import pytest

import fastmtl.aggregation as agg
from fastmtl.cli import main
from fastmtl.cli.names import METHODS

TINY = ["--train-samples", "128", "--test-samples", "64", "--epochs", "1", "--batch-size", "64", "--hidden", "8"]


def _finite(value):
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.parametrize(
    "method",
    [
        *("krum", "pcd", "crmogm", "stch", "cosmos", "pbi", "metabalance"),
        *("graddrop", "trimmedmean", "excessmtl", "moco", "modo", "sdmgrad"),
    ],
)
def test_new_methods_train_from_the_command_line(tmp_path, method):
    out = tmp_path / method
    assert main(["train", "--method", method, *TINY, "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["method"] == METHODS[method] and _finite(report)


def test_the_methods_that_need_more_than_the_gram_are_offered():
    for name in ("MoDo", "SDMGrad"):
        assert getattr(agg, name).requires == "cross_gram" and name.lower() in METHODS
    for name in ("GradDrop", "TrimmedMean", "ExcessMTL", "MoCo"):
        assert getattr(agg, name).requires == "jacobian" and name.lower() in METHODS


def test_a_jacobian_method_in_a_mode_without_per_task_gradients_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "graddrop", "--mode", "rep", *TINY, "--no-progress", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument 'mode' expected 'exact' with GradDrop" in capsys.readouterr().err


def test_a_cross_gram_method_in_rep_mode_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "modo", "--mode", "rep", *TINY, "--no-progress", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument 'mode' expected 'exact' with MoDo" in capsys.readouterr().err
