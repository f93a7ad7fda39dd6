"""Runs of identical layers traced once, as a `jax.lax.scan` over stacked parameters.

A deep network whose hidden blocks share one structure (the hidden layers of
[`jpc.make_mlp`][], with or without the identity skips of
[`jpc.make_skip_model`][]) would otherwise be unrolled layer by layer into the
traced program, so its compile time would grow linearly with depth. Here the
array leaves of such a run are stacked along a new leading axis and the run is
applied by one scan whose body is traced once, whatever the depth. The list of
layers the user holds is unchanged: stacking happens inside the traced program.

The feedforward pass (carrying the activity through the run) and the energy's
predictions (scanning over the given input activities) run the same scan body,
so a prediction is the same sequence of operations in both, and the hidden
errors at the feedforward state stay exactly 0.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._types import Array, Layer


# Private switches, read at trace time (set them before the first call of a step:
# compiled programs are reused). Runs shorter than `MIN_RUN` layers stay unrolled.
#
# Off by default: on the XLA CPU backend the scan compiles and runs slower than the
# unrolled layers at every depth measured (8 to 128, `benchmarks/compile_depth.py`).
# XLA compiles identical per-layer kernels of an unrolled network once, but the
# list of per-layer activities and parameters must be stacked into and split out
# of the scan, and each of those `L` slices is a distinct kernel (its offset
# differs), so the boundary costs more compile time than the scan saves.
ENABLED = False
MIN_RUN = 4

_PLAIN = (bool, int, float, complex, str, type(None))


def _leaf_key(leaf: Any) -> tuple:
    if eqx.is_array(leaf):
        return ("array", tuple(leaf.shape), leaf.dtype, getattr(leaf, "weak_type", 0))
    if isinstance(leaf, _PLAIN):
        return ("value", type(leaf), leaf)
    return ("object", id(leaf))


def _scale_key(scale: Any) -> tuple | None:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return ("const", float(scale))
    if eqx.is_array(scale) and jnp.ndim(scale) == 0:
        return ("traced", scale.dtype)
    return None


def _signature(layer: Layer, skip: Layer | None, scale: Any) -> tuple | None:
    """What must agree for two layers to share one scan body, or `None`."""
    scale_key = _scale_key(scale)
    if scale_key is None:
        return None
    leaves, treedef = jtu.tree_flatten((layer, skip))
    return (treedef, tuple(_leaf_key(leaf) for leaf in leaves), scale_key)


def _same(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return bool(a == b)
    except Exception:  # a static field whose `==` is not a plain bool
        return False


def find_runs(layers: list, skips: list, scalings: list) -> dict[int, int]:
    """`{start: stop}` of each run of at least `MIN_RUN` identical layers."""
    if not ENABLED:
        return {}
    sigs = [_signature(*entry) for entry in zip(layers, skips, scalings)]
    return runs_of(sigs, MIN_RUN)


def runs_of(sigs: list, min_run: int) -> dict[int, int]:
    """`{start: stop}` of each run of at least `min_run` equal signatures."""
    runs, start = {}, 0
    for i in range(1, len(sigs) + 1):
        if i == len(sigs) or not _same(sigs[i], sigs[start]):
            if sigs[start] is not None and i - start >= min_run:
                runs[start] = i
            start = i
    return runs


def _stack(
    layers: list, skips: list, scalings: list, stack: Callable = jnp.stack
) -> tuple:
    """Stacked array leaves, the shared static part and the scan's scalings."""
    pairs = zip(layers, skips)
    parts = [eqx.partition(pair, eqx.is_array) for pair in pairs]
    dynamic = jtu.tree_map(lambda *xs: stack(xs), *[p[0] for p in parts])
    static = parts[0][1]
    if _scale_key(scalings[0])[0] == "const":
        return dynamic, static, scalings[0], None
    return dynamic, static, None, stack(scalings)


def _body(predict: Callable, static: Any, const: Any) -> Callable:
    def apply(dynamic: Any, scale: Any, z: Array) -> Array:
        layer, skip = eqx.combine(dynamic, static)
        return predict(layer, skip, const if scale is None else scale, z)

    return apply


def _fits(apply: Callable, dynamic: Any, scale: Any, z: Array) -> bool:
    """Whether one layer maps `z` to an array of `z`'s own shape and dtype."""
    first = jtu.tree_map(lambda a: a[0], (dynamic, scale))
    try:
        out = jax.eval_shape(lambda d, s, z: apply(d, s, z), *first, z)
    except Exception:  # the unrolled path raises the named error
        return False
    return out.shape == z.shape and out.dtype == z.dtype


def _unstack(stacked: Array) -> list[Array]:
    """The entries along the leading axis, as one `split` (its transpose is one
    concatenation, where indexing would transpose into one padded copy each)."""
    parts = jax.lax.split(stacked, [1] * stacked.shape[0])
    return [part[0] for part in parts]


def scan_feedforward(
    predict: Callable, layers: list, skips: list, scalings: list, z: Array
) -> list[Array] | None:
    """Outputs of the run applied in sequence from `z`, or `None` if it cannot scan."""
    dynamic, static, const, scales = _stack(layers, skips, scalings)
    apply = _body(predict, static, const)
    if not _fits(apply, dynamic, scales, z):
        return None

    def step(z, xs):
        z = apply(*xs, z)
        return z, z

    _, outs = jax.lax.scan(step, z, (dynamic, scales), length=len(layers))
    return _unstack(outs)


def scan_predictions(
    predict: Callable, layers: list, skips: list, scalings: list, inputs: list
) -> list[Array] | None:
    """Predictions of the run from its own inputs, or `None` if it cannot scan."""
    first = inputs[0]
    if any(z.shape != first.shape or z.dtype != first.dtype for z in inputs):
        return None
    dynamic, static, const, scales = _stack(layers, skips, scalings)
    apply = _body(predict, static, const)
    if not _fits(apply, dynamic, scales, first):
        return None

    def step(carry, xs):
        return carry, apply(*xs)

    _, preds = jax.lax.scan(step, None, (dynamic, scales, jnp.stack(inputs)))
    return _unstack(preds)
