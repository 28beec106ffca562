"""Raw ``torch.ops.fastmtl.*`` calls with bad arguments, for test_fuzz.py. Run as a script, it runs
the cases named on its command line in order and prints one line per case, so that the parent
process (which survives a crash of this one) knows which case crashed:
``START name`` before a case, ``DONE name outcome`` after it (outcome: ``ok`` or the exception's
type name)."""

from __future__ import annotations

import sys

import torch


def _mlp():
    x, ws = torch.randn(3, 4), [torch.randn(5, 4), torch.randn(2, 5)]
    out, saved = torch.ops.fastmtl.fused_mlp.default(x, ws, [], "relu")
    return x, ws, out, saved


def _heads():
    z, w = torch.randn(3, 4), torch.randn(2, 4)
    packed = torch.zeros(3, 2)
    _l, logit_grad, scale = torch.ops.fastmtl.multitask_head_loss.default(z, w, None, packed, ["mse", "mse"], [1, 1])
    return z, w, packed, logit_grad, scale


def _op(name):
    return getattr(torch.ops.fastmtl, name).default


# name -> a call; every one has an invalid argument and must raise ValueError or TypeError.
CASES = {
    "head_loss_backward_negative_num_outputs": lambda: _op("multitask_head_loss_backward")(
        torch.ones(2), torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2), torch.ones(2), [1000, -998], False, True
    ),
    "head_loss_backward_num_outputs_sum_mismatch": lambda: _op("multitask_head_loss_backward")(
        torch.ones(2), torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2), torch.ones(2), [1, 2], False, True
    ),
    "head_loss_negative_num_outputs": lambda: _op("multitask_head_loss")(
        torch.randn(3, 4), torch.randn(2, 4), None, torch.zeros(3, 2), ["mse", "mse"], [3, -1]
    ),
    "head_loss_unknown_loss": lambda: _op("multitask_head_loss")(
        torch.randn(3, 4), torch.randn(2, 4), None, torch.zeros(3, 2), ["mse", "bogus"], [1, 1]
    ),
    "head_loss_lists_of_different_lengths": lambda: _op("multitask_head_loss")(
        torch.randn(3, 4), torch.randn(2, 4), None, torch.zeros(3, 2), ["mse"], [1, 1]
    ),
    "head_loss_no_tasks": lambda: _op("multitask_head_loss")(
        torch.randn(3, 4), torch.randn(2, 4), None, torch.zeros(3, 2), [], []
    ),
    "head_loss_targets_too_narrow": lambda: _op("multitask_head_loss")(
        torch.randn(3, 4), torch.randn(2, 4), None, torch.zeros(3, 1), ["mse", "mse"], [1, 1]
    ),
    "pack_targets_empty": lambda: _op("pack_targets")([], [], [], [], torch.float32),
    "pack_targets_lists_of_different_lengths": lambda: _op("pack_targets")(
        [torch.zeros(3), torch.zeros(3)], ["a"], ["mse", "mse"], [1, 1], torch.float32
    ),
    "pack_targets_negative_num_outputs": lambda: _op("pack_targets")(
        [torch.zeros(3, 2)], ["a"], ["mse"], [-2], torch.float32
    ),
    "pack_targets_rows_differ": lambda: _op("pack_targets")(
        [torch.zeros(3), torch.zeros(4)], ["a", "b"], ["mse", "mse"], [1, 1], torch.float32
    ),
    "fused_mlp_no_layers": lambda: _op("fused_mlp")(torch.randn(3, 4), [], [], "relu"),
    "fused_mlp_widths_do_not_chain": lambda: _op("fused_mlp")(
        torch.randn(3, 4), [torch.randn(5, 4), torch.randn(2, 6)], [], "relu"
    ),
    "fused_mlp_bias_count": lambda: _op("fused_mlp")(
        torch.randn(3, 4), [torch.randn(5, 4), torch.randn(2, 5)], [torch.zeros(5)], "relu"
    ),
    "fused_mlp_bad_activation": lambda: _op("fused_mlp")(torch.randn(3, 4), [torch.randn(5, 4)], [], "bogus"),
    "fused_mlp_backward_saved_count": lambda: (
        lambda x, ws, out, saved: _op("fused_mlp_backward")(
            torch.ones_like(out), x, ws, out, saved + saved, "relu", False, True
        )
    )(*_mlp()),
    "fused_mlp_backward_grad_shape": lambda: (
        lambda x, ws, out, saved: _op("fused_mlp_backward")(torch.ones(4, 2), x, ws, out, saved, "relu", False, True)
    )(*_mlp()),
    "representation_gram_negative_num_outputs": lambda: (
        lambda z, w, p, lg, sc: _op("mtl_representation_gram")(w, lg, sc, torch.ones(2), [3, -1])
    )(*_heads()),
    "representation_gram_task_weights_count": lambda: (
        lambda z, w, p, lg, sc: _op("mtl_representation_gram")(w, lg, sc, torch.ones(3), [1, 1])
    )(*_heads()),
    "trunk_gram_bad_gram_path": lambda: (
        lambda m, h: _op("mtl_trunk_gram")(
            m[0],
            [m[1][0], torch.randn(4, 5)],
            m[2][:, :2].new_zeros(3, 4),
            [m[3][0]],
            "relu",
            False,
            h[1],
            h[3],
            h[4],
            torch.ones(2),
            [1, 1],
            "bogus",
            False,
        )
    )(_mlp(), _heads()),
    "gated_mixture_expert_index_out_of_range": lambda: _op("gated_mixture")(
        torch.randn(6, 5), torch.randn(3, 2, 5), None, torch.randn(4, 6, 7), [0, 9, 1, 2, 3, 0]
    ),
    "gated_mixture_negative_expert_index": lambda: _op("gated_mixture")(
        torch.randn(6, 5), torch.randn(3, 2, 5), None, torch.randn(4, 6, 7), [0, -1, 1, 2, 3, 0]
    ),
    "fused_experts_widths_do_not_chain": lambda: _op("fused_experts")(
        torch.randn(3, 4), [torch.randn(2, 5, 4), torch.randn(2, 3, 6)], [], "relu"
    ),
}


def main(names) -> None:
    import fastmtl  # noqa: F401  (registers the ops and their fakes)

    torch.manual_seed(0)
    for name in names:
        print(f"START {name}", flush=True)
        try:
            CASES[name]()
            outcome = "ok"
        except Exception as error:  # the outcome is the exception's type
            outcome = type(error).__name__
        print(f"DONE {name} {outcome}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
