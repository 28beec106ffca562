"""The declared interface of the aggregation methods: what each requires (the Gram matrix, the per-task
gradients, or the cross-Gram of two independent batches), how each is called, the error when a method
is given less than it needs, and the state of the new stateful methods."""

import io

import pytest
import torch

import fastmtl.aggregation as agg
from aggregation_cases import call, gram, jacobian
from conftest import assert_rel_close

J = jacobian(4, "conflicting", 7)
J2 = J + 0.1 * jacobian(4, "generic", 8)


def test_each_method_declares_what_it_requires():
    assert agg.UPGrad.requires == "gram" and agg.Krum.requires == "gram" and agg.PCD.requires == "gram"
    for cls in (agg.GradDrop, agg.TrimmedMean, agg.ExcessMTL):
        assert cls.requires == "jacobian" and issubclass(cls, agg.JacobianAggregator)
    for cls in (agg.MoDo, agg.SDMGrad):
        assert cls.requires == "cross_gram" and issubclass(cls, agg.CrossGramAggregator)
    assert agg.CRMOGM(agg.MoDo()).requires == "cross_gram" and agg.CRMOGM(agg.MGDA()).requires == "gram"
    assert agg.requirement(lambda gram: gram.diagonal()) == "gram"  # a plain callable takes a Gram matrix


def test_gram_methods_given_the_jacobian_form_its_gram():
    for method in (agg.UPGrad(), agg.MGDA(), agg.Krum(n_byzantine=1), agg.Mean()):
        assert_rel_close(method(jacobian=J), method(gram(J)), 1e-12, type(method).__name__)
        assert_rel_close(method(gram=gram(J)), method(gram(J)), 0.0, type(method).__name__)


@pytest.mark.parametrize(
    "method, given, words",
    [
        (
            agg.GradDrop(),
            dict(gram=gram(J)),
            "GradDrop: needs the per-task gradients .*requires='jacobian'.*got 'gram'",
        ),
        (agg.TrimmedMean(1), dict(cross_gram=J @ J2.T), "TrimmedMean: needs the per-task gradients"),
        (agg.ExcessMTL(), {}, "ExcessMTL: needs .*got nothing"),
        (agg.MoDo(), dict(gram=gram(J)), "MoDo: needs the cross-Gram of two independent batches.*got 'gram'"),
        (agg.SDMGrad(), dict(jacobian=J), "SDMGrad: needs the cross-Gram"),
        (agg.UPGrad(), dict(cross_gram=J @ J2.T), "UPGrad: needs the Gram matrix .*got 'cross_gram'"),
        (agg.CRMOGM(agg.MoDo()), dict(gram=gram(J)), "MoDo: needs the cross-Gram"),
    ],
)
def test_a_method_given_less_than_it_needs_says_what_it_needs(method, given, words):
    with pytest.raises(ValueError, match=words):
        method(**given)


def test_a_positional_argument_is_a_gram_matrix_for_every_method():
    # What the engines pass: a Jacobian or cross-Gram method must not read a [T, T] Gram as its input.
    for method in (
        agg.GradDrop(),
        agg.TrimmedMean(1),
        agg.ExcessMTL(),
        agg.MoDo(),
        agg.SDMGrad(),
        agg.CRMOGM(agg.SDMGrad()),
    ):
        with pytest.raises(ValueError, match="needs .*got 'gram'"):
            method(gram(J))
    assert torch.equal(agg.UPGrad()(gram(J)), agg.UPGrad()(gram=gram(J)))


def test_jacobian_and_cross_gram_inputs_are_checked():
    with pytest.raises(ValueError, match="GradDrop: argument 'jacobian' expected the per-task gradients"):
        agg.GradDrop()(jacobian=torch.ones(3))
    with pytest.raises(ValueError, match="TrimmedMean: argument 'jacobian' expected finite"):
        agg.TrimmedMean(0)(jacobian=torch.tensor([[float("nan")]]))
    with pytest.raises(TypeError, match="ExcessMTL: argument 'jacobian' expected dtype"):
        agg.ExcessMTL()(jacobian=torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="MoDo: argument 'cross_gram' expected a square"):
        agg.MoDo()(cross_gram=torch.ones(2, 3))
    with pytest.raises(ValueError, match="PCD: argument 'gram' expected one Gram matrix"):
        agg.PCD()(torch.eye(2)[None])


def test_inputs_are_not_modified():
    for method, x in (
        (agg.GradDrop(seed=0), J),
        (agg.ExcessMTL(), J),
        (agg.MoDo(), J @ J2.T),
        (agg.SDMGrad(), J @ J2.T),
        (agg.PCD(), gram(J)),
        (agg.Krum(1), gram(J)),
        (agg.TrimmedMean(1), J),
        (agg.CRMOGM(agg.UPGrad()), gram(J)),
    ):
        copy = x.clone()
        call(method, x)
        call(method, x)
        assert torch.equal(x, copy), type(method).__name__


@pytest.mark.parametrize(
    "make, needs",
    [
        (lambda: agg.ExcessMTL(n_warmup_steps=1), J),
        (lambda: agg.MoDo(), J @ J2.T),
        (lambda: agg.SDMGrad(), J @ J2.T),
        (lambda: agg.PCD(beta=0.5), gram(J)),
        (lambda: agg.CRMOGM(agg.UPGrad(), alpha=0.5), gram(J)),
        (lambda: agg.GradDrop(seed=3), J),
    ],
)
def test_stateful_methods_round_trip_through_state_dict_and_reset(make, needs):
    inputs = [needs * (1 + 0.3 * k) for k in range(5)]
    original = make()
    call(original, inputs[0])
    call(original, inputs[1])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    fresh = make()
    for x in inputs[2:]:
        a, b = call(original, x), call(restored, x)
        assert torch.equal(a, b)
    assert not torch.equal(call(fresh, inputs[2]), call(original, inputs[2]))  # the state matters
    if hasattr(original, "reset"):
        original.reset()
        assert torch.equal(call(original, inputs[0]), call(make(), inputs[0]))


def test_crmogm_smooths_with_initial_weights_and_refuses_a_change_of_tasks():
    smoothed = agg.CRMOGM(agg.Mean(), alpha=0.25, initial_weights=[1.0, 0.0])
    assert_rel_close(smoothed(torch.eye(2, dtype=torch.float64)), torch.tensor([0.25 + 0.375, 0.375]), 1e-15)
    with pytest.raises(ValueError, match="reset"):
        smoothed(torch.eye(3, dtype=torch.float64))
    smoothed.reset()
    with pytest.raises(ValueError, match="'initial_weights' expected 3"):
        smoothed(torch.eye(3, dtype=torch.float64))
