"""The methods added in issue 17 run from the command line (``--method``): every new Gram aggregator and
weighting trains a tiny model to finite metrics; the methods the engines cannot supply yet (they need
the per-task gradients or a cross-Gram) are not offered."""

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


@pytest.mark.parametrize("method", ["krum", "pcd", "crmogm", "stch", "cosmos", "pbi", "metabalance"])
def test_new_methods_train_from_the_command_line(tmp_path, method):
    out = tmp_path / method
    assert main(["train", "--method", method, *TINY, "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["method"] == METHODS[method] and _finite(report)


def test_methods_the_engines_cannot_supply_are_not_offered():
    for name in ("GradDrop", "TrimmedMean", "ExcessMTL", "MoDo", "SDMGrad"):
        assert getattr(agg, name).requires != "gram" and name.lower() not in METHODS
