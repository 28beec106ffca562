"""The engine under data parallelism: two gloo ranks on this machine, each with its own shard, against
what one process computes from both shards (fastmtl._distributed says what each setting means)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastmtl
import fastmtl.aggregation as agg
from conftest import assert_rel_close, end_rank_process, mixed_tasks, random_targets

WORLD = 2
TASKS = mixed_tasks(4)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


def make_model(fused: bool):
    torch.manual_seed(0)
    trunk = fastmtl.nn.FusedMLP(5, [9, 7]) if fused else torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh())
    return fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(7, TASKS)).double()


def shard(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return x, random_targets(TASKS, 6, g, missing=0.2)


def run_rank(rank: int, init_file: str, out_dir: str, fused: bool, mode: str, ddp_gram: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = make_model(fused)
        x, targets = shard(rank)
        aggregator = agg.UPGrad()
        results = []
        for _ in range(2):  # two calls: the second accumulates, and gram_every=2 reuses the weights
            result = model.mtl_backward(x, targets, aggregator, mode=mode, ddp_gram=ddp_gram, gram_every=2)
            results.append((result.gram, result.weights))
        grads = {n: p.grad for n, p in model.named_parameters()}
        torch.save({"grads": grads, "results": results}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    end_rank_process()


def expected(fused: bool, mode: str, ddp_gram: str):
    """(gram, weights, grads after the two calls) from both shards in one process."""
    jacobians, grams, local_grads = [], [], []
    for rank in range(WORLD):
        model = make_model(fused)
        x, targets = shard(rank)
        z = model.trunk(x)
        losses = model.heads.losses(z, targets) * model.heads.task_weights
        wrt = [z] if mode == "rep" else list(model.trunk.parameters())
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], wrt, retain_graph=True)])
            for t in range(len(TASKS))
        ]
        jacobians.append(torch.stack(rows))
        grams.append(jacobians[-1] @ jacobians[-1].T)
    if mode == "exact" and ddp_gram == "exact":
        mean = sum(jacobians) / WORLD
        gram = mean @ mean.T
    else:
        gram = sum(grams) / WORLD**2
    weights = agg.UPGrad()(gram)
    for rank in range(WORLD):  # each rank's update with the common weights, then the mean
        model = make_model(fused)
        x, targets = shard(rank)
        losses = model.heads.losses(model.trunk(x), targets) * model.heads.task_weights
        trunk, heads = list(model.trunk.parameters()), list(model.heads.parameters())
        local_grads.append(
            torch.autograd.grad(torch.dot(losses, weights), trunk, retain_graph=True)
            + torch.autograd.grad(losses.sum(), heads)
        )
    names = [n for n, _ in make_model(fused).named_parameters()]
    mean_grads = [sum(g[i] for g in local_grads) / WORLD for i in range(len(names))]
    return gram, weights, {n: 2 * g for n, g in zip(names, mean_grads)}  # two identical calls accumulate


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("mode, ddp_gram", [("exact", "local"), ("exact", "exact"), ("rep", "local")])
def test_two_ranks_match_the_single_process_computation(fused, mode, ddp_gram):
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.start_processes(
            run_rank, args=(init_file, out_dir, fused, mode, ddp_gram), nprocs=WORLD, start_method="spawn", join=True
        )
        gram, weights, grads = expected(fused, mode, ddp_gram)
        for rank in range(WORLD):
            got = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
            (gram1, weights1), (gram2, weights2) = got["results"]
            assert_rel_close(gram1, gram, 1e-9, f"rank {rank} gram")
            assert_rel_close(weights1, weights, 1e-9, f"rank {rank} weights")
            assert torch.equal(weights2, weights1)  # gram_every=2: the second call reuses them
            for name, g in grads.items():
                assert_rel_close(got["grads"][name], g, 1e-9, f"rank {rank} {name}")


def test_ddp_gram_is_checked():
    model = make_model(True)
    x, targets = shard(0)
    with pytest.raises(ValueError, match="'ddp_gram' expected one of"):
        model.mtl_backward(x, targets, agg.UPGrad(), ddp_gram="global")


def run_rank_jacobian_method(rank: int, init_file: str, out_dir: str, ddp_gram: str):
    """Issue 17: a "jacobian" method (MoCo: stateful, its weights reported) on both engines, same model."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, targets = shard(rank)
        saved = {}
        for engine in ("fused", "generic"):
            model, aggregator = make_model(True), agg.MoCo()
            results = []
            for _ in range(2):
                if engine == "fused":
                    result = model.mtl_backward(x, targets, aggregator, ddp_gram=ddp_gram, keep_jacobian=True)
                else:
                    z = model.trunk(x)
                    losses = model.heads.losses(z, targets) * model.heads.task_weights
                    result = fastmtl.mtl_backward(
                        losses, z, aggregator, list(model.trunk.parameters()), ddp_gram=ddp_gram, keep_jacobian=True
                    )
                results.append((result.gram, result.weights, result.jacobian))
            saved[engine] = {"grads": {n: p.grad for n, p in model.named_parameters()}, "results": results}
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    end_rank_process()


@pytest.mark.parametrize("ddp_gram", ["local", "exact"])
def test_jacobian_method_under_two_ranks_is_the_same_on_both_engines(ddp_gram):
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.start_processes(
            run_rank_jacobian_method, args=(init_file, out_dir, ddp_gram), nprocs=WORLD, start_method="spawn", join=True
        )
        ranks = [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(WORLD)]
    for rank, got in enumerate(ranks):
        fused, generic = got["fused"], got["generic"]
        for name, g in generic["grads"].items():
            assert_rel_close(fused["grads"][name], g, 1e-10, f"rank {rank} {name}")
            # The gradients written are the mean over the ranks: the same on every rank.
            assert_rel_close(g, ranks[0]["generic"]["grads"][name], 1e-12, f"rank {rank} {name} vs rank 0")
        for a, b in zip(fused["results"], generic["results"]):
            for x, y, what in zip(a, b, ("gram", "weights", "jacobian")):
                assert_rel_close(x, y, 1e-10, f"rank {rank} {what}")
    if ddp_gram == "exact":  # the gathered Jacobian: the same on both ranks
        assert_rel_close(ranks[1]["fused"]["results"][0][2], ranks[0]["fused"]["results"][0][2], 1e-12, "jacobian")
