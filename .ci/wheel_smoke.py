"""Smoke test of an installed fastmtl wheel, run from outside the source tree by .ci/run: the
package imports from site-packages (not the checkout), its metadata pins the torch it was built
against, and one fused training step and one aggregation step run."""

import importlib.metadata
import pathlib
import sys

import torch

import fastmtl

source_tree = pathlib.Path(__file__).resolve().parents[1]
location = pathlib.Path(fastmtl.__file__).resolve()
assert source_tree not in location.parents, f"fastmtl imported from the source tree: {location}"

dist = importlib.metadata.distribution("fastmtl-torch")
torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
expected_tag = "+pt" + torch_minor.replace(".", "")
assert dist.version.startswith(fastmtl.__version__ + expected_tag), (dist.version, expected_tag)
requires = dist.requires or []
assert f"torch=={torch_minor}.*" in requires, requires

tasks = [fastmtl.Task("click", "binary"), fastmtl.Task("rating", "multiclass", num_outputs=3)]
model = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(8, [16, 16]), fastmtl.nn.MultiTaskHeads(16, tasks))
x = torch.randn(32, 8)
targets = {"click": torch.randint(0, 2, (32,)).float(), "rating": torch.randint(0, 3, (32,))}
model.loss(x, targets).backward()
assert all(p.grad is not None for p in model.parameters())
model.zero_grad()
result = model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad())
assert result.gram.shape == (2, 2) and torch.isfinite(result.weights).all()
print(
    f"wheel smoke test passed: fastmtl-torch {dist.version} from {location.parent}, requires {requires}",
    file=sys.stderr,
)
