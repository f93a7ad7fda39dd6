"""Shared machinery: layer scalings, applying a layer, layer inputs and weights.

Every energy, initialisation and training function goes through these helpers,
so scalings and skips are applied the same way everywhere.
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._checks import (
    PARAM_TYPES,
    batch_axis_hint,
    check_model,
    check_option,
    check_shape,
    flatten_hint,
)
from ._stacked import find_runs, scan_feedforward, scan_predictions
from ._types import Activities, Array, Float, Layer, Model, ParamType, SkipModel


def weight_leaves(tree: Any) -> list[Array]:
    """Every array leaf stored under an attribute called `weight`, at any depth."""
    leaves = []
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        key = path[-1] if path else None
        if isinstance(key, jtu.GetAttrKey) and key.name == "weight":
            if isinstance(leaf, (jax.Array, np.ndarray)):
                leaves.append(leaf)
    return leaves


def is_weight_matrix(path: tuple, leaf: Any) -> bool:
    """The package's rule for what a weight is: a floating array with >= 2 axes.

    Every matrix or kernel is a weight, whatever its attribute is called
    (`weight`, `weight_ih` and `weight_hh` of a GRU cell, `W1` of a custom
    module, ...). Vectors (biases, the gains of `eqx.nn.LayerNorm`) and scalars
    are not, nor is a bias stored with broadcasting axes (an attribute whose name
    starts with `bias`, such as the `(out, 1, 1)` bias of `eqx.nn.Conv2d`).
    """
    key = path[-1] if path else None
    if isinstance(key, jtu.GetAttrKey) and key.name.startswith("bias"):
        return False
    return (
        isinstance(leaf, (jax.Array, np.ndarray))
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and leaf.ndim >= 2
    )


def weight_matrices(tree: Any) -> list[Array]:
    """Every weight of `tree` (see `is_weight_matrix`), at any depth."""
    leaves = jtu.tree_flatten_with_path(tree)[0]
    return [leaf for path, leaf in leaves if is_weight_matrix(path, leaf)]


def _matrix(layer: Layer) -> Array | None:
    weights = weight_matrices(layer)
    return weights[0] if weights else None


def _fan_in(layer: Layer, name: str) -> int:
    weight = _matrix(layer)
    if weight is None:
        raise ValueError(
            f"`{name}` exposes no `weight` array (searched its attributes at any "
            "depth), so its width cannot be read for `param_type='mupc'` or `'ntp'`."
        )
    return math.prod(weight.shape[1:])


def _output_fan_in(model: Model) -> int:
    """`N` of `a_L`: the fan-in of the last layer's weight.

    The parameterisations only ask the first and hidden layers to expose a weight,
    so when the last one has none (e.g. a plain function), `N` is the width of
    `z_{L-1}`, read as the output size (first axis) of the previous layer's weight.
    """
    last = len(model) - 1
    if _matrix(model[last]) is not None:
        return _fan_in(model[last], f"model[{last}]")
    previous = _matrix(model[last - 1])
    if previous is None:
        _fan_in(model[last], f"model[{last}]")  # raises, naming the last layer
    return previous.shape[0]


def get_param_scalings(
    model: Model,
    input: Float[Array, "batch ..."] | None,
    *,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    gamma: Any = None,
) -> list[Any]:
    r"""Per-layer scalings $a_l$ of the parameterisation `param_type`.

    | `param_type` | $a_1$ | hidden $a_l$ | hidden $a_l$ with a skip | $a_L$ |
    |---|---|---|---|---|
    | `"sp"` | 1 | 1 | 1 | 1 |
    | `"mupc"` | $1/\sqrt{D}$ | $1/\sqrt{N}$ | $1/\sqrt{NL}$ | $1/N$ |
    | `"ntp"` | $1/\sqrt{D}$ | $1/\sqrt{N}$ | $1/\sqrt{NL}$ | $1/\sqrt{N}$ |

    $D$ is the size of one example of `input` (in unsupervised mode pass the latent
    activities $z_0$, or `None` to read it from the first layer's weight); $N$ is the
    fan-in of the layer's own `weight` (the hidden width for [`jpc.make_mlp`][]
    models; if the last layer holds no weight, the output size of the previous
    layer's weight); $L$ is the number of layers. A one-layer model gets the
    first-layer rule.

    **Arguments:**

    - `model`: list of per-example layers; for `"mupc"`/`"ntp"` the first and
        hidden layers must hold a `weight` array somewhere inside them.
    - `input`: `(batch, ...)` input, or `None`.
    - `skip_model`: optional list of skip callables (`None` entries for no skip).
    - `param_type`: `"sp"`, `"mupc"` or `"ntp"`.
    - `gamma`: optional output scaling; $a_L$ is divided by it.

    **Returns:**

    A list of `L` scalars (Python floats unless `gamma` is an array).

    **Raises:**

    `ValueError` for an unknown `param_type`, a layer without a weight or a
    zero `gamma`.
    """
    check_option("param_type", param_type, PARAM_TYPES)
    check_model(model, skip_model)
    n_layers = len(model)
    scalings: list[Any] = [1.0] * n_layers
    if param_type != "sp":
        if input is not None:
            in_dim = math.prod(np.shape(input)[1:])
        else:
            in_dim = _fan_in(model[0], "model[0]")
        scalings[0] = 1 / math.sqrt(in_dim)
        for i in range(1, n_layers - 1):
            width = _fan_in(model[i], f"model[{i}]")
            skip = skip_model is not None and skip_model[i] is not None
            scalings[i] = 1 / math.sqrt(width * n_layers if skip else width)
        if n_layers > 1:
            width = _output_fan_in(model)
            scalings[-1] = 1 / width if param_type == "mupc" else 1 / math.sqrt(width)
    if gamma is not None:
        if isinstance(gamma, (int, float)) and gamma == 0:
            raise ValueError(
                f"`gamma` divides `a_L` and must be non-zero, got {gamma!r}."
            )
        scalings[-1] = scalings[-1] / gamma
    return scalings


def _is_one(scale: Any) -> bool:
    return isinstance(scale, (int, float)) and scale == 1


# Equinox's affine layers themselves, not subclasses (which may override `__call__`).
_AFFINE = frozenset(
    {
        eqx.nn.Linear,
        eqx.nn.Conv,
        eqx.nn.Conv1d,
        eqx.nn.Conv2d,
        eqx.nn.Conv3d,
        eqx.nn.ConvTranspose,
        eqx.nn.ConvTranspose1d,
        eqx.nn.ConvTranspose2d,
        eqx.nn.ConvTranspose3d,
    }
)


def fold_scale(layer: Layer, scale: Any) -> Layer | None:
    """`layer` with the output scaling `scale` folded into its last affine map.

    `scale * (W h + b) = (scale W) h + scale b`, so for an `eqx.nn.Linear`, a
    convolution, or an `eqx.nn.Sequential` ending in one (the [`jpc.make_mlp`][]
    layout), the scaled layer is the same layer with its weight and bias scaled.
    Returns `None` for any other layer, subclasses of these included (they may
    override `__call__`).

    Why fold: a prediction computed as `scale * layer(z)` and subtracted from an
    activity is one multiply feeding one subtraction, which XLA may fuse into a
    fused multiply-add (it does on CPU and GPU). The feedforward initialisation
    stores the rounded product, while the energy would then subtract the exact
    one, so every hidden error at the feedforward state would be the rounding
    error of the product (about 1e-8 relative in float32) instead of exactly 0,
    and optimisers that normalise updates (Adam) would turn it into full-size
    weight changes. With the scaling inside the matrix product, a prediction is
    the same sequence of operations at every place it is computed, and the
    hidden errors at the feedforward state are exactly 0.
    """
    if type(layer) in _AFFINE:
        if layer.bias is None:
            return eqx.tree_at(lambda m: m.weight, layer, scale * layer.weight)
        return eqx.tree_at(
            lambda m: (m.weight, m.bias),
            layer,
            (scale * layer.weight, scale * layer.bias),
        )
    if isinstance(layer, eqx.nn.Sequential) and len(layer.layers) > 0:
        last = fold_scale(layer.layers[-1], scale)
        if last is not None:
            return eqx.tree_at(lambda m: m.layers[-1], layer, last)
    return None


def batched(fn: Any) -> Any:
    """`jax.vmap(fn)` over the leading (batch) axis, for a layer or any callable.

    A plain function that calls `fn` is mapped rather than `fn` itself: for
    the trace's debug information `jax.vmap` takes the `repr` of a callable that
    is not a function, and an `equinox.Module`'s is a pretty-printed tree of its
    fields, formatted anew at every call: a measurable part of tracing a deep
    network's training step.
    """
    return jax.vmap(lambda *args, **kwargs: fn(*args, **kwargs))


def predict(
    layer: Layer, skip: Layer | None, scale: Any, z: Array, name: str = "input"
) -> Array:
    """Batched prediction `scale * layer(z) + skip(z)` of one PC layer.

    The scaling is folded into the layer's last affine map when it has one (see
    `fold_scale`), else applied to the output.
    """
    if not _is_one(scale):
        folded = fold_scale(layer, scale)
        if folded is not None:
            layer, scale = folded, 1.0
    try:
        pred = batched(layer)(z)
    except (TypeError, ValueError) as err:
        hint = batch_axis_hint((name, z)) if name.isidentifier() else ""
        hint = hint or flatten_hint(layer, z, name)
        hint = f".{hint}" if hint and not str(err).endswith(".") else hint
        raise ValueError(
            f"The layer could not be applied to `{name}` of per-example shape "
            f"{tuple(np.shape(z)[1:])}: {err}{hint}"
        ) from err
    if not _is_one(scale):
        pred = scale * pred
    if skip is not None:
        pred = pred + batched(skip)(z)
    return pred


def with_layers(model: Any, layers: list) -> Any:
    """`layers`, one per entry of `model`, in `model`'s own container type.

    A list or tuple gives a list or tuple; a module that behaves as a sequence of
    layers (an `eqx.Module` holding them in a list attribute, say) gives a copy
    of that module with its entries replaced, so results keep the user's type.
    """
    if isinstance(model, (list, tuple)):
        return type(model)(layers)
    n_layers = len(model)
    return eqx.tree_at(
        lambda m: [m[i] for i in range(n_layers)],
        model,
        list(layers),
        is_leaf=lambda node: node is None,
    )


def skip_at(skip_model: SkipModel, i: int) -> Layer | None:
    return None if skip_model is None else skip_model[i]


def layer_inputs(
    activities: Activities, x: Array | None
) -> tuple[list[Array], list[str]]:
    """Inputs of layers `1..L` and their names for error messages.

    Supervised: `[x, z_1, ..., z_{L-1}]`; unsupervised: `[z_0, ..., z_{L-1}]`.
    """
    hidden = list(activities[:-1])
    names = [f"activities[{i}]" for i in range(len(hidden))]
    if x is None:
        return hidden, names
    return [x, *hidden], ["x", *names]


def _by_runs(model: Model, skip_model: SkipModel, scalings: list, one, run):
    """Outputs of every layer, applied one by one or a run of identical ones at once.

    `one(i, layer, skip, outputs)` gives layer `i`'s output (`outputs` holds those
    of the layers before it); `run(start, stop, layers, skips, scales, outputs)`
    gives those of layers `start..stop-1` as one scan (see `jpc._stacked`), or
    `None` to apply them one by one.
    """
    n_layers = len(model)
    layers = [model[i] for i in range(n_layers)]
    skips = [skip_at(skip_model, i) for i in range(n_layers)]
    runs = find_runs(layers, skips, scalings)
    outputs: list[Array] = []
    i = 0
    while i < n_layers:
        stop = runs.get(i)
        if stop is not None:
            group = (layers[i:stop], skips[i:stop], scalings[i:stop])
            outs = run(i, stop, *group, outputs)
            if outs is not None:
                outputs.extend(outs)
                i = stop
                continue
        outputs.append(one(i, layers[i], skips[i], outputs))
        i += 1
    return outputs


def layer_predictions(
    model: Model, skip_model: SkipModel, scalings: list, inputs: list, names: list
) -> list[Array]:
    """Each layer's prediction `scale * layer(z) + skip(z)` from its own input.

    Runs of identical layers are applied as one scan (see `jpc._stacked`).
    """

    def one(i, layer, skip, _):
        return predict(layer, skip, scalings[i], inputs[i], names[i])

    def run(start, stop, layers, skips, scales, _):
        return scan_predictions(predict, layers, skips, scales, inputs[start:stop])

    return _by_runs(model, skip_model, scalings, one, run)


def feedforward(
    model: Model,
    x: Array,
    skip_model: SkipModel = None,
    scalings: list | None = None,
    name: str = "input",
) -> list[Array]:
    """Activities of a feedforward pass from `x`: `[z_1, ..., z_L]`.

    Runs of identical layers are applied as one scan (see `jpc._stacked`).
    """
    scalings = [1.0] * len(model) if scalings is None else scalings

    def one(i, layer, skip, outputs):
        if i == 0:
            return predict(layer, skip, scalings[i], x, name)
        z_name = f"the output of model[{i - 1}]"
        return predict(layer, skip, scalings[i], outputs[-1], z_name)

    def run(start, stop, layers, skips, scales, outputs):
        z = x if start == 0 else outputs[-1]
        return scan_feedforward(predict, layers, skips, scales, z)

    return _by_runs(model, skip_model, scalings, one, run)


def check_output(y: Array, prediction: Array, y_name: str = "y") -> None:
    check_shape(y_name, y, jnp.shape(prediction), "the prediction of the last layer")
