"""Valid raw arguments for every fused op (torch.ops.fastmtl.* schemas), forward and backward, built
on the CPU from real forward results so the backward ops get consistent saved tensors. Shared by
tests/test_kernels_portable.py (portable vs custom steps) and tests/test_meta.py (meta tensors)."""

import torch

from conftest import mixed_tasks, random_targets
from fastmtl import ops

BATCH = 7  # odd, and not a multiple of any chunk size


def _randn(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def op_cases(activations=("relu", "gelu", "tanh", "identity")):
    """A list of (op name, args, label) in float64 for every op of the device table."""
    gen = torch.Generator().manual_seed(0)
    fastmtl = torch.ops.fastmtl
    cases = []
    x = _randn(gen, BATCH, 5)
    ws = [_randn(gen, 9, 5, scale=0.5), _randn(gen, 4, 9, scale=0.4)]
    bs = [_randn(gen, 9, scale=0.1), _randn(gen, 4, scale=0.1)]
    tasks = mixed_tasks(6)
    losses = [t.loss for t in tasks]
    num_outputs = [t.num_outputs for t in tasks]
    width = sum(num_outputs)
    targets = random_targets(tasks, BATCH, gen)
    target_list = [targets[t.name] for t in tasks]
    names = [t.name for t in tasks]
    cases.append(("pack_targets", (target_list, names, losses, num_outputs, torch.float64), "pack"))
    packed = ops.pack_targets(targets, tasks, torch.float64)
    head_w = _randn(gen, width, 4, scale=0.5)
    head_b = _randn(gen, width, scale=0.1)
    for act in activations:
        for biases in (bs, []):
            label = f"{act}-{'bias' if biases else 'nobias'}"
            out, saved = fastmtl.fused_mlp(x, ws, biases, act)
            cases.append(("fused_mlp", (x, ws, biases, act), label))
            grad_out = _randn(gen, *out.shape)
            cases.append(("fused_mlp_backward", (grad_out, x, ws, out, saved, act, bool(biases), True), label))
            _, logit_grad, scale = fastmtl.multitask_head_loss(out, head_w, head_b, packed, losses, num_outputs)
            task_weights = torch.linspace(0.5, 2.0, len(tasks), dtype=torch.float64)
            for path in ("materialise", "ghost"):
                cases.append(
                    (
                        "mtl_trunk_gram",
                        (
                            x,
                            ws,
                            out,
                            saved,
                            act,
                            bool(biases),
                            head_w,
                            logit_grad,
                            scale,
                            task_weights,
                            num_outputs,
                            path,
                            path == "materialise",
                        ),
                        f"{label}-{path}",
                    )
                )
            cases.append(
                (
                    "mtl_weighted_backward",
                    (
                        x,
                        ws,
                        out,
                        saved,
                        act,
                        bool(biases),
                        head_w,
                        True,
                        logit_grad,
                        scale,
                        task_weights,
                        task_weights.flip(0),
                        num_outputs,
                        True,
                    ),
                    label,
                )
            )
    z = _randn(gen, BATCH, 4)
    for bias in (head_b, None):
        label = "bias" if bias is not None else "nobias"
        cases.append(("multitask_head_loss", (z, head_w, bias, packed, losses, num_outputs), label))
        _, logit_grad, scale = fastmtl.multitask_head_loss(z, head_w, bias, packed, losses, num_outputs)
        upstream = _randn(gen, len(tasks))
        cases.append(
            (
                "multitask_head_loss_backward",
                (upstream, z, head_w, logit_grad, scale, num_outputs, bias is not None, True),
                label,
            )
        )
        cases.append(("mtl_representation_gram", (head_w, logit_grad, scale, upstream.abs(), num_outputs), label))
    # Experts: a shared input (the strided first layer) and one input per expert.
    experts = 3
    ews = [_randn(gen, experts, 6, 5, scale=0.5), _randn(gen, experts, 2, 6, scale=0.5)]
    ebs = [_randn(gen, experts, 6, scale=0.1), _randn(gen, experts, 2, scale=0.1)]
    for act in activations:
        for shared in (True, False):
            for biases in (ebs, []):
                ex_in = x if shared else _randn(gen, experts, BATCH, 5)
                label = f"{act}-{'shared' if shared else 'each'}-{'bias' if biases else 'nobias'}"
                out, saved = fastmtl.fused_experts(ex_in, ews, biases, act)
                cases.append(("fused_experts", (ex_in, ews, biases, act), label))
                cases.append(
                    (
                        "fused_experts_backward",
                        (_randn(gen, *out.shape), ex_in, ews, out, saved, act, bool(biases), True),
                        label,
                    )
                )
    # Gates: every gate over all experts (empty index) and an explicit index with a repeated expert.
    expert_out = _randn(gen, experts, BATCH, 3)
    gate_tasks = 2
    for idx, k in (([], experts), ([0, 2, 2, 1], 2)):
        for per_task in (False, True):
            gx = _randn(gen, gate_tasks, BATCH, 5) if per_task else x
            gw = _randn(gen, gate_tasks, k, 5, scale=0.5)
            for gb in (_randn(gen, gate_tasks, k, scale=0.3), None):
                label = "-".join(
                    [
                        "index" if idx else "all",
                        "pertask" if per_task else "shared",
                        "bias" if gb is not None else "nobias",
                    ]
                )
                cases.append(("gated_mixture", (gx, gw, gb, expert_out, idx), label))
                mixtures, gates = fastmtl.gated_mixture(gx, gw, gb, expert_out, idx)
                cases.append(
                    (
                        "gated_mixture_backward",
                        (_randn(gen, *mixtures.shape), gx, gw, expert_out, gates, idx, gb is not None, True),
                        label,
                    )
                )
    cases += _norm_tower_cases(gen, x, ws, bs)
    # Stacked towers (the experts with batch / layer norm and dropout): a shared and a per-tower input.
    # Layer norm over 2 features is ill-conditioned (its float32 error is not the op's): 4 at the top.
    sws = [ews[0], _randn(gen, experts, 4, 6, scale=0.5)]
    sbs = [ebs[0], _randn(gen, experts, 4, scale=0.1)]
    cases += _norm_tower_cases(gen, x, sws, sbs, "stacked-shared-")
    cases += _norm_tower_cases(gen, _randn(gen, experts, BATCH, 5), sws, sbs, "stacked-")
    return cases


def _norm_tower_cases(gen, x, ws, bs, prefix=""):
    """fused_mlp_norm in every normalisation, training and eval, and its backward (with a dropout
    mask: the forward's randomness stays out of the forward cases, whose outputs are compared).
    Stacked towers (3-D ws) have per-layer vectors [E, out]."""
    fastmtl = torch.ops.fastmtl

    def vector(w, scale):
        return _randn(gen, *w.shape[:-1], scale=scale)

    gammas = [1.0 + vector(w, 0.1) for w in ws]
    betas = [vector(w, 0.1) for w in ws]
    cases = []
    for norm, training in (("batch", True), ("batch", False), ("layer", True), ("none", True)):
        running = norm == "batch"
        means = [vector(w, 0.1) for w in ws] if running else []
        variances = [1.0 + vector(w, 0.1).abs() for w in ws] if running else []
        affine = norm != "none"
        label = f"{prefix}{norm}-{'train' if training else 'eval'}"
        # No biases before batch norm: their gradient is 0 exactly (the mean is removed), so any
        # comparison would weigh rounding noise against 0.
        args = (
            x,
            ws,
            [] if norm == "batch" else bs,
            gammas if affine else [],
            betas if affine else [],
            means,
            variances,
            norm,
            "gelu",
        )
        cases.append(("fused_mlp_norm", (*args, 0.0, training, 0.1, 1e-5), label))
        dropout = 0.3 if training else 0.0
        torch.manual_seed(1)
        out, saved, _ = fastmtl.fused_mlp_norm(*args, dropout, training, 0.1, 1e-5)
        grad_out = _randn(gen, *out.shape)
        cases.append(
            (
                "fused_mlp_norm_backward",
                (grad_out, *args[:7], out, saved, norm, "gelu", dropout, training, 0.1, 1e-5, True),
                label,
            )
        )
    return cases


def convert(value, fn):
    """Applies fn to every floating tensor in a (nested list / tuple of) op argument(s)."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(convert(v, fn) for v in value)
    return value


def flatten(result):
    """The tensors of an op's result, in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    out = []
    for r in result:
        out.extend(flatten(r))
    return out


def case_id(case):
    name, _, label = case
    return f"{name}-{label}"
