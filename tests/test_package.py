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


def registered_op_names() -> set:
    """The ops the compiled extension registered under the fastmtl namespace (the schema registry)."""
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastmtl::")}


def op_names_of_the_wrappers() -> set:
    """The ops python/fastmtl/ops/ calls or registers a fake kernel for, read from its sources."""
    pattern = re.compile(r'torch\.ops\.fastmtl\.(\w+)|_fastmtl\.(\w+)\.default|"fastmtl::(\w+)"')
    names = set()
    for path in (ROOT / "python" / "fastmtl" / "ops").rglob("*.py"):
        names.update(name for match in pattern.findall(path.read_text()) for name in match if name)
    return names


def test_ops_are_registered_under_torch_ops():
    registered = registered_op_names()
    assert {"fused_mlp", "multitask_head_loss", "mtl_trunk_gram"} <= registered
    # Every registered op has a typed wrapper or fake kernel in fastmtl.ops, and every op those
    # name is registered.
    assert registered == op_names_of_the_wrappers()
    for name in registered:
        assert hasattr(torch.ops.fastmtl, name)


# The modules whose documentation shows how to use them. pytest runs every module's examples
# (pyproject.toml: --doctest-modules over python/fastmtl); these must have some, and they must be
# among the examples pytest collected.
MODULES_WITH_EXAMPLES = (
    ["fastmtl.tasks", "fastmtl.convert", "fastmtl.metrics", "fastmtl._validation"]
    + [f"fastmtl.nn.{name}" for name in ("fused_mlp", "heads", "model", "experts", "soft_sharing")]
    + [f"fastmtl.ops.{name}" for name in ("trunk", "heads", "experts", "per_task", "aggregation")]
    + ["fastmtl.engine.autograd_engine", "fastmtl.engine.options"]
    + [f"fastmtl.data.{name}" for name in ("dataset", "multidigits", "synthetic")]
    + [
        f"fastmtl.aggregation.{name}"
        for name in ["__init__"]  # one module per method (issue 17)
        + sorted(m.name for m in pkgutil.iter_modules(fastmtl.aggregation.__path__) if m.name[0] != "_")
    ]
    + [
        f"fastmtl.weighting.{name}"
        for name in (
            "__init__",
            "equal",
            "uncertainty",
            "dwa",
            "rlw",
            "gradnorm",
            "famo",
            "dbmtl",
            "imtl",
            "gls",
            "stch",
            "cosmos",
            "pbi",
            "metabalance",
            "autolambda",
        )
    ]
)


def _module(name: str):
    return importlib.import_module(name[: -len(".__init__")] if name.endswith(".__init__") else name)


@pytest.mark.parametrize("module", MODULES_WITH_EXAMPLES)
def test_docstring_examples_exist(module):
    examples = sum(len(test.examples) for test in doctest.DocTestFinder().find(_module(module)))
    assert examples > 0, f"{module} has no examples"


def test_docstring_examples_run_under_pytest(request):
    """The examples run as pytest items (DoctestItem), collected from the package's source files:
    with the README's ``python -m pytest tests -q`` too."""
    if not request.config.getoption("doctestmodules"):
        pytest.skip("run without --doctest-modules (pyproject.toml's addopts were overridden)")
    package = ROOT / "python" / "fastmtl"
    if not any(pathlib.Path(arg).resolve() == package for arg in request.config.args):
        pytest.skip("the package's sources are not collected in this run (a selection of test files)")
    collected = {item.name.split(".")[0] for item in request.session.items if type(item).__name__ == "DoctestItem"}
    assert collected == {"fastmtl"}
    names = {item.name for item in request.session.items if type(item).__name__ == "DoctestItem"}
    for module in MODULES_WITH_EXAMPLES:
        prefix = module[: -len(".__init__")] if module.endswith(".__init__") else module
        assert any(n == prefix or n.startswith(prefix + ".") for n in names), f"{module}: no examples collected"


def test_readme_usage_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
