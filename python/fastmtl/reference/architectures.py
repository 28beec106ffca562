"""Plain-PyTorch references of the architecture modules of :mod:`fastmtl.nn` (cross-stitch,
MTAN, DSelect-k, SharedBottom, ESMM, AITM, Learning to Branch): a Python loop over tasks (and experts, layers,
selectors, bits) with ``F.linear``, written from the papers' equations and independent of the
modules' batched code. Each takes the module's parameters as tensors (the shapes documented on the
module) and returns what the module's ``task_features`` returns. The oracle of
tests/test_nn_architectures.py."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .trunk import activation_fn, fused_mlp

__all__ = [
    "cross_stitch",
    "mtan",
    "dselect_k",
    "dselect_k_gates",
    "dselect_k_selector_entropy",
    "shared_bottom",
    "esmm",
    "esmm_losses",
    "aitm",
    "aitm_calibrator",
    "learning_to_branch",
    "learning_to_branch_gates",
]


def _mlp(x, weights, biases, activation):

    return fused_mlp(x, list(weights), None if biases is None else list(biases), activation)


def _bottom(x, weights, biases, activation):
    return x if weights is None else _mlp(x, weights, biases, activation)


def _tower(x, weights, biases, t, activation):
    """Tower (or expert, or column) t of stacked parameters ``[T, out, in]``."""
    return _mlp(x, [w[t] for w in weights], [b[t] for b in biases], activation)


def cross_stitch(x, weights, biases, stitch, activation="relu"):
    """Misra et al. 2016: column t's layer l output ``h_t = act(W_l[t] x_t + b_l[t])``, then the
    cross-stitch unit ``x_t = sum_s stitch[l, t, s] h_s``. Returns ``[T, B, h]``."""

    act = activation_fn(activation)
    T = stitch.shape[1]
    columns = [x] * T
    for layer, (w, b) in enumerate(zip(weights, biases)):
        outs = [act(F.linear(columns[t], w[t], b[t])) for t in range(T)]
        columns = [sum(stitch[layer, t, s] * outs[s] for s in range(T)) for t in range(T)]
    return torch.stack(columns)


def mtan(x, shared_weights, shared_biases, bridge_weights, bridge_biases, attention, activation="relu"):
    """Liu et al. 2019 over an MLP: shared layer outputs ``h_j``; task t's mask
    ``sigmoid(W2 relu(W1 u + b1) + b2)`` with ``u = h_1`` or ``[h_j, act(B_{j-1} a_{j-1} + c_{j-1})]``,
    attended ``a_j = mask * h_j``. ``attention[j] = (W1, b1, W2, b2)``, each stacked over tasks.
    Returns ``[T, B, h_L]``."""

    act = activation_fn(activation)
    shared, h = [], x
    for w, b in zip(shared_weights, shared_biases):
        h = act(F.linear(h, w, b))
        shared.append(h)
    T = attention[0][0].shape[0]
    out = []
    for t in range(T):
        attended = None
        for j, h in enumerate(shared):
            if j == 0:
                u = h
            else:
                u = torch.cat([h, act(F.linear(attended, bridge_weights[j - 1], bridge_biases[j - 1]))], dim=1)
            w1, b1, w2, b2 = attention[j]
            mask = torch.sigmoid(F.linear(torch.relu(F.linear(u, w1[t], b1[t])), w2[t], b2[t]))
            attended = mask * h
        out.append(attended)
    return torch.stack(out)


def _smooth_step(t, gamma):
    inside = t.abs() < gamma / 2
    cubic = -2 * t.pow(3) / gamma**3 + 3 * t / (2 * gamma) + 0.5
    return torch.where(inside, cubic, (t > 0).to(t.dtype))


def _dselect_choices(x, selector_weight, selector_bias, num_experts, gamma):
    """r[t][i]: ``[B, E]``, selector i of task t's weights over the experts (renormalised over the
    E codes when E is not a power of two)."""
    T, k, m = selector_weight.shape[:3]
    choices = []
    for t in range(T):
        row = []
        for i in range(k):
            s = [_smooth_step(x @ selector_weight[t, i, j] + selector_bias[t, i, j], gamma) for j in range(m)]
            columns = []
            for e in range(num_experts):
                r = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
                for j in range(m):
                    r = r * (s[j] if (e >> j) & 1 else 1 - s[j])
                columns.append(r)
            r = torch.stack(columns, dim=1)
            if num_experts != 2**m:
                total = r.sum(1, keepdim=True)
                r = torch.where(
                    total > 0, r / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(r)
                )
            row.append(r)
        choices.append(row)
    return choices


def dselect_k_gates(x, selector_weight, selector_bias, mixing_weight, mixing_bias, num_experts, gamma=1.0):
    """Hazimeh et al. 2021, per-example gate: ``q_t = sum_i softmax(W_t x)_i r(z_{t,i})``, ``[T, B, E]``."""
    choices = _dselect_choices(x, selector_weight, selector_bias, num_experts, gamma)
    gates = []
    for t, row in enumerate(choices):
        mixing = torch.softmax(F.linear(x, mixing_weight[t], mixing_bias[t]), dim=1)  # [B, k]
        gates.append(sum(mixing[:, i : i + 1] * r for i, r in enumerate(row)))
    return torch.stack(gates)


def dselect_k_selector_entropy(x, selector_weight, selector_bias, num_experts, gamma=1.0):
    """The paper's regulariser: ``sum_{t, i} mean_b H(r(z_{t,i}))`` (``0 log 0 = 0``)."""
    total = x.new_zeros(())
    for row in _dselect_choices(x, selector_weight, selector_bias, num_experts, gamma):
        for r in row:
            terms = torch.where(r > 0, r * torch.log(torch.where(r > 0, r, torch.ones_like(r))), torch.zeros_like(r))
            total = total - terms.sum(1).mean()
    return total


def dselect_k(
    x,
    expert_weights,
    expert_biases,
    selector_weight,
    selector_bias,
    mixing_weight,
    mixing_bias,
    gamma=1.0,
    activation="relu",
):
    """Task t's representation ``sum_e q_t(x)_e expert_e(x)``: ``[T, B, h]``."""
    E = expert_weights[0].shape[0]
    experts = [_tower(x, expert_weights, expert_biases, e, activation) for e in range(E)]
    gates = dselect_k_gates(x, selector_weight, selector_bias, mixing_weight, mixing_bias, E, gamma)
    return torch.stack([sum(gates[t][:, e : e + 1] * experts[e] for e in range(E)) for t in range(gates.shape[0])])


def shared_bottom(x, bottom_weights, bottom_biases, tower_weights, tower_biases, activation="relu"):
    """Tower t of the bottom's output: ``[T, B, h]``."""
    z = _mlp(x, bottom_weights, bottom_biases, activation)
    return torch.stack(
        [_tower(z, tower_weights, tower_biases, t, activation) for t in range(tower_weights[0].shape[0])]
    )


def esmm(
    x,
    bottom_weights: Sequence[torch.Tensor] | None,
    bottom_biases,
    tower_weights,
    tower_biases,
    logit_weight,
    logit_bias,
    activation="relu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ma et al. 2018: ``(pCTR, pCVR)``, ``[B]`` each: the sigmoid of each tower's logit layer."""
    z = _bottom(x, bottom_weights, bottom_biases, activation)
    ctr, cvr = (
        torch.sigmoid(
            F.linear(
                _tower(z, tower_weights, tower_biases, t, activation), logit_weight[t : t + 1], logit_bias[t : t + 1]
            )[:, 0]
        )
        for t in range(2)
    )
    return ctr, cvr


def esmm_losses(pctr, pcvr, click, ctcvr):
    """``[L_ctr, L_ctcvr]``: the paper's cross-entropies on the probabilities themselves,
    ``bce(pCTR, click)`` and ``bce(pCTR * pCVR, click * conversion)``, each a mean over the
    impressions with a label (NaN = unlabelled)."""
    losses = []
    for p, y in ((pctr, click), (pctr * pcvr, ctcvr)):
        labelled = ~torch.isnan(y)
        if not bool(labelled.any()):
            losses.append(p.sum() * 0.0)
        else:
            losses.append(F.binary_cross_entropy(p[labelled], y[labelled].to(p.dtype)))
    return torch.stack(losses)


def aitm(
    x,
    bottom_weights,
    bottom_biases,
    tower_weights,
    tower_biases,
    transfer_weight,
    transfer_bias,
    attention_weight,
    attention_bias,
    activation="relu",
):
    """Xi et al. 2021: ``z_1 = q_1``, ``p_{t-1} = relu(V z_{t-1} + c)``, ``z_t = sum_u w_u h1(u)``
    over ``u in (p_{t-1}, q_t)``, ``w = softmax_u(<h2(u), h3(u)> / sqrt(h))``. ``attention_weight``
    rows: h1, h2, h3. Returns ``[T, B, h]``."""
    z0 = _bottom(x, bottom_weights, bottom_biases, activation)
    T = tower_weights[0].shape[0]
    q = [_tower(z0, tower_weights, tower_biases, t, activation) for t in range(T)]
    h = q[0].shape[1]
    z = [q[0]]
    for t in range(1, T):
        p = torch.relu(F.linear(z[t - 1], transfer_weight[t - 1], transfer_bias[t - 1]))
        w, b = attention_weight[t - 1], attention_bias[t - 1]
        h1, h2, h3 = ((w[i * h : (i + 1) * h], b[i * h : (i + 1) * h]) for i in range(3))
        scores = [(F.linear(u, *h2) * F.linear(u, *h3)).sum(1) / math.sqrt(h) for u in (p, q[t])]
        top = torch.maximum(scores[0], scores[1])
        e = [torch.exp(s - top) for s in scores]
        z.append(sum((e_u / (e[0] + e[1])).unsqueeze(1) * F.linear(u, *h1) for e_u, u in zip(e, (p, q[t]))))
    return torch.stack(z)


def aitm_calibrator(probabilities: Sequence[torch.Tensor]):
    """The paper's ``L_lc = mean_b sum_{t >= 2} max(p_t - p_{t-1}, 0)`` from every task's ``[B]``
    probabilities in funnel order."""
    total = probabilities[0].new_zeros(())
    for prev, cur in zip(probabilities[:-1], probabilities[1:]):
        total = total + torch.clamp(cur - prev, min=0).mean()
    return total


def learning_to_branch(x, weights, biases, gates, activation="relu"):
    """Guo et al. 2020: node j of layer l computes ``act(W_l[j] u + b_l[j])`` with ``u = x`` in the
    first layer and ``u = sum_i gates[l-1][j, i] out_{l-1, i}`` above. Returns the last layer's
    nodes ``[T, B, h]``."""

    act = activation_fn(activation)
    outs = [act(F.linear(x, weights[0][j], biases[0][j])) for j in range(weights[0].shape[0])]
    for layer in range(1, len(weights)):
        g = gates[layer - 1]
        inputs = [sum(g[j, i] * outs[i] for i in range(len(outs))) for j in range(weights[layer].shape[0])]
        outs = [act(F.linear(u, weights[layer][j], biases[layer][j])) for j, u in enumerate(inputs)]
    return torch.stack(outs)


def learning_to_branch_gates(branch_logits, noise, tau=1.0, hard=True):
    """Gumbel-softmax samples of every node's parent, row by row: ``softmax((logits + noise) / tau)``;
    ``hard``: the one-hot of the row's largest entry in the forward pass, the soft sample's gradient."""
    gates = []
    for logits, g in zip(branch_logits, noise):
        rows = []
        for j in range(logits.shape[0]):
            scores = (logits[j] + g[j]) / tau
            soft = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
            if hard:
                one_hot = torch.zeros_like(soft)
                one_hot[int(torch.argmax(soft))] = 1.0
                soft = soft + (one_hot - soft).detach()
            rows.append(soft)
        gates.append(torch.stack(rows))
    return gates
