"""fastmtl.convert: replaces the runs of Linear [+ BatchNorm1d | LayerNorm] + activation
[+ Dropout] layers of an existing PyTorch model by FusedMLPs carrying the same weights (and the
normalisation modules themselves, with their running statistics).

Only ``nn.Sequential`` runs are replaced: a Sequential is called as a whole, so swapping some of
its consecutive elements for one module computing the same function is safe whatever the model's
own forward does with it. A Linear a custom forward calls directly is left alone (its call site is
code, not structure), and so reported.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn.fused_mlp import FusedMLP, activation_name_of

__all__ = ["convert", "unconvert", "ConversionReport"]

_SUPPORTED = "ReLU, GELU, SiLU, Tanh, Identity, Softmax(dim=1)"
_NORMS = {nn.BatchNorm1d: "batch", nn.LayerNorm: "layer"}


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``replaced`` ``(path, description)`` pairs, ``left_alone``
    ``(path, reason)`` pairs. Paths are module names as in ``model.named_modules()`` (of the
    original model; an element of a Sequential is ``"path.index"``)."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    #: The modules ``convert(exclude=...)`` kept: original name -> name in the converted model
    #: (a Sequential's elements are renumbered where runs before them became one FusedMLP).
    excluded: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastmtl.convert: {len(self.replaced)} replaced, {len(self.left_alone)} left alone"]
        lines += [f"  replaced   {path or '<model>'}: {what}" for path, what in self.replaced]
        lines += [f"  left alone {path or '<model>'}: {why}" for path, why in self.left_alone]
        return "\n".join(lines)


@dataclass
class _Layer:
    """One layer a run is made of: Linear, [norm], activation, [Dropout] modules, or one layer of a
    FusedMLP. ``dropout_module``: whether the plain layer has a Dropout module (of any p, 0 too), so
    that unconvert gives back the same modules and state_dict indices."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str
    norm: nn.Module | None = None
    dropout: float = 0.0
    dropout_module: bool = False

    def norm_config(self):
        """What must agree along a run for one FusedMLP to hold the layers' normalisations."""
        m = self.norm
        if m is None:
            return None
        if isinstance(m, nn.BatchNorm1d):
            return ("batch", m.eps, m.momentum, m.affine, m.track_running_stats)
        return ("layer", m.eps, m.elementwise_affine)

    def describe(self) -> str:
        parts = ["Linear"] + ([type(self.norm).__name__] if self.norm is not None else []) + [self.activation]
        return ", ".join(parts + ([f"Dropout({self.dropout:g})"] if self.dropout_module else []))


def _describe_run(run: list[_Layer]) -> str:
    """'2 x (Linear, BatchNorm1d, relu, Dropout(0))', or each layer's pattern where they differ (a
    Dropout(0) module in some layers only)."""
    patterns = [l.describe() for l in run]
    if len(set(patterns)) == 1:
        return f"{len(run)} x ({patterns[0]})"
    return " + ".join(f"({p})" for p in patterns)


def _join(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _layers_of_fused(module: FusedMLP) -> list[_Layer]:
    biases = module.biases if module.biases is not None else [None] * len(module.weights)
    norms = list(module.norms) if module.norms is not None else [None] * len(module.weights)
    return [
        _Layer(w, b, module.activation, n, module.dropout, has_module)
        for w, b, n, has_module in zip(module.weights, biases, norms, module.plain_dropout_modules)
    ]


def _unsupported_norm(norm: nn.Module, linear: nn.Linear) -> str | None:
    """Why a BatchNorm1d / LayerNorm after ``linear`` cannot go into a FusedMLP (None if it can)."""
    width = linear.out_features
    if isinstance(norm, nn.BatchNorm1d) and norm.num_features != width:
        return f"BatchNorm1d({norm.num_features}) after Linear(out_features={width})"
    if isinstance(norm, nn.LayerNorm):
        if tuple(norm.normalized_shape) != (width,):
            return f"LayerNorm{tuple(norm.normalized_shape)} after Linear(out_features={width})"
        if norm.elementwise_affine and norm.bias is None:
            return "LayerNorm(bias=False): the fused op takes both affine parameters or neither"
    return None


def _tower_layer(modules: list, i: int) -> tuple[_Layer | None, int, str]:
    """The layer starting at the Linear ``modules[i]``: Linear, [BatchNorm1d | LayerNorm],
    activation, [Dropout]. Returns (layer, modules it spans, "") or (None, 1, why not)."""
    linear, j = modules[i], i + 1
    norm = None
    if j < len(modules) and type(modules[j]) in _NORMS:
        norm = modules[j]
        why = _unsupported_norm(norm, linear)
        if why is not None:
            return None, 1, f"Linear followed by {why}"
        j += 1
    follower = modules[j] if j < len(modules) else None
    act = activation_name_of(follower) if follower is not None else None
    if act is None:
        where = "the end of the Sequential" if follower is None else f"{type(follower).__name__}"
        after = f"Linear, {type(norm).__name__}" if norm is not None else "Linear"
        why = (
            f"{after} is last in the Sequential, no activation after it"
            if follower is None
            else f"{after} followed by {where}, not a supported activation ({_SUPPORTED})"
        )
        return None, 1, why
    j += 1
    dropout, dropout_module = 0.0, False
    if j < len(modules) and type(modules[j]) is nn.Dropout:
        dropout, dropout_module = float(modules[j].p), True
        j += 1
    return _Layer(linear.weight, linear.bias, act, norm, dropout, dropout_module), j - i, ""


def _compatible(run: list[_Layer], layer: _Layer) -> str | None:
    """Why ``layer`` cannot extend ``run`` (None if it can)."""
    last = run[-1]
    if layer.activation != last.activation:
        return f"activation changes from {last.activation} to {layer.activation}"
    if (layer.bias is None) != (last.bias is None):
        return "a Linear with a bias next to one without"
    if layer.weight.shape[1] != last.weight.shape[0]:
        return f"widths do not chain ({last.weight.shape[0]} then {layer.weight.shape[1]} in)"
    if layer.weight.dtype != last.weight.dtype or layer.weight.device != last.weight.device:
        return "dtype or device changes"
    if layer.norm_config() != last.norm_config():
        return "the normalisation changes (kind, eps, momentum, affine or running statistics)"
    if layer.dropout != last.dropout:
        return "the dropout changes"
    return None


def _fused_from(layers: list[_Layer]) -> FusedMLP:
    first = layers[0]
    fused = FusedMLP(
        first.weight.shape[1],
        [l.weight.shape[0] for l in layers],
        activation=first.activation,
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
        norm=_NORMS[type(first.norm)] if first.norm is not None else None,
        dropout=first.dropout,
    )
    fused.plain_dropout_modules = tuple(l.dropout_module for l in layers)
    if first.norm is not None:
        # The normalisation modules themselves (copies): every setting, parameter and buffer kept.
        fused.norms = nn.ModuleList([copy.deepcopy(l.norm) for l in layers])
        for layer, copied in zip(layers, fused.norms):
            originals = dict(layer.norm.named_parameters()) | dict(layer.norm.named_buffers())
            for name, t in list(copied.named_parameters()) + list(copied.named_buffers()):
                _ORIGIN[id(t)] = (t, _origin_of(originals[name]))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            fused.weights[i].copy_(layer.weight)
            if layer.bias is not None:
                fused.biases[i].copy_(layer.bias)
    # Trainability follows the original weights (a frozen run stays frozen).
    for i, layer in enumerate(layers):
        fused.weights[i].requires_grad_(layer.weight.requires_grad)
        _ORIGIN[id(fused.weights[i])] = (fused.weights[i], _origin_of(layer.weight))
        if layer.bias is not None:
            fused.biases[i].requires_grad_(layer.bias.requires_grad)
            _ORIGIN[id(fused.biases[i])] = (fused.biases[i], _origin_of(layer.bias))
    return fused


# id(new parameter) -> (new parameter, the original model's parameter it was copied from), while one
# convert call runs (a run merged across nested Sequentials is copied twice: the chain resolves to the
# original). Keyed by id with the tensors held, so no id is reused meanwhile (tensors compare by value).
_ORIGIN: dict = {}


def _origin_of(p: torch.Tensor) -> torch.Tensor:
    return _ORIGIN[id(p)][1] if id(p) in _ORIGIN else p


def _renaming(original_names: dict, converted: nn.Module) -> dict:
    """Original state_dict key -> converted key, for the keys that changed."""
    renamed = {}
    for name, p in list(converted.named_parameters()) + list(converted.named_buffers()):
        old = original_names.get(id(_origin_of(p)))
        if old is not None and old != name:
            renamed[old] = name
    return renamed


class _LoadOriginalKeys:
    """load_state_dict pre-hook: renames the original model's keys to the converted model's."""

    def __init__(self, renamed: dict):
        self.renamed = renamed

    def __call__(self, module, state_dict, prefix, *args):
        for old, new in self.renamed.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)


def _shared_linears(model: nn.Module) -> set:
    """The ids of the Linears whose parameters are used in more than one place: a module held by
    two parents or twice by one Sequential, or whose weight / bias is also another module's. Fusing
    such a Linear would copy its weights into the FusedMLP and so untie the uses."""
    module_uses: dict = {}
    parameter_uses: dict = {}
    for module in model.modules():  # each module once, however many parents hold it
        for child in module._modules.values():
            if child is not None:
                module_uses[id(child)] = module_uses.get(id(child), 0) + 1
        for parameter in module._parameters.values():
            if parameter is not None:
                parameter_uses[id(parameter)] = parameter_uses.get(id(parameter), 0) + 1
    return {
        id(m)
        for m in model.modules()
        if type(m) is nn.Linear
        and (
            module_uses.get(id(m), 0) > 1
            or any(parameter_uses.get(id(p), 0) > 1 for p in m._parameters.values() if p is not None)
        )
    }


def _convert_sequential(
    seq: nn.Sequential, path: str, report: ConversionReport, shared: set, excluded: set
) -> nn.Module:
    """Returns the replacement of ``seq`` (itself if nothing changed, a FusedMLP if it is one run)."""
    modules = list(seq)
    out: list[nn.Module] = []
    run: list[_Layer] = []
    run_paths: list[str] = []
    run_has_linear = False
    run_members: list[nn.Module] = []

    def close_run():
        nonlocal run, run_paths, run_has_linear, run_members
        # A run of FusedMLPs only (converted inner Sequentials, say) is merged when there are several.
        if run and (run_has_linear or len(run_members) > 1):
            out.append(_fused_from(run))
            widths = "x".join(str(l.weight.shape[0]) for l in run)
            where = run_paths[0] if len(run_paths) == 1 else f"{run_paths[0]}..{run_paths[-1].rsplit('.', 1)[-1]}"
            report.replaced.append(
                (
                    where,
                    f"{_describe_run(run)} -> FusedMLP(in={run[0].weight.shape[1]}, widths={widths})",
                )
            )
        else:
            out.extend(run_members)
        run, run_paths, run_has_linear, run_members = [], [], False, []

    i = 0
    while i < len(modules):
        m, name = modules[i], _join(path, i)
        if id(m) in excluded:  # kept as it is (reported by _walk); no run goes through it
            close_run()
            out.append(m)
            i += 1
            continue
        if isinstance(m, FusedMLP):
            layers = _layers_of_fused(m)
        elif type(m) is nn.Linear and id(m) in shared:
            close_run()
            report.left_alone.append(
                (name, "Linear used in more than one place (tied weights): fusing it would untie them")
            )
            out.append(m)
            i += 1
            continue
        elif type(m) is nn.Linear:
            # A layer cannot take in an excluded module: the modules it may span end before one.
            stop = next((k for k in range(i + 1, len(modules)) if id(modules[k]) in excluded), len(modules))
            layer, span, why = _tower_layer(modules[:stop], i)
            if stop < len(modules):
                whole, whole_span, _ = _tower_layer(modules, i)
                if whole is not None and i + whole_span > stop and (layer is None or span < whole_span):
                    # The exclusion is what cut the layer (not "Linear ...": strict=True refuses only
                    # the Linears convert could not take).
                    cut = f"its layer would take in {_join(path, stop)}, which convert(exclude=...) keeps"
                    why = f"kept: {cut}" if layer is None else why
            if layer is None:
                close_run()
                report.left_alone.append((name, why))
                out.append(m)
                i += 1
                continue
            layers = [layer]
        else:
            close_run()
            if activation_name_of(m) is None and not isinstance(m, nn.Sequential) and type(m) not in _NORMS:
                if type(m) is not nn.Dropout:
                    report.left_alone.append((name, f"{type(m).__name__}: not a Linear or supported activation"))
            out.append(m)
            i += 1
            continue
        reason = _compatible(run, layers[0]) if run else None
        if reason is not None:
            close_run()
        run.extend(layers)
        run_paths.append(name)
        if isinstance(m, FusedMLP):
            run_members.append(m)
            i += 1
        else:
            run_has_linear = True
            run_members.extend(modules[i : i + span])
            i += span
    close_run()
    if len(out) == 1 and isinstance(out[0], FusedMLP) and len(modules) > 1:
        return out[0]
    if len(out) == len(modules) and all(a is b for a, b in zip(out, modules)):
        return seq
    return nn.Sequential(*out)


def _walk(
    module: nn.Module,
    path: str,
    report: ConversionReport,
    shared: set,
    done: dict,
    excluded: set,
    in_sequential: bool = False,
) -> nn.Module:
    """Converts the children of ``module`` bottom up, then ``module`` itself if it is a Sequential.
    ``done`` maps a module already converted to its replacement, so that a module used in several
    places gets one replacement, used in all of them (it stays tied); ``excluded``: the ids of the
    modules kept as they are, their children too."""
    if id(module) in done:
        return done[id(module)]
    if id(module) in excluded:
        report.left_alone.append(
            (path, "excluded (convert(exclude=...)): kept as it is, its output a tensor of its own")
        )
        done[id(module)] = module
        return module
    is_sequential = type(module) is nn.Sequential
    # _modules, not named_children(): the latter skips a module held twice by one parent.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _walk(child, _join(path, name), report, shared, done, excluded, is_sequential)
        if new is not child:
            module._modules[name] = new
    if is_sequential:
        result = _convert_sequential(module, path, report, shared, excluded)
    else:
        result = module
        if type(module) is nn.Linear and not in_sequential:
            report.left_alone.append(
                (
                    path,
                    "Linear outside an nn.Sequential (called by a custom forward; for per-task "
                    "heads see MultiTaskHeads.from_linears)",
                )
            )
    done[id(module)] = result
    return result


def convert(
    model: nn.Module, inplace: bool = False, strict: bool = False, exclude: Iterable[str] = ()
) -> tuple[nn.Module, ConversionReport]:
    """Replaces every ``nn.Sequential`` run of ``nn.Linear`` layers each followed by an optional
    ``nn.BatchNorm1d`` / ``nn.LayerNorm``, a supported activation module (ReLU, GELU, SiLU, Tanh,
    Identity) and an optional ``nn.Dropout`` (the same pattern and settings throughout the run,
    biases all present or all absent) by an equivalent :class:`fastmtl.nn.FusedMLP` with the same
    weights (and copies of the normalisation modules, running statistics included).
    Nested Sequentials are converted bottom up, and runs that meet across them merge. Outputs and
    gradients equal the original's to float32 rounding.

    Tied weights stay tied: a Linear used in more than one place (twice in one Sequential, held by
    two modules, or sharing its weight or bias with another module) is left alone and reported in
    ``report.left_alone`` (fusing it would copy its weights and untie the uses); a Sequential used
    in several places is converted once and the one replacement used in all of them.

    Args:
        model: any ``nn.Module``; its forward may be custom, only Sequential structure is rewritten.
        inplace: modify ``model`` itself (default: a deep copy).
        strict: raise ``ValueError`` if any Linear had to be left alone.
        exclude: names of modules (as in ``model.named_modules()``) to keep as they are, with their
            children: a fused run ends before and starts after each, so its output stays a tensor
            of its own that hooks see. ``report.excluded`` says where each is in the new model.

    Returns: ``(new_model, report)``; ``print(report)`` lists what was replaced and what was left
    alone, and why. ``new_model.load_state_dict`` takes the original model's checkpoints too (a
    pre-hook renames ``0.weight`` to ``0.weights.0``, ``1.running_mean`` to ``0.norms.0.running_mean``
    and so on); :func:`unconvert` goes back.
    The layers of a FusedMLP are one module, computed in one op: an intermediate layer's output is
    never a tensor of its own. To hook one, name it in ``exclude`` (a Linear, its activation, a
    norm): it stays, as does the Linear whose layer it is part of, and the runs around it are fused;
    or hook the FusedMLP (the run's last layer).

    >>> import torch, fastmtl
    >>> plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 1))
    >>> fused, report = fastmtl.convert(plain)
    >>> [type(m).__name__ for m in fused]
    ['FusedMLP', 'Linear']
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(fused(x), plain(x), atol=1e-6)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastmtl.convert: argument 'model' expected an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool) or not isinstance(strict, bool):
        raise TypeError("fastmtl.convert: arguments 'inplace' and 'strict' expected bools")
    names = _checked_exclude(model, exclude)
    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport()
    kept = {n: target.get_submodule(n) for n in names}
    excluded = {id(m) for m in kept.values()}
    tensors = dict(target.named_parameters(remove_duplicate=False)) | dict(target.named_buffers(remove_duplicate=False))
    original_names = {}  # id -> name; tensors holds them
    for name, p in tensors.items():
        original_names.setdefault(id(p), name)
    try:
        result = _walk(target, "", report, _shared_linears(target), {}, excluded)
        renamed = _renaming(original_names, result)
    finally:
        _ORIGIN.clear()
    if renamed:
        result.register_load_state_dict_pre_hook(_LoadOriginalKeys(renamed))
    new_names: dict = {}
    for n, m in result.named_modules(remove_duplicate=False):
        new_names.setdefault(id(m), n)  # a module held in several places: its first name
    report.excluded = {n: new_names[id(m)] for n, m in kept.items()}
    if strict and any(why.startswith("Linear") for _, why in report.left_alone):
        raise ValueError("fastmtl.convert(strict=True): could not convert everything:\n" + str(report))
    return result, report


def _checked_exclude(model: nn.Module, exclude) -> list[str]:
    if isinstance(exclude, str):
        exclude = [exclude]
    try:
        names = list(exclude)
    except TypeError:
        raise TypeError(
            f"fastmtl.convert: argument 'exclude' expected module names, got {type(exclude).__name__}"
        ) from None
    known = dict(model.named_modules(remove_duplicate=False))
    fused = [n for n, m in known.items() if isinstance(m, FusedMLP)]
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ValueError(
                f"fastmtl.convert: argument 'exclude' expected names of the model's modules "
                f"(model.named_modules()), got {name!r}"
            )
        inside = next((f for f in fused if name.startswith(f + ".")), None)
        if inside is not None:
            raise ValueError(
                f"fastmtl.convert: argument 'exclude' expected modules convert can keep, got {name!r}, a part of "
                f"the FusedMLP {inside!r} (exclude the FusedMLP itself to keep it out of the runs)"
            )
    return names


def _activation_module(name: str) -> nn.Module:
    if name in ("gelu", "gelu_tanh"):
        return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "softmax":
        return nn.Softmax(dim=1)
    return {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}[name]()


def _plain_layers(fused: FusedMLP) -> list[nn.Module]:
    """The Linear, [norm], activation, [Dropout] modules computing what ``fused`` does, with copies
    of its weights (and of its normalisation modules)."""
    layers: list[nn.Module] = []
    for i, w in enumerate(fused.weights):
        bias = fused.biases[i] if fused.biases is not None else None
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if bias is not None:
                linear.bias.copy_(bias)
        linear.weight.requires_grad_(w.requires_grad)
        if bias is not None:
            linear.bias.requires_grad_(bias.requires_grad)
        norm = [copy.deepcopy(fused.norms[i])] if fused.norms is not None else []
        dropout = [nn.Dropout(fused.dropout)] if fused.plain_dropout_modules[i] else []
        layers += [linear] + norm + [_activation_module(fused.activation)] + dropout
    return layers


def _unwalk(module: nn.Module) -> nn.Module:
    if isinstance(module, FusedMLP):
        return nn.Sequential(*_plain_layers(module))
    if type(module) is nn.Sequential and any(isinstance(m, FusedMLP) for m in module):
        # A FusedMLP inside a Sequential is spliced in, so the indices (the state_dict keys) are the
        # original model's: convert made [Linear, act, Linear, act, Linear] into [FusedMLP, Linear].
        out: list[nn.Module] = []
        for m in module:
            out += _plain_layers(m) if isinstance(m, FusedMLP) else [_unwalk(m)]
        return nn.Sequential(*out)
    for name, child in list(module.named_children()):
        new = _unwalk(child)
        if new is not child:
            setattr(module, name, new)
    return module


def unconvert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`convert`: every :class:`fastmtl.nn.FusedMLP` becomes an
    ``nn.Sequential`` of ``nn.Linear`` + activation modules with the same weights (inside a
    Sequential its layers are spliced in, so a converted model gives back the original's structure
    and state_dict keys), for serving without fastmtl. Other modules (a MultiTaskModel's
    MultiTaskHeads, say) are left as they are.

    >>> import torch, fastmtl
    >>> plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> fused, _ = fastmtl.convert(plain)
    >>> list(fastmtl.unconvert(fused).state_dict()) == list(plain.state_dict())
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastmtl.unconvert: argument 'model' expected an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"fastmtl.unconvert: argument 'inplace' expected a bool, got {type(inplace).__name__}")
    target = model if inplace else copy.deepcopy(model)
    return _unwalk(target)
