"""fastmtl.nn.FieldEmbedding against one plain nn.Embedding per field, its gradients in float64, its
input checks; EmbeddedTrunk in front of a FusedMLP and an MMoE inside a MultiTaskModel."""

import doctest

import pytest
import torch

import fastmtl
import fastmtl.nn.embedding
from fastmtl.nn import EmbeddedTrunk, FieldEmbedding

CARDINALITIES = [7, 1, 5]  # a field with a single category included


def random_fields(rows, generator):
    return torch.stack([torch.randint(c, (rows,), generator=generator) for c in CARDINALITIES], dim=1)


def test_docstring_examples_run():
    result = doctest.testmod(fastmtl.nn.embedding, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("rows", [1, 13])
def test_matches_one_plain_embedding_per_field_and_leaves_the_input_alone(rows):
    generator = torch.Generator().manual_seed(rows)
    front = FieldEmbedding(CARDINALITIES, embedding_dim=3, dtype=torch.float64)
    plain = [torch.nn.Embedding(c, 3, dtype=torch.float64) for c in CARDINALITIES]
    with torch.no_grad():
        for f, table in enumerate(plain):
            table.weight.copy_(front.table.weight[int(front.offsets[f]) : int(front.offsets[f]) + CARDINALITIES[f]])
    index = random_fields(rows, generator)
    as_float = index.float()
    before = as_float.clone()
    expected = torch.cat([plain[f](index[:, f]) for f in range(len(CARDINALITIES))], dim=1)
    assert torch.equal(front(index), expected)
    assert torch.equal(front(as_float), expected)  # integral floats, as a MultiTaskDataset stores them
    assert torch.equal(as_float, before)
    # The gradient reaches each field's own rows only, as the plain tables'.
    front(index).square().sum().backward()
    expected.square().sum().backward()
    plain_grad = torch.cat([table.weight.grad for table in plain])
    assert torch.allclose(front.table.weight.grad, plain_grad, rtol=1e-12, atol=0)


def test_gradcheck_float64():
    front = FieldEmbedding(CARDINALITIES, embedding_dim=2, dtype=torch.float64)
    index = random_fields(6, torch.Generator().manual_seed(0))
    weight = front.table.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w: torch.func.functional_call(front, {"table.weight": w}, (index,)), (weight,)
    )


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.tensor([[0.0, 0.0, 5.0]]), "column 2 expected category indices in \\[0, 5\\), got 5.0"),
        (torch.tensor([[0.0, 1.0, 0.0]]), "column 1 expected category indices in \\[0, 1\\)"),
        (torch.tensor([[-1, 0, 0]]), "column 0"),
        (torch.tensor([[0.5, 0.0, 0.0]]), "column 0 expected category indices"),
        (torch.zeros(2, 2), "expected shape \\[B, 3\\]"),
    ],
)
def test_bad_indices_name_the_field(x, message):
    with pytest.raises(ValueError, match=message):
        FieldEmbedding(CARDINALITIES, embedding_dim=2)(x)


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match="'cardinalities'"):
        FieldEmbedding([3, 0], embedding_dim=2)
    with pytest.raises(ValueError, match="'embedding_dim'"):
        FieldEmbedding([3], embedding_dim=0)
    with pytest.raises(TypeError, match="'body'"):
        EmbeddedTrunk(FieldEmbedding([3], 2), "mlp")
    with pytest.raises(ValueError, match="front gives 4 features but the body expects in_features=5"):
        EmbeddedTrunk(FieldEmbedding([3, 3], 2), fastmtl.nn.MMoE(5, num_experts=2, expert_hidden=4, num_tasks=2))


@pytest.mark.parametrize("body", ["shared_bottom", "mmoe", "ple"])
def test_embedded_trunk_trains_every_parameter_with_an_aggregator(body):
    torch.manual_seed(0)
    tasks = [fastmtl.Task("click", "binary"), fastmtl.Task("conversion", "binary"), fastmtl.Task("like", "binary")]
    front = FieldEmbedding(CARDINALITIES, embedding_dim=4)
    inner = {
        "shared_bottom": lambda: fastmtl.nn.FusedMLP(12, [9, 5]),
        "mmoe": lambda: fastmtl.nn.MMoE(12, num_experts=3, expert_hidden=[5], num_tasks=3),
        "ple": lambda: fastmtl.nn.PLE(12, 1, 1, expert_hidden=[5], num_tasks=3),
    }[body]()
    model = fastmtl.nn.MultiTaskModel(EmbeddedTrunk(front, inner), fastmtl.nn.MultiTaskHeads(5, tasks))
    x = random_fields(17, torch.Generator().manual_seed(1)).float()
    click = torch.randint(0, 2, (17,)).float()
    targets = {
        "click": click,
        "conversion": torch.where(click > 0, torch.randint(0, 2, (17,)).float(), torch.nan),
        "like": torch.randint(0, 2, (17,)).float(),
    }
    result = model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad())
    assert result.gram.shape == (3, 3) and bool(torch.isfinite(result.losses).all())
    assert front.table.weight.grad is not None and bool(front.table.weight.grad.abs().sum() > 0)
    assert all(p.grad is not None for p in model.parameters())
    logits = model(x)
    assert set(logits) == {"click", "conversion", "like"} and logits["click"].shape == (17, 1)
