"""The architecture modules of fastmtl.nn (CrossStitch, MTAN, DSelectK, SharedBottom, ESMM, AITM)
against their plain-PyTorch references in fastmtl.reference.architectures, in MultiTaskModel and
under both engines (model.mtl_backward, fastmtl.mtl_backward) against fastmtl.reference.mtl_backward."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
from conftest import assert_rel_close, mixed_tasks, random_targets
from fastmtl import Task, reference
from fastmtl.aggregation import UPGrad
from fastmtl.nn import (
    AITM,
    ESMM,
    MTAN,
    CrossStitch,
    DSelectK,
    LearningToBranch,
    MultiTaskHeads,
    MultiTaskModel,
    SharedBottom,
)
from fastmtl.nn.routing import routed_logits, routed_losses


def reference_features(m, x):
    """The reference of ``m.task_features(x)``, computed from m's own parameters."""
    if isinstance(m, CrossStitch):
        return reference.cross_stitch(x, list(m.weights), list(m.biases), m.stitch, m.activation)
    if isinstance(m, MTAN):
        attention = list(zip(m.attention_weights1, m.attention_biases1, m.attention_weights2, m.attention_biases2))
        return reference.mtan(
            x,
            list(m.shared.weights),
            list(m.shared.biases),
            [b.weights[0] for b in m.bridges],
            [b.biases[0] for b in m.bridges],
            attention,
            m.activation,
        )
    if isinstance(m, DSelectK):
        return reference.dselect_k(
            x,
            list(m.experts.weights),
            list(m.experts.biases),
            m.selector_weight,
            m.selector_bias,
            m.mixing_weight,
            m.mixing_bias,
            m.gamma,
            m.activation,
        )
    if isinstance(m, LearningToBranch):
        return reference.learning_to_branch(x, list(m.weights), list(m.biases), m.branch_gates(), m.activation)
    if isinstance(m, SharedBottom):
        return reference.shared_bottom(
            x,
            list(m.bottom.weights),
            list(m.bottom.biases),
            list(m.towers.weights),
            list(m.towers.biases),
            m.activation,
        )
    bottom = (None, None) if m.bottom is None else (list(m.bottom.weights), list(m.bottom.biases))
    if isinstance(m, ESMM):
        pctr, pcvr = reference.esmm(
            x, *bottom, list(m.towers.weights), list(m.towers.biases), m.logit_weight, m.logit_bias, m.activation
        )
        return torch.stack([torch.logit(pctr), torch.logit(pctr * pcvr)]).unsqueeze(-1)
    if isinstance(m, AITM):
        return reference.aitm(
            x,
            *bottom,
            list(m.towers.weights),
            list(m.towers.biases),
            m.transfer_weight,
            m.transfer_bias,
            m.attention_weight,
            m.attention_bias,
            m.activation,
        )
    raise AssertionError(type(m))


def learning_to_branch(d, widths, T):
    """In eval mode (the discrete tree: deterministic), with random branch logits so that nodes
    pick different parents; training mode's Gumbel samples have their own tests."""
    m = LearningToBranch(d, widths, T, branches=[3] * (len(widths) - 1), activation="tanh")
    with torch.no_grad():
        for logits in m.branch_logits:
            logits.normal_()
    return m.eval()


# (name, builder(in_features, widths, num_tasks) -> module); ESMM always has 2 tasks.
ARCHS = {
    "learning_to_branch": learning_to_branch,
    "cross_stitch": lambda d, w, T: CrossStitch(d, w, T, activation="tanh"),
    "mtan": lambda d, w, T: MTAN(d, w, T, activation="silu"),
    "dselect_k": lambda d, w, T: DSelectK(d, 5, w, T, k=2, activation="gelu"),
    "dselect_k_pow2": lambda d, w, T: DSelectK(d, 4, w, T, k=3, gamma=0.7),
    "dselect_k_one_expert": lambda d, w, T: DSelectK(d, 1, w, T, k=1),
    "shared_bottom": lambda d, w, T: SharedBottom(d, [6], w, T, activation="gelu_tanh"),
    "esmm": lambda d, w, T: ESMM(d, w, activation="tanh"),
    "esmm_bottom": lambda d, w, T: ESMM(d, w, shared_hidden=[7]),
    "aitm": lambda d, w, T: AITM(d, w, T, activation="silu"),
    "aitm_bottom": lambda d, w, T: AITM(d, w, T, shared_hidden=5),
}

SHAPES = [(1, 1, [1], 1), (7, 5, [3], 2), (13, 9, [11, 5], 4)]


def num_tasks_of(name, T):
    return 2 if name.startswith("esmm") else T


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-in{s[1]}-{'x'.join(map(str, s[2]))}-T{s[3]}")
@pytest.mark.parametrize("name", list(ARCHS))
def test_matches_reference_float64_and_float32(name, shape):
    B, d, widths, T = shape
    torch.manual_seed(B + d + T)
    module = ARCHS[name](d, widths, T).double()
    if isinstance(module, DSelectK):  # selectors spread over the cubic zone and both saturated ends
        with torch.no_grad():
            module.selector_weight.normal_(0, 0.5)
    x64 = torch.randn(B, d, dtype=torch.float64)
    ref = reference_features(module, x64)
    # Parameters nothing reads: DSelectK's empty selectors with one expert, LearningToBranch's
    # branch logits in eval mode.
    named = [(n, p) for n, p in module.named_parameters() if p.numel() and not n.startswith("branch_logits")]
    params = [p for _, p in named]
    cot = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * cot).sum(), params)

    out = module.task_features(x64)
    assert out.shape == (num_tasks_of(name, T), B, module.out_features)
    assert_rel_close(out, ref, rtol=1e-9, what="float64 features")
    for (n, _), g, r in zip(named, torch.autograd.grad((out * cot).sum(), params), ref_grads):
        assert_rel_close(g, r, rtol=1e-9, what=f"float64 gradient of {n}")

    module32 = copy.deepcopy(module).float()
    x32 = x64.float().requires_grad_()
    out32 = module32.task_features(x32)
    assert out32.dtype == torch.float32
    assert_rel_close(out32, ref, what="float32 features")
    grads32 = torch.autograd.grad(
        (out32 * cot.float()).sum(),
        [p for n, p in module32.named_parameters() if p.numel() and not n.startswith("branch_logits")],
    )
    for (n, _), g, r in zip(named, grads32, ref_grads):
        assert_rel_close(g, r, what=f"float32 gradient of {n}")


class _Features(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module.task_features(x)


@pytest.mark.parametrize("name", list(ARCHS))
def test_gradcheck_float64(name):
    torch.manual_seed(11)
    module = ARCHS[name](4, [3, 2], 3).double()
    wrapper = _Features(module)
    names = [n for n, _ in wrapper.named_parameters()]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return torch.func.functional_call(wrapper, dict(zip(names, params)), (x,))

    inputs = (x,) + tuple(p.detach().clone().requires_grad_() for p in wrapper.parameters())
    assert torch.autograd.gradcheck(f, inputs)


def model_and_targets(name, batch, seed, num_tasks=3):
    torch.manual_seed(seed)
    trunk = ARCHS[name](6, [7, 5], num_tasks).double()
    if isinstance(trunk, ESMM):
        model = MultiTaskModel(trunk, trunk.heads())
        gen = torch.Generator().manual_seed(seed)
        click = torch.randint(0, 2, (batch,), generator=gen).double()
        conversion = torch.where(click == 1, torch.randint(0, 2, (batch,), generator=gen).double(), math.nan)
        click[0] = math.nan  # one impression without a label
        targets = trunk.targets(click, conversion)
    else:
        tasks = mixed_tasks(num_tasks)
        model = MultiTaskModel(trunk, MultiTaskHeads(5, tasks)).double()
        targets = random_targets(tasks, batch, torch.Generator().manual_seed(seed), unlabelled=("task1",))
    return model, targets


def reference_losses(model, x, targets, through_features=False):
    """Unweighted per-task losses [T] and the features, from the references alone. ESMM's losses
    are the bce of its reference probabilities unless ``through_features`` (rep mode needs losses
    computed from the features: then the bce with logits of its reference logits)."""
    trunk = model.trunk
    z = reference_features(trunk, x)
    if isinstance(trunk, ESMM) and not through_features:
        bottom = (None, None) if trunk.bottom is None else (list(trunk.bottom.weights), list(trunk.bottom.biases))
        pctr, pcvr = reference.esmm(
            x,
            *bottom,
            list(trunk.towers.weights),
            list(trunk.towers.biases),
            trunk.logit_weight,
            trunk.logit_bias,
            trunk.activation,
        )
        return reference.esmm_losses(pctr, pcvr, *targets.values()), z
    losses, row = [], 0
    for t, task in enumerate(model.tasks):
        n = task.num_outputs
        one = reference.multitask_head_loss(
            z[t],
            model.heads.weight[row : row + n],
            model.heads.bias[row : row + n],
            {task.name: targets[task.name]},
            [task],
        )
        losses.append(one[0])
        row += n
    return torch.stack(losses), z


def read_parameters(module):
    """(name, parameter) of those the module's output depends on."""
    frozen_tree = isinstance(module.trunk, LearningToBranch) and not module.trunk.training
    skip = "trunk.branch_logits" if frozen_tree else "-"
    return [(n, p) for n, p in module.named_parameters() if p.numel() and not n.startswith(skip)]


def shared_read_parameters(model):
    """The model's shared parameters (less what the trunk declares task-specific) that it reads."""
    shared = {id(p) for p in model.shared_parameters()}
    return [p for _, p in read_parameters(model) if id(p) in shared]


def grads_of(model):
    return [None if p.grad is None else p.grad.clone() for _, p in read_parameters(model)]


@pytest.mark.parametrize("name", list(ARCHS))
def test_loss_backward_matches_reference(name):
    model, targets = model_and_targets(name, 19, seed=3)
    x = torch.randn(19, 6, dtype=torch.float64)
    ref_losses, _ = reference_losses(model, x, targets)
    losses = model.losses(x, targets)
    assert_rel_close(losses, ref_losses, rtol=1e-9, what="losses")
    trainable = [p for _, p in read_parameters(model) if p.requires_grad]
    ref_grads = torch.autograd.grad(torch.dot(ref_losses, model.heads.task_weights), trainable)
    model.loss(x, targets).backward()
    for p, r in zip(trainable, ref_grads):
        assert_rel_close(p.grad, r, rtol=1e-9, what="gradient of model.loss")
    logits = model(x)
    assert list(logits) == [t.name for t in model.tasks] and all(v.shape[0] == 19 for v in logits.values())


@pytest.mark.parametrize("mode", ["exact", "rep"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_both_engines_match_the_reference_engine(name, mode):
    model, targets = model_and_targets(name, 17, seed=5)
    x = torch.randn(17, 6, dtype=torch.float64)
    by_model, by_any, by_reference = model, copy.deepcopy(model), copy.deepcopy(model)

    ref_losses, ref_z = reference_losses(by_reference, x, targets, through_features=mode == "rep")
    expected = reference.mtl_backward(
        ref_losses * by_reference.heads.task_weights,
        ref_z,
        UPGrad(),
        shared_params=shared_read_parameters(by_reference),
        mode=mode,
    )

    result_model = by_model.mtl_backward(x, targets, UPGrad(), mode=mode)
    z = by_any.trunk.task_features(x)
    losses = routed_losses(by_any.heads, z, targets) * by_any.heads.task_weights
    result_any = fastmtl.mtl_backward(losses, z, UPGrad(), shared_params=shared_read_parameters(by_any), mode=mode)

    assert_rel_close(result_model.losses, ref_losses, rtol=1e-9, what="losses")
    for result, engine in ((result_model, "model.mtl_backward"), (result_any, "fastmtl.mtl_backward")):
        assert_rel_close(result.gram, expected.gram, rtol=1e-9, what=f"{engine} Gram")
        assert_rel_close(result.weights, expected.weights, rtol=1e-7, what=f"{engine} weights")
    reference_grads = grads_of(by_reference)
    for engine, m in (("model.mtl_backward", by_model), ("fastmtl.mtl_backward", by_any)):
        for (n, _), g, r in zip(read_parameters(m), grads_of(m), reference_grads):
            assert (g is None) == (r is None), f"{engine}: .grad of {n}"
            if g is not None:
                assert_rel_close(g, r, rtol=1e-7, what=f"{engine} gradient of {n}")


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    tasks = [Task("click", "binary"), Task("rating", "multiclass", num_outputs=3), Task("time", "regression")]
    x = torch.randn(64, 8)
    targets = {"click": (x[:, 0] > 0).float(), "rating": (x[:, 1].abs() * 2).long().clamp(max=2), "time": x[:, 2]}
    for trunk in (
        CrossStitch(8, [16, 8], 3),
        MTAN(8, [16, 8], 3),
        DSelectK(8, 4, [16, 8], 3),
        SharedBottom(8, 16, 8, 3),
        AITM(8, [16, 8], 3),
    ):
        model = MultiTaskModel(trunk, MultiTaskHeads(8, tasks))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        first = model.loss(x, targets).item()
        for _ in range(40):
            opt.zero_grad()
            model.loss(x, targets).backward()
            opt.step()
        assert model.loss(x, targets).item() < 0.7 * first, type(trunk).__name__


# ---- module-specific behaviour


def test_cross_stitch_initial_units():
    assert torch.equal(CrossStitch(3, 2, 1).stitch, torch.ones(1, 1, 1))
    stitch = CrossStitch(3, [2, 2], 3, self_weight=0.8).stitch.detach()
    assert torch.allclose(stitch.sum(2), torch.ones(2, 3))
    assert torch.allclose(stitch[0], torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))


def test_cross_stitch_with_identity_units_is_independent_columns():
    torch.manual_seed(1)
    m = CrossStitch(5, [4, 3], 2, self_weight=1.0).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    out = m.task_features(x)
    for t in range(2):
        expected = reference.fused_mlp(x, [w[t] for w in m.weights], [b[t] for b in m.biases], "relu")
        assert_rel_close(out[t], expected, rtol=1e-12, what=f"column {t}")


def test_mtan_masks_are_in_zero_one_and_scale_the_shared_features():
    torch.manual_seed(2)
    m = MTAN(5, [4], 3).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    shared = m.shared(x)
    out = m.task_features(x)
    ratio = out / shared.where(shared != 0, torch.ones_like(shared))
    assert bool(((ratio > 0) & (ratio < 1))[:, shared != 0].all())
    assert not torch.allclose(out[0], out[1])  # tasks attend differently


def test_dselect_k_gates():
    torch.manual_seed(3)
    for E in (1, 2, 3, 5, 8):
        m = DSelectK(6, E, [4], 2, k=2).double()
        x = torch.randn(9, 6, dtype=torch.float64)
        gates = m.gates(x)
        assert gates.shape == (2, 9, E)
        assert_rel_close(gates.sum(-1), torch.ones(2, 9, dtype=torch.float64), rtol=1e-12, what=f"E={E} gate sums")
        assert bool((gates >= 0).all())
        assert_rel_close(
            gates,
            reference.dselect_k_gates(
                x, m.selector_weight, m.selector_bias, m.mixing_weight, m.mixing_bias, E, m.gamma
            ),
            rtol=1e-12,
            what="gates",
        )
        # At initialisation every selector is inside the smooth-step's cubic zone: all experts in use.
        assert bool((gates > 0).all())


def test_dselect_k_saturated_selectors_pick_at_most_k_experts_and_have_zero_entropy():
    torch.manual_seed(4)
    m = DSelectK(6, 8, [4], 3, k=2).double()
    with torch.no_grad():  # bits fixed by the biases, far outside the cubic zone
        m.selector_weight.zero_()
        m.selector_bias.copy_(torch.randint(0, 2, m.selector_bias.shape).double() * 4 - 2)
    x = torch.randn(10, 6, dtype=torch.float64)
    gates = m.gates(x)
    assert bool(((gates > 0).sum(-1) <= 2).all())
    entropy = m.selector_entropy(x)
    assert entropy.item() == 0.0
    entropy.backward()  # saturated: zero gradient, not NaN
    assert torch.equal(m.selector_weight.grad, torch.zeros_like(m.selector_weight))
    m.zero_grad()
    with torch.no_grad():
        m.selector_bias.zero_()  # every bit at 1/2: each selector uniform over the 8 experts
    entropy = m.selector_entropy(x)
    assert_rel_close(entropy, torch.tensor(3 * 2 * math.log(8), dtype=torch.float64), rtol=1e-12, what="max entropy")


@pytest.mark.parametrize("E", [3, 5, 6])
def test_dselect_k_selector_entropy_matches_reference(E):
    torch.manual_seed(E)
    m = DSelectK(4, E, [3], 2, k=3).double()
    with torch.no_grad():
        m.selector_weight.normal_(0, 0.6)
    x = torch.randn(7, 4, dtype=torch.float64)
    got = m.selector_entropy(x)
    expected = reference.dselect_k_selector_entropy(x, m.selector_weight, m.selector_bias, E, m.gamma)
    assert_rel_close(got, expected, rtol=1e-12, what="entropy")
    (g,) = torch.autograd.grad(got, m.selector_weight)
    (r,) = torch.autograd.grad(expected, m.selector_weight)
    assert_rel_close(g, r, rtol=1e-10, what="entropy gradient")


def test_esmm_probabilities_and_product():
    torch.manual_seed(5)
    esmm = ESMM(6, [5]).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    p = esmm.probabilities(x)
    pctr, pcvr = reference.esmm(
        x, None, None, list(esmm.towers.weights), list(esmm.towers.biases), esmm.logit_weight, esmm.logit_bias, "relu"
    )
    assert_rel_close(p["ctr"], pctr, rtol=1e-12, what="pCTR")
    assert_rel_close(p["cvr"], pcvr, rtol=1e-12, what="pCVR")
    assert_rel_close(p["ctcvr"], pctr * pcvr, rtol=1e-12, what="pCTCVR")
    heads = esmm.heads()
    assert not any(q.requires_grad for q in heads.parameters())
    assert [t.name for t in heads.tasks] == ["ctr", "ctcvr"] and all(t.kind == "binary" for t in heads.tasks)


@pytest.mark.parametrize("a, b", [(20.0, 20.0), (30.0, -30.0), (-40.0, -40.0), (0.0, 45.0), (3.0, -2.0)])
def test_esmm_product_loss_is_stable_in_float32(a, b):
    """Both losses at extreme tower logits, where float32 probabilities round to 1 or 0, against
    float64 cross-entropies written without cancellation: ``log q = log s(a) + log s(b)`` and
    ``1 - s(a)s(b) = s(-a) + s(a)s(-b)`` (a sum of positive terms, not the module's logsumexp form)."""
    esmm = ESMM(3, [2])
    with torch.no_grad():
        esmm.logit_weight.zero_()
        esmm.logit_bias.copy_(torch.tensor([a, b]))
    model = MultiTaskModel(esmm, esmm.heads())
    x = torch.randn(4, 3)
    click = torch.tensor([1.0, 1.0, 0.0, 0.0])
    targets = esmm.targets(click, torch.tensor([0.0, 1.0, math.nan, math.nan]))
    losses = model.losses(x, targets)
    model.loss(x, targets).backward()

    ab = torch.tensor([a, b], dtype=torch.float64, requires_grad=True)
    s, s_neg = torch.sigmoid(ab), torch.sigmoid(-ab)
    log_q = F.logsigmoid(ab).sum()
    log_not_q = torch.log(s_neg[0] + s[0] * s_neg[1])
    y, c = targets["ctcvr"].double(), click.double()
    ctr = -(c * F.logsigmoid(ab[0]) + (1 - c) * F.logsigmoid(-ab[0])).mean()
    ctcvr = -(y * log_q + (1 - y) * log_not_q).mean()
    assert_rel_close(losses, torch.stack([ctr, ctcvr]), what="losses")
    (expected_grad,) = torch.autograd.grad(ctr + ctcvr, ab)
    assert_rel_close(esmm.logit_bias.grad, expected_grad, what="logit bias gradient")


def test_esmm_targets():
    esmm = ESMM(3, 2)
    click = torch.tensor([1.0, 0.0, math.nan, 1.0])
    conversion = torch.tensor([1.0, math.nan, math.nan, 0.0])
    before = (click.clone(), conversion.clone())
    targets = esmm.targets(click, conversion)
    assert targets["ctr"][:2].tolist() == [1.0, 0.0] and math.isnan(targets["ctr"][2])
    assert targets["ctcvr"][[0, 1, 3]].tolist() == [1.0, 0.0, 0.0] and math.isnan(targets["ctcvr"][2])
    assert torch.equal(click.nan_to_num(7), before[0].nan_to_num(7))
    assert torch.equal(conversion.nan_to_num(7), before[1].nan_to_num(7))
    assert ESMM(3, 2).targets(torch.tensor([True, False]), torch.tensor([1.0, 0.0]))["ctr"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"ESMM.targets: argument 'conversion' expected 0/1 labels on every clicked"):
        esmm.targets(torch.tensor([1.0, 0.0]), torch.tensor([math.nan, 0.0]))
    with pytest.raises(ValueError, match=r"ESMM.targets: argument 'conversion' expected shape \[2\]"):
        esmm.targets(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"ESMM.targets: argument 'click' expected a 1-D tensor"):
        esmm.targets(torch.ones(2, 1), torch.ones(2, 1))


def test_aitm_calibrator_matches_reference_and_joins_the_engines():
    torch.manual_seed(6)
    funnel = [Task("click", "binary"), Task("cart", "binary"), Task("buy", "binary")]
    model = MultiTaskModel(AITM(6, [7, 5], 3), MultiTaskHeads(5, funnel)).double()
    x = torch.randn(15, 6, dtype=torch.float64)
    logits = model(x)
    calibrator = AITM.calibrator_losses(logits)
    assert calibrator.shape == (3,) and calibrator[0].item() == 0.0
    expected = reference.aitm_calibrator([torch.sigmoid(v[:, 0]) for v in logits.values()])
    assert_rel_close(calibrator.sum(), expected, rtol=1e-12, what="calibrator")
    (g,) = torch.autograd.grad(calibrator.sum(), model.heads.bias, retain_graph=True)
    (r,) = torch.autograd.grad(expected, model.heads.bias)
    assert_rel_close(g, r, rtol=1e-12, what="calibrator gradient")
    assert_rel_close(AITM.calibrator_losses(list(logits.values())), calibrator, rtol=0, what="list form")

    # The paper's loss, per task, through fastmtl.mtl_backward and the reference engine.
    gen = torch.Generator().manual_seed(7)
    targets = {t.name: torch.randint(0, 2, (15,), generator=gen).double() for t in funnel}
    reference_model = copy.deepcopy(model)
    z = model.trunk.task_features(x)
    losses = routed_losses(model.heads, z, targets) + 0.6 * AITM.calibrator_losses(routed_logits(model.heads, z))
    result = fastmtl.mtl_backward(losses, z, UPGrad())
    ref_losses, ref_z = reference_losses(reference_model, x, targets)
    ref_logits = [
        F.linear(ref_z[t], reference_model.heads.weight[t : t + 1], reference_model.heads.bias[t : t + 1])[:, 0]
        for t in range(3)
    ]
    ref_probs = [torch.sigmoid(a) for a in ref_logits]
    ref_calibrator = torch.stack(
        [ref_losses.new_zeros(())] + [reference.aitm_calibrator([p, q]) for p, q in zip(ref_probs[:-1], ref_probs[1:])]
    )
    expected_result = reference.mtl_backward(
        ref_losses + 0.6 * ref_calibrator, ref_z, UPGrad(), shared_params=list(reference_model.trunk.parameters())
    )
    assert_rel_close(result.gram, expected_result.gram, rtol=1e-9, what="Gram")
    for (n, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert_rel_close(p.grad, q.grad, rtol=1e-7, what=f"gradient of {n}")


def test_aitm_one_task_is_its_tower():
    torch.manual_seed(8)
    m = AITM(5, [4, 3], 1).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    assert m.transfer_weight.shape == (0, 3, 3)
    expected = reference.fused_mlp(x, [w[0] for w in m.towers.weights], [b[0] for b in m.towers.biases], "relu")
    assert_rel_close(m.task_features(x)[0], expected, rtol=1e-12, what="tower")


def test_aitm_attention_weights_sum_to_one():
    """With h1 the identity and no bias, z_t is a convex combination of p_{t-1} and q_t."""
    torch.manual_seed(9)
    m = AITM(4, [3], 2).double()
    with torch.no_grad():
        m.attention_weight[0, :3].copy_(torch.eye(3))
        m.attention_bias[0, :3].zero_()
    x = torch.randn(5, 4, dtype=torch.float64)
    q = m.towers(x)
    p = torch.relu(F.linear(q[0], m.transfer_weight[0], m.transfer_bias[0]))
    z = m.task_features(x)[1]
    # z = w p + (1 - w) q for one w in [0, 1] per row: solve for it on the first coordinate and check all.
    w = (z[:, 0] - q[1][:, 0]) / (p[:, 0] - q[1][:, 0])
    assert bool(((w >= 0) & (w <= 1)).all())
    assert_rel_close(z, w[:, None] * p + (1 - w[:, None]) * q[1], rtol=1e-10, what="convex combination")


@pytest.mark.parametrize("hard", [True, False])
def test_learning_to_branch_gumbel_gates_match_reference(hard):
    torch.manual_seed(10)
    m = LearningToBranch(5, [6, 4, 3], 3, branches=[2, 3], tau=0.7, hard=hard).double()
    with torch.no_grad():
        for logits in m.branch_logits:
            logits.normal_()
    noise = [-torch.empty_like(p).exponential_().log() for p in m.branch_logits]
    x = torch.randn(7, 5, dtype=torch.float64)
    gates = m.branch_gates(noise)
    ref_gates = reference.learning_to_branch_gates(list(m.branch_logits), noise, m.tau, hard)
    for g, r in zip(gates, ref_gates):
        assert_rel_close(g, r, rtol=1e-12, what="gates")
        assert (g.max(1).values == 1).all() if hard else torch.allclose(g.sum(1), torch.ones(g.shape[0], dtype=g.dtype))
    out = m.task_features(x, gates)
    ref = reference.learning_to_branch(x, list(m.weights), list(m.biases), ref_gates, m.activation)
    assert_rel_close(out, ref, rtol=1e-9, what="features")
    cot = torch.randn_like(ref)
    params = list(m.parameters())
    for (n, _), g, r in zip(
        m.named_parameters(),
        torch.autograd.grad((out * cot).sum(), params),
        torch.autograd.grad((ref * cot).sum(), params),
    ):
        assert_rel_close(g, r, rtol=1e-9, what=f"gradient of {n}")
    assert all(bool(p.grad is None) for p in params)  # autograd.grad, nothing accumulated


def test_learning_to_branch_training_mode_samples_and_both_engines():
    torch.manual_seed(11)
    tasks = mixed_tasks(3)
    model = MultiTaskModel(LearningToBranch(6, [7, 7, 5], 3, branches=[2, 2]), MultiTaskHeads(5, tasks)).double()
    targets = random_targets(tasks, 13, torch.Generator().manual_seed(12))
    x = torch.randn(13, 6, dtype=torch.float64)
    by_model, by_any, by_reference = model, copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(13)
    ref_losses, ref_z = reference_losses(by_reference, x, targets)
    expected = reference.mtl_backward(
        ref_losses * by_reference.heads.task_weights,
        ref_z,
        UPGrad(),
        shared_params=list(by_reference.trunk.parameters()),
    )
    torch.manual_seed(13)  # the same Gumbel noise in each
    result = by_model.mtl_backward(x, targets, UPGrad())
    torch.manual_seed(13)
    z = by_any.trunk.task_features(x)
    fastmtl.mtl_backward(routed_losses(by_any.heads, z, targets) * by_any.heads.task_weights, z, UPGrad())
    assert_rel_close(result.gram, expected.gram, rtol=1e-9, what="Gram")
    for m in (by_model, by_any):
        for (n, p), q in zip(m.named_parameters(), by_reference.parameters()):
            assert_rel_close(p.grad, q.grad, rtol=1e-7, what=f"gradient of {n}")
    assert by_model.trunk.branch_logits[0].grad.abs().sum() > 0  # the search gets a gradient
    # Samples differ between calls in training mode; eval mode is the argmax tree.
    draws = {tuple(tuple(g.argmax(1).tolist()) for g in model.trunk.branch_gates()) for _ in range(40)}
    assert len(draws) > 1
    model.trunk.eval()
    assert [g.argmax(1).tolist() for g in model.trunk.branch_gates()] == model.trunk.parents()
    assert torch.equal(model.trunk.task_features(x), model.trunk.task_features(x))


# ---- bad input


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (
            lambda: CrossStitch(0, [4], 2),
            ValueError,
            r"CrossStitch: argument 'in_features' expected an int >= 1, got 0",
        ),
        (lambda: CrossStitch(4, [], 2), ValueError, r"CrossStitch: argument 'hidden_features' expected at least one"),
        (
            lambda: CrossStitch(4, [3, 0], 2),
            ValueError,
            r"CrossStitch: argument 'hidden_features\[1\]' expected an int",
        ),
        (
            lambda: CrossStitch(4, [3], 2, self_weight=1.5),
            ValueError,
            r"CrossStitch: argument 'self_weight' expected a float in \[0.0, 1.0\], got 1.5",
        ),
        (
            lambda: CrossStitch(4, [3], 2, self_weight="high"),
            TypeError,
            r"CrossStitch: argument 'self_weight' expected",
        ),
        (lambda: MTAN(4, [3], 0), ValueError, r"MTAN: argument 'num_tasks' expected an int >= 1, got 0"),
        (lambda: MTAN(4, [3], 2, activation="swish"), ValueError, r"MTAN: argument 'activation' expected one of relu"),
        (lambda: MTAN(4, "3", 2), TypeError, r"MTAN: argument 'hidden_features' expected an int or a sequence"),
        (lambda: DSelectK(4, 0, [3], 2), ValueError, r"DSelectK: argument 'num_experts' expected an int >= 1, got 0"),
        (lambda: DSelectK(4, 3, [3], 2, k=0), ValueError, r"DSelectK: argument 'k' expected an int >= 1, got 0"),
        (
            lambda: DSelectK(4, 3, [3], 2, gamma=0.0),
            ValueError,
            r"DSelectK: argument 'gamma' expected a float in \(0.0",
        ),
        (lambda: DSelectK(4, 3, [3], 2, gamma=math.inf), ValueError, r"DSelectK: argument 'gamma' expected a finite"),
        (lambda: SharedBottom(4, [], [3], 2), ValueError, r"SharedBottom: argument 'bottom_hidden' expected at least"),
        (lambda: SharedBottom(4, [3], 2.5, 2), TypeError, r"SharedBottom: argument 'tower_hidden' expected an int or"),
        (
            lambda: ESMM(4, [3], task_names=("a", "a")),
            ValueError,
            r"ESMM: argument 'task_names' expected two different",
        ),
        (lambda: ESMM(4, [3], task_names="ab"), ValueError, r"ESMM: argument 'task_names' expected two different"),
        (lambda: ESMM(4, [3], shared_hidden=[0]), ValueError, r"ESMM: argument 'shared_hidden\[0\]' expected an int"),
        (lambda: AITM(4, [3], True), ValueError, r"AITM: argument 'num_tasks' expected an int >= 1, got True"),
        (lambda: AITM(4, [], 2), ValueError, r"AITM: argument 'tower_hidden' expected at least one layer width"),
        (
            lambda: LearningToBranch(4, [3, 3], 2),
            ValueError,
            r"LearningToBranch: argument 'branches' expected 1 node counts \(one per layer below the last\), got \(\)",
        ),
        (
            lambda: LearningToBranch(4, [3, 3], 2, branches=[0]),
            ValueError,
            r"LearningToBranch: argument 'branches\[0\]' expected an int >= 1, got 0",
        ),
        (
            lambda: LearningToBranch(4, [3], 2, tau=0),
            ValueError,
            r"LearningToBranch: argument 'tau' expected a float in",
        ),
        (lambda: LearningToBranch(4, [3], 2, hard=1), TypeError, r"LearningToBranch: argument 'hard' expected a bool"),
    ],
)
def test_bad_construction(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


@pytest.mark.parametrize("name", list(ARCHS))
def test_bad_input_names_the_class_and_argument(name):
    module = ARCHS[name](8, [4], 2)
    cls = type(module).__name__
    with pytest.raises(ValueError, match=rf"{cls}: argument 'x' expected shape \[B, 8\], got \[3, 7\]"):
        module.task_features(torch.randn(3, 7))
    with pytest.raises(ValueError, match=rf"{cls}: argument 'x' expected shape \[B, 8\], got \[2, 3, 8\]"):
        module.task_features(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match=rf"{cls}: argument 'x' expected a tensor"):
        module.task_features([[0.0] * 8])
    x = torch.randn(3, 8)
    before = x.clone()
    module.task_features(x)
    assert torch.equal(x, before)


def test_calibrator_bad_input():
    with pytest.raises(TypeError, match=r"AITM.calibrator_losses: argument 'logits' expected a non-empty sequence"):
        AITM.calibrator_losses([])
    with pytest.raises(ValueError, match=r"AITM.calibrator_losses: argument 'logits' expected one \[B\] or \[B, 1\]"):
        AITM.calibrator_losses([torch.zeros(3, 1), torch.zeros(3, 2)])


def test_model_rejects_wrong_task_count():
    with pytest.raises(ValueError, match=r"gives 3 per-task representations but heads have 2 tasks"):
        MultiTaskModel(CrossStitch(4, [3], 3), MultiTaskHeads(3, mixed_tasks(2)))
    with pytest.raises(ValueError, match=r"gives 2 per-task representations but heads have 3 tasks"):
        MultiTaskModel(ESMM(4, [3]), MultiTaskHeads(1, mixed_tasks(3)))


@pytest.mark.parametrize(
    "module",
    [
        "fastmtl.nn.cross_stitch",
        "fastmtl.nn.mtan",
        "fastmtl.nn.dselect_k",
        "fastmtl.nn.shared_bottom",
        "fastmtl.nn.esmm",
        "fastmtl.nn.aitm",
        "fastmtl.nn.learning_to_branch",
    ],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0
