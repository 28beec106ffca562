"""The batched backward of the heads, experts, gates and norm towers (csrc/ops/head_loss_batched.cpp,
csrc/ops/per_task_batched.cpp): their backward ops at the Batched key of torch's legacy vmap, which
torch.autograd.grad(..., is_grads_batched=True) and fastmtl.mtl_backward's batched paths run.
Against T separate backward passes; the refusal of a vmap over anything but the cotangent; the
planner's task loop through the ops whose rule loops (and its call counts)."""

import pytest
import torch
from torch._vmap_internals import _vmap

import fastmtl
from conftest import assert_rel_close
from fastmtl import Task
from fastmtl.engine.trunk_gram import FUSED_LOOPING_NODES, plan_gram
from fastmtl.nn import PLE, FusedMLP, MMoE, MultiTaskHeads, MultiTaskModel
from fastmtl.nn.experts import ExpertBank, TaskGates


def batched_and_looped(outputs, inputs, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn((T,) + tuple(outputs.shape), generator=g, dtype=torch.float64).to(outputs.dtype)
    batched = torch.autograd.grad(outputs, inputs, grad_outputs=cot, is_grads_batched=True, retain_graph=True)
    passes = [torch.autograd.grad(outputs, inputs, grad_outputs=cot[t], retain_graph=True) for t in range(T)]
    return batched, [torch.stack(per) for per in zip(*passes)]


def assert_batched_equals_passes(outputs, inputs, T, rtol=1e-12):
    batched, looped = batched_and_looped(outputs, inputs, T)
    assert len(batched) == len(looped) == len(inputs)
    for got, want in zip(batched, looped):
        assert got.shape == want.shape
        assert_rel_close(got, want, rtol, "gradient")


TASKS = [
    Task("click", "binary"),
    Task("rating", "multiclass", num_outputs=4),
    Task("dwell", "regression", weight=0.5),
    Task("sizes", "regression", num_outputs=2),
]


def head_targets(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    click = torch.randint(0, 2, (batch,), generator=g).double()
    click[::3] = float("nan")
    rating = torch.randint(0, 4, (batch,), generator=g)
    rating[1::4] = -100
    return {
        "click": click,
        "rating": rating,
        "dwell": torch.randn(batch, generator=g, dtype=torch.float64),
        "sizes": torch.randn(batch, 2, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("z_grad", [True, False])
@pytest.mark.parametrize("T", [1, 4, 11])
def test_head_loss_backward_batched_equals_task_passes(batch, z_grad, T):
    torch.manual_seed(0)
    heads = MultiTaskHeads(5, TASKS, dtype=torch.float64)
    z = torch.randn(batch, 5, dtype=torch.float64, requires_grad=z_grad)
    losses = heads.losses(z, head_targets(batch))
    inputs = list(heads.parameters()) + ([z] if z_grad else [])
    # T cotangents of the [4] losses (the engine's are one-hot rows; any rows batch the same way)
    assert_batched_equals_passes(losses, inputs, T)
    with torch.profiler.profile() as prof:
        torch.autograd.grad(
            losses, inputs, torch.ones(T, 4, dtype=torch.float64), is_grads_batched=True, retain_graph=True
        )
    assert op_calls(prof, "fastmtl::multitask_head_loss_backward") == 1  # the batched rule, not torch's loop


def op_calls(prof, name):
    return sum(e.count for e in prof.key_averages() if e.key == name)


def test_head_loss_backward_batched_without_bias_and_in_bfloat16():
    torch.manual_seed(0)
    weight = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    layout = fastmtl.ops.task_layout(TASKS)
    targets = fastmtl.ops.pack_targets(head_targets(6), layout, torch.float64)
    losses = fastmtl.ops.multitask_head_loss(z, weight, None, targets, layout)
    assert_batched_equals_passes(losses, [weight, z], 5)
    # bf16: the batched rule rounds G once to bfloat16 and runs the GEMMs in it, as the op does
    z16, w16 = z.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    losses16 = fastmtl.ops.multitask_head_loss(z16, w16, None, targets.float(), layout)
    batched, looped = batched_and_looped(losses16, [w16, z16], 5)
    for got, want in zip(batched, looped):
        assert got.dtype == torch.bfloat16
        assert_rel_close(got.double(), want.double(), 1e-2, "gradient")


@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
@pytest.mark.parametrize("T", [2, 9])
def test_expert_bank_backward_batched_equals_task_passes(shared_input, norm, T):
    torch.manual_seed(0)
    bank = ExpertBank(6, 3, [7, 5], "gelu", norm=norm, dropout=0.2 if norm else 0.0).double()
    x = torch.randn(3, 10, 6, dtype=torch.float64) if not shared_input else torch.randn(10, 6, dtype=torch.float64)
    x.requires_grad_()
    out = bank(x)  # training mode: batch statistics and dropout masks, saved for the backward
    assert_batched_equals_passes(out, list(bank.parameters()) + [x], T)
    op = "fastmtl::fused_experts_backward" if norm is None else "fastmtl::fused_mlp_norm_backward"
    with torch.profiler.profile() as prof:
        torch.autograd.grad(out, [x], torch.ones((T,) + out.shape, dtype=torch.float64), is_grads_batched=True)
    # the rule's own dispatch, then the kernel once per task inside it (torch's fallback refused these ops)
    assert op_calls(prof, op) == T + 1


@pytest.mark.parametrize("per_task_input", [False, True])
@pytest.mark.parametrize("expert_index", [None, [[0, 2], [1, 2], [2, 0]]])
@pytest.mark.parametrize("hidden", [(), (4,)])
def test_gated_mixture_backward_batched_equals_task_passes(per_task_input, expert_index, hidden):
    torch.manual_seed(0)
    width = 3 if expert_index is None else 2
    gates = TaskGates(6, 3, width, expert_index=expert_index, hidden=hidden).double()
    x = torch.randn(3, 8, 6, dtype=torch.float64) if per_task_input else torch.randn(8, 6, dtype=torch.float64)
    x.requires_grad_()
    experts = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    mixtures = gates(x, experts)
    assert_batched_equals_passes(mixtures, list(gates.parameters()) + [x, experts], 7)


def test_norm_tower_backward_batched_equals_task_passes_in_eval_and_float32():
    torch.manual_seed(0)
    trunk = FusedMLP(6, [9, 5], norm="batch", dropout=0.1).double()
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    assert_batched_equals_passes(trunk(x), list(trunk.parameters()) + [x], 6)
    trunk.eval()
    assert_batched_equals_passes(trunk(x), list(trunk.parameters()) + [x], 6)
    trunk32 = FusedMLP(6, [9, 5], norm="layer").float()
    x32 = torch.randn(12, 6, requires_grad=True)
    assert_batched_equals_passes(trunk32(x32), list(trunk32.parameters()) + [x32], 4, rtol=1e-6)


def test_batching_anything_but_the_cotangent_is_refused_naming_the_op():
    torch.manual_seed(0)
    layout = fastmtl.ops.task_layout(TASKS)
    z, weight = torch.randn(6, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    targets = fastmtl.ops.pack_targets(head_targets(6), layout, torch.float64)
    _, logit_grad, scale = torch.ops.fastmtl.multitask_head_loss(
        z, weight, None, targets, ["bce", "ce", "mse", "mse"], [1, 4, 1, 2]
    )
    ones = torch.ones(4, dtype=torch.float64)
    with pytest.raises(
        RuntimeError, match="multitask_head_loss_backward: a vmap over the forward's tensors.*'grad_losses'"
    ):
        _vmap(
            lambda zi: torch.ops.fastmtl.multitask_head_loss_backward(
                ones, zi, weight, logit_grad, scale, [1, 4, 1, 2], False, True
            )[0]
        )(torch.stack([z, z]))
    experts = torch.randn(3, 6, 4, dtype=torch.float64)
    gate_weight = torch.randn(2, 3, 5, dtype=torch.float64)
    mixtures, gates = torch.ops.fastmtl.gated_mixture(z, gate_weight, None, experts, [])
    g = torch.ones_like(mixtures)
    with pytest.raises(
        RuntimeError, match="gated_mixture_backward: a vmap over the forward's tensors.*'grad_mixtures'"
    ):
        _vmap(lambda ei: torch.ops.fastmtl.gated_mixture_backward(g, z, gate_weight, ei, gates, [], False, False)[3])(
            torch.stack([experts, experts])
        )


def mixture_case():
    """A raw gated_mixture call's inputs and outputs: (z, gate_weight, experts, mixtures, gates)."""
    torch.manual_seed(0)
    experts = torch.randn(3, 6, 4, dtype=torch.float64)
    gate_weight = torch.randn(2, 3, 5, dtype=torch.float64)
    z = torch.randn(6, 5, dtype=torch.float64)
    mixtures, gates = torch.ops.fastmtl.gated_mixture(z, gate_weight, None, experts, [])
    return z, gate_weight, experts, mixtures, gates


def test_bad_arguments_under_the_batched_rule_raise_the_ops_own_errors():
    z, gate_weight, experts, _, gates = mixture_case()
    wrong = torch.ones(2, 2, 6, 3, dtype=torch.float64)  # h = 3, the experts have 4 features
    with pytest.raises(ValueError, match="gated_mixture_backward: argument 'grad_mixtures' expected shape"):
        _vmap(
            lambda gi: torch.ops.fastmtl.gated_mixture_backward(gi, z, gate_weight, experts, gates, [], False, False)[1]
        )(wrong)


def mmoe_model(T, norm=None, trunk="mmoe"):
    torch.manual_seed(4)
    tasks = [Task(f"t{i}", "binary") for i in range(T)]
    if trunk == "mmoe":
        body = MMoE(8, 3, [10, 6], T, norm=norm, dropout=0.1 if norm else 0.0)
    else:
        body = PLE(8, 2, 1, [10, 6], T)
    model = MultiTaskModel(body, MultiTaskHeads(6, tasks)).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    targets = {f"t{i}": torch.randint(0, 2, (16,)).double() for i in range(T)}
    return model, x, targets


def test_the_loop_nodes_are_the_graph_nodes_of_the_fused_ops():
    """A renamed autograd node would silently send MMoE back to the vmapped path: the names must be those
    in the graphs of the experts, the gates and the norm towers."""
    model, x, _ = mmoe_model(3, norm="batch")
    plain, _, _ = mmoe_model(3)
    names = set()
    for z in (model.trunk.task_features(x), plain.trunk.task_features(x)):
        stack, seen = [z.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            names.add(node.name())
            stack.extend(f for f, _ in node.next_functions)
    assert FUSED_LOOPING_NODES <= names


@pytest.mark.parametrize("trunk", ["mmoe", "ple"])
def test_mtl_backward_on_mixture_of_experts_takes_the_task_loop_with_one_experts_backward_per_task(trunk):
    T = 4
    model, x, targets = mmoe_model(T, trunk=trunk)
    z = model.trunk.task_features(x)
    plan = plan_gram([z], model.trunk.shared_parameters(), T)
    assert plan.path == "task-loop" and "GatedMixtureFunction" in plan.reason
    with torch.profiler.profile() as prof:
        result = model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad(), keep_jacobian=True)
    calls = sum(e.count for e in prof.key_averages() if e.key == "fastmtl::fused_experts_backward")
    # T passes through the shared experts; the update is the Jacobian's weighted sum, no further
    # backward; PLE's task experts (task-specific) run once more, in the heads' pass after them
    assert result.path == "task-loop"
    assert calls == T + (trunk == "ple")
    want_model, _, _ = mmoe_model(T, trunk=trunk)
    want = want_model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad(), keep_jacobian=True, memory_budget=1)
    assert want.path == "streamed"  # the batched rules, through the streamed sweep
    assert_rel_close(result.gram, want.gram, 1e-10, "gram")
    for p, q in zip(model.parameters(), want_model.parameters()):
        assert_rel_close(p.grad, q.grad, 1e-10, "gradient")


def test_an_empty_batch_of_cotangents_is_refused_naming_the_argument():
    z, gate_weight, experts, mixtures, gates = mixture_case()
    empty = torch.zeros((0,) + tuple(mixtures.shape), dtype=torch.float64)
    with pytest.raises(
        ValueError, match="gated_mixture_backward: argument 'grad_mixtures' expected a batch of at least one"
    ):
        _vmap(
            lambda gi: torch.ops.fastmtl.gated_mixture_backward(gi, z, gate_weight, experts, gates, [], False, False)[1]
        )(empty)
    layout = fastmtl.ops.task_layout(TASKS)
    weight = torch.randn(8, 5, dtype=torch.float64)
    targets = fastmtl.ops.pack_targets(head_targets(6), layout, torch.float64)
    _, logit_grad, scale = torch.ops.fastmtl.multitask_head_loss(
        z, weight, None, targets, ["bce", "ce", "mse", "mse"], [1, 4, 1, 2]
    )
    with pytest.raises(ValueError, match="multitask_head_loss_backward: argument 'grad_losses' expected a batch"):
        _vmap(
            lambda wi: torch.ops.fastmtl.multitask_head_loss_backward(
                wi, z, weight, logit_grad, scale, [1, 4, 1, 2], False, True
            )[0]
        )(torch.zeros(0, 4, dtype=torch.float64))
