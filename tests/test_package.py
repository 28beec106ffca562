"""The package: version, build info, the torch-version guard, runnable docs."""

import doctest
import importlib
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest
import torch

import fastmtl
import fastmtl.aggregation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_and_build_info():
    assert re.fullmatch(r"\d+\.\d+\.\d+", fastmtl.__version__)
    info = fastmtl.build_info()
    assert info["version"] == fastmtl.__version__
    assert info["torch"] == torch.__version__
    assert info["torch_built_against"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert isinstance(info["cuda"], bool)
    assert info["threads"] == torch.get_num_threads()


def test_import_under_another_torch_raises_import_error_saying_rebuild():
    code = "import torch; torch.__version__ = '1.99.0'; import fastmtl"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "built against torch" in proc.stderr and "rebuild" in proc.stderr


def test_ops_are_registered_under_torch_ops():
    for name in ("fused_mlp", "fused_mlp_backward", "multitask_head_loss", "multitask_head_loss_backward",
                 "pack_targets", "dual_cone_projection", "dual_cone_weights", "min_norm_weights", "cagrad_weights", "power_system_weights",
                 "pcgrad_weights", "gradvac_weights", "aligned_mtl_weights", "imtlg_weights", "config_weights",
                 "mtl_trunk_gram", "mtl_representation_gram", "mtl_weighted_backward"):
        assert hasattr(torch.ops.fastmtl, name)


WEIGHTING_MODULES = ["equal", "uncertainty", "dwa", "rlw", "gradnorm", "famo", "dbmtl", "imtl", "gls", "stch", "cosmos", "pbi",
                     "metabalance"]
# One module per method (issue 17).
AGGREGATION_MODULES = sorted(m.name for m in pkgutil.iter_modules(fastmtl.aggregation.__path__) if not m.name.startswith("_"))


@pytest.mark.parametrize(
    "module",
    ["fastmtl.tasks", "fastmtl.ops", "fastmtl.nn.fused_mlp", "fastmtl.nn.heads", "fastmtl.nn.model"]
    + ["fastmtl.weighting"] + [f"fastmtl.weighting.{name}" for name in WEIGHTING_MODULES]
    + ["fastmtl.engine", "fastmtl.ops.engine", "fastmtl.ops.aggregation", "fastmtl.aggregation"] + [f"fastmtl.aggregation.{name}" for name in AGGREGATION_MODULES],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0


def test_readme_usage_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
