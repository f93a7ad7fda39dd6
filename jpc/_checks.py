"""Validation of user input, run at trace time so it costs nothing per jitted call."""

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._jit import lean_jit
from ._present import present


LOSSES = ("mse", "ce")
PARAM_TYPES = ("sp", "mupc", "ntp")
MODES = ("supervised", "unsupervised")


def check_option(name: str, value: Any, options: Sequence[str]) -> None:
    """Raise a `ValueError` unless `value` is one of the strings in `options`."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"`{name}` must be one of {tuple(options)}, got {value!r}.")


def _check_param_type(param_type: Any) -> None:
    """Check a parameterisation name, as the JPC library's helper of the same name.

    **Arguments:**

    - `param_type`: the parameterisation to check.

    **Returns:**

    `None` when `param_type` is `"sp"`, `"mupc"` or `"ntp"`.

    **Raises:**

    `ValueError` naming the received value otherwise (its message contains
    "Invalid parameterisation").
    """
    if not isinstance(param_type, str) or param_type not in PARAM_TYPES:
        raise ValueError(
            f"Invalid parameterisation: `param_type` must be one of {PARAM_TYPES}, "
            f"got {param_type!r}."
        )


def check_sequence(name: str, value: Any) -> None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"`{name}` must be a list of per-layer entries, got {type(value).__name__}."
        )


def is_layer_sequence(value: Any) -> bool:
    """Whether `value` behaves as a sequence of layers.

    A `list`/`tuple`, or any object with `__len__` and integer `__getitem__`, such
    as an `eqx.Module` that holds its layers in a list attribute; not a string,
    a mapping or an array.
    """
    if isinstance(value, (str, bytes, Mapping, jax.Array, np.ndarray)):
        return False
    if isinstance(value, Sequence):
        return True
    kind = type(value)
    return hasattr(kind, "__len__") and hasattr(kind, "__getitem__")


def check_layers(name: str, value: Any) -> None:
    """Raise a `TypeError` naming `name` unless `value` is a sequence of layers."""
    if not is_layer_sequence(value):
        raise TypeError(
            f"`{name}` must be a list of per-layer entries (or a module defining "
            f"`__len__` and `__getitem__` over its layers), got {type(value).__name__}."
        )


def check_model(model: Any, skip_model: Any = None) -> None:
    """Check that `model` is a non-empty sequence of layers and `skip_model` fits.

    Besides lists, any module that behaves as a sequence of layers is accepted
    (see `is_layer_sequence`); every function indexes and iterates it, and the
    updates return it with its own type.
    """
    check_layers("model", model)
    if len(model) == 0:
        raise ValueError("`model` must contain at least one layer, got an empty list.")
    if skip_model is not None:
        check_layers("skip_model", skip_model)
        if len(skip_model) != len(model):
            raise ValueError(
                f"`skip_model` must have one entry per layer of `model` "
                f"({len(model)}), got {len(skip_model)} entries."
            )
    check_stateless(model)


@functools.cache
def _needs_state(kind: type) -> bool:
    """Whether `kind.__call__` has a `state` or `key` argument without a default."""
    try:
        parameters = inspect.signature(kind.__call__).parameters
    except (TypeError, ValueError):
        return False
    return any(
        name in parameters and parameters[name].default is inspect.Parameter.empty
        for name in ("state", "key")
    )


def _stateful_part(node: Any) -> str | None:
    """The class name of the first stateful or key-needing module in `node`."""
    if isinstance(node, eqx.nn.Dropout):
        p = node.p
        off = node.inference or (isinstance(p, (int, float)) and p == 0)
        return None if off else "Dropout"
    if isinstance(node, eqx.nn.StateIndex) or (
        isinstance(node, eqx.Module) and _needs_state(type(node))
    ):
        return type(node).__name__
    children = jtu.tree_leaves(
        node, is_leaf=lambda n: n is not node and isinstance(n, eqx.Module)
    )
    for child in children:
        if isinstance(child, eqx.Module) and (found := _stateful_part(child)):
            return found
    return None


def check_stateless(model: Any) -> None:
    """Refuse layers that need a `state` or a PRNG key (BatchNorm, Dropout, ...).

    PC applies each layer as a pure function of one example's activity, many times
    per step, so layers with running statistics or random masks have no place in
    it. Raises a `ValueError` naming the layer and what to use instead.
    """
    for i in range(len(model)):
        found = _stateful_part(model[i])
        if found is None:
            continue
        instead = (
            "`eqx.nn.Dropout(p, inference=True)` (or no dropout)"
            if found == "Dropout"
            else "a stateless layer such as `eqx.nn.LayerNorm`"
        )
        raise ValueError(
            f"`model[{i}]` ({type(model[i]).__name__}) contains a stateful or "
            f"key-needing layer, {found}, which predictive coding cannot apply: "
            f"each layer must be a pure function of its input. Use {instead} "
            "instead."
        )


def check_activities(model: Any, activities: Any, supervised: bool) -> None:
    """Check the number of activity arrays: `L` when supervised, `L + 1` if not."""
    check_sequence("activities", activities)
    expected = len(model) if supervised else len(model) + 1
    if len(activities) != expected:
        mode = "supervised (`x` given)" if supervised else "unsupervised (`x=None`)"
        raise ValueError(
            f"`activities` must have {expected} entries for a {len(model)}-layer "
            f"model in {mode} mode, got {len(activities)}."
        )


def check_batch(y: Any, x: Any, activities: Any, y_name="y", x_name="x") -> None:
    """Check that `y`, `x` and every activity array share the batch size."""
    batch = np.shape(y)[0] if np.ndim(y) > 0 else None
    if batch is None:
        raise ValueError(f"`{y_name}` must have a leading batch axis, got a scalar.")
    if x is not None and (np.ndim(x) == 0 or np.shape(x)[0] != batch):
        raise ValueError(
            f"`{x_name}` and `{y_name}` must have the same batch size, got "
            f"{x_name}.shape={np.shape(x)} and {y_name}.shape={np.shape(y)}."
            + batch_axis_hint((x_name, x), (y_name, y))
        )
    for i, z in enumerate(activities):
        if np.ndim(z) == 0 or np.shape(z)[0] != batch:
            raise ValueError(
                f"`activities[{i}]` must have batch size {batch} like `{y_name}`, got "
                f"shape {np.shape(z)}."
            )


def batch_axis_hint(*named: tuple[str, Any]) -> str:
    """A hint for one example passed without its batch axis (a 1-D array)."""
    single = [name for name, value in named if np.ndim(value) == 1]
    if not single:
        return ""
    fix = ", ".join(f"`{name}[None]`" for name in single)
    return (
        f" If this is a single example, inputs need a leading batch axis: {fix} "
        "(a batch of one)."
    )


def check_opt_state(
    optim: Any, opt_state: Any, params: Any, name: str = "opt_state", how: str = ""
) -> None:
    """Check `opt_state` against `optim.init` of the parameter arrays, up front.

    A state of another structure would otherwise fail deep inside optax. `params`
    is the `(model, skip_model)` pair unless `how` says how the state is made
    (e.g. from one model alone). States made from `eqx.filter(..., eqx.is_array)`
    and from `eqx.filter(..., eqx.is_inexact_array)` are both accepted (they differ
    for models with integer leaves; the updates handle both, see `optax_update`).
    """
    pair = not how
    how = how or "optim.init((eqx.filter(model, eqx.is_array), skip_model))"
    structure = jtu.tree_structure(opt_state)

    def fits(tree) -> bool:
        try:
            return jtu.tree_structure(jax.eval_shape(optim.init, tree)) == structure
        except Exception:  # an optimiser that cannot init these parameters
            return True  # leave the error to optax

    arrays = eqx.filter(params, eqx.is_array)
    if fits(arrays) or fits(eqx.filter(params, eqx.is_inexact_array)):
        return
    hint = ""
    if pair and fits(arrays[0]):
        hint = (
            " It looks made from the model alone; these steps update the pair "
            "`(model, skip_model)`, so its state must be made from the pair."
        )
    raise ValueError(
        f"`{name}` does not have the structure of the state `optim` makes for the "
        f"parameters. Make it with `{how}`"
        + (" (with `skip_model=None` when there is none)." if pair else ".")
        + hint
    )


def check_random_init(model: Any, output: Any, layer_sizes: Any, batch_size: Any):
    """Name `layer_sizes` / `batch_size` when they do not fit the model or `output`.

    Run before the random initialisation of unsupervised inference, whose own
    checks would otherwise only name the resulting `activities`.
    """
    if layer_sizes is not None:
        check_sequence("layer_sizes", layer_sizes)
        if len(layer_sizes) != len(model) + 1:
            raise ValueError(
                f"`layer_sizes` must have {len(model) + 1} entries (z_0 to z_L) for a "
                f"{len(model)}-layer model, got {len(layer_sizes)}: {layer_sizes!r}."
            )
    batch = np.shape(output)[0] if np.ndim(output) > 0 else None
    if batch_size is not None and batch is not None and batch_size != batch:
        raise ValueError(
            f"`batch_size` must equal the batch size of `output` ({batch}), got "
            f"{batch_size!r}."
        )


def check_shape(name: str, received: Any, expected_shape: tuple, what: str) -> None:
    if np.shape(received) != tuple(expected_shape):
        raise ValueError(
            f"`{name}` has shape {np.shape(received)} but {what} has shape "
            f"{tuple(expected_shape)}." + one_hot_hint(received, expected_shape)
        )


def check_same_shape(names: tuple[str, str], a: Any, b: Any) -> None:
    """Raise a `ValueError` naming both shapes unless `a` and `b` have the same shape.

    Losses and metrics do not broadcast: e.g. labels `(batch, 1)` against logits
    `(batch, classes)` would silently give a different number. `names` are the
    argument names of `a` and `b`; the one called `labels` or `truths` gets the
    one-hot hint when it holds integer class labels.
    """
    if np.shape(a) == np.shape(b):
        return
    labels, other = (b, a) if names[1] in ("labels", "truths") else (a, b)
    raise ValueError(
        f"`{names[0]}` and `{names[1]}` must have the same shape, got "
        f"{names[0]}.shape={np.shape(a)} and {names[1]}.shape={np.shape(b)}."
        + one_hot_hint(labels, np.shape(other))
    )


def one_hot_hint(received: Any, expected_shape: tuple) -> str:
    """A hint for integer class labels given where one-hot targets are expected."""
    shape = np.shape(received)
    integer = jnp.issubdtype(jnp.result_type(received), jnp.integer)
    if not integer or len(expected_shape) < 2 or expected_shape[-1] < 2:
        return ""
    if shape != tuple(expected_shape[:-1]):
        return ""
    return (
        " Integer class labels must be one-hot encoded: use "
        f"`jpc.datasets.one_hot(labels, {expected_shape[-1]})`."
    )


def flatten_hint(layer: Any, z: Any, name: str) -> str:
    """A hint for images given unflattened to a layer that starts with a `Linear`."""
    linears = [
        node
        for node in jtu.tree_leaves(
            layer, is_leaf=lambda n: isinstance(n, eqx.nn.Linear)
        )
        if isinstance(node, eqx.nn.Linear)
    ]
    if not linears or np.ndim(z) < 3 or not isinstance(linears[0].in_features, int):
        return ""
    size = linears[0].in_features
    if int(np.prod(np.shape(z)[1:])) != size:
        return ""
    return (
        f" The layer expects flat vectors: flatten each example to {size}, e.g. "
        f"`{name}.reshape(len({name}), -1)`."
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


# Traced options whose values must be finite and positive (precisions), checked in
# the Python wrapper of `traced_floats` while they are still concrete.
_POSITIVE = ("hidden_energy_scaling",)


def check_positive(name: str, value: Any) -> None:
    """`ValueError` unless every value of `value` is finite and positive.

    Only Python numbers, sequences of them and NumPy arrays are checked here; JAX
    arrays are left alone (reading them would wait for the device at every call).
    """
    if isinstance(value, jax.Array) or (
        isinstance(value, (list, tuple))
        and any(isinstance(v, jax.Array) for v in value)
    ):
        return
    try:
        values = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a number or a sequence of numbers, got "
            f"{type(value).__name__} {value!r:.60}."
        ) from None
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"`{name}` must be finite and positive, got {value!r:.80}.")


def traced_floats(*names: str) -> Callable[[Callable], Callable]:
    """Jit `fn` (like `eqx.filter_jit`), passing the keyword arguments `names` traced.

    `eqx.filter_jit` treats Python floats as static, so every new value would
    recompile. Non-zero Python numbers given for `names` are turned into weakly
    typed JAX scalars (traced arrays), and so is every number of a list or tuple
    given for them (one value per layer); an exact `0` stays static so that a
    switched-off regulariser is left out of the compiled program. The jit is
    `lean_jit` (`_jit.py`), whose per-call overhead is small. Precisions (names in
    `_POSITIVE`) are checked to be finite and positive first.
    """

    def decorator(fn: Callable) -> Callable:
        jitted = lean_jit(fn)

        unchecked = [True]  # the value checks run on the first concrete call only

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if unchecked and check_values(fn, args, kwargs):
                unchecked.clear()
            for name in names:
                value = kwargs.get(name)
                if name in _POSITIVE and value is not None:
                    check_positive(name, value)
                if _is_number(value) and value != 0:
                    # Weakly typed, so it takes the dtype of the arrays it meets
                    # (float32 data stays float32 with `jax_enable_x64` on).
                    kwargs[name] = jnp.asarray(float(value))
                elif isinstance(value, (list, tuple)) and all(map(_is_number, value)):
                    # One value per layer (e.g. the hidden precisions): traced too,
                    # as one array.
                    kwargs[name] = np.asarray(value, dtype=float)
            return jitted(*args, **kwargs)

        wrapper.jitted = jitted  # type: ignore[attr-defined]
        wrapper.value_checks = unchecked  # type: ignore[attr-defined]
        return present(wrapper, fn)

    return decorator


def _concrete(value: Any) -> bool:
    """Whether `value` is an array whose values can be read here (not traced and,
    across processes, fully addressable)."""
    if not isinstance(value, (np.ndarray, jax.Array)):
        return False
    if isinstance(value, jax.core.Tracer):
        return False
    return getattr(value, "is_fully_addressable", True)


def check_values(fn: Callable, args: tuple, kwargs: dict) -> bool:
    """One-time warnings about the values of the data and weights given to `fn`.

    Run by [`traced_floats`][] outside the compiled program, on the first call
    whose arrays are concrete (not traced); returns whether it is done (it ran,
    or the arguments do not bind to `fn`, whose call then reports them). Checks the
    bottom clamp (`input` or `x`) for raw pixel values, and the weight scale of
    the model against `param_type`. `wrapper.value_checks` is the flag: a
    non-empty list until the checks have run.
    """
    try:
        bound = inspect.signature(inspect.unwrap(fn)).bind(*args, **kwargs)
    except (TypeError, ValueError):  # let the call itself report bad arguments
        return True
    bound.apply_defaults()
    arguments = bound.arguments
    name = next((n for n in ("input", "x") if n in arguments), None)
    data = None if name is None else arguments[name]
    model = arguments.get("model")
    if model is None and isinstance(arguments.get("params"), (tuple, list)):
        model = arguments["params"][0]
    weights = _first_wide_weight(model)
    if not (_concrete(data) or _concrete(weights)):
        return False
    if _concrete(data):
        warn_raw_pixels(name, data)
    param_type = arguments.get("param_type")
    if _concrete(weights) and isinstance(param_type, str):
        warn_weight_scale(weights, param_type)
    return True


def warn_raw_pixels(name: str, data: Any) -> None:
    """Warn when `data` looks like images of raw pixel values (0 to 255)."""
    if np.ndim(data) < 2 or np.size(data) // np.shape(data)[0] < 64:
        return
    values = np.asarray(data)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        return
    low, high = values.min(), values.max()
    raw = low >= 0 and 1 < high <= 255 and np.all(values == np.round(values))
    if raw:
        warnings.warn(
            f"`{name}` looks like raw pixel values (whole numbers up to {high}, "
            f"dtype {values.dtype}): scale to [0, 1], e.g. `{name} / 255`, as "
            "the models and step sizes of predictive coding assume inputs of "
            "order one.",
            stacklevel=4,
        )


def _first_wide_weight(model: Any) -> Any:
    """The weight of the first `eqx.nn.Linear` of `model` with fan-in at least 64."""
    if model is None:
        return None
    is_linear = lambda n: isinstance(n, eqx.nn.Linear)  # noqa: E731
    for node in jtu.tree_leaves(model, is_leaf=is_linear):
        if is_linear(node) and np.ndim(node.weight) == 2:
            if np.shape(node.weight)[1] >= 64:
                return node.weight
    return None


def warn_weight_scale(weight: Any, param_type: str) -> None:
    r"""Warn when the weight scale does not fit the parameterisation `param_type`.

    `"mupc"` and `"ntp"` expect weights drawn from $\mathcal{N}(0, 1)$ (the
    scaling is applied in the forward pass); `"sp"` expects the usual
    initialisation, of standard deviation about $1/\sqrt{3\,\text{fan-in}}$.
    """
    std = float(np.std(np.asarray(weight)))
    if param_type == "sp" and std > 0.5:
        found = "drawn from N(0, 1), as `make_mlp(param_type='mupc')` draws them"
    elif param_type in ("mupc", "ntp") and std < 0.25:
        found = "of the standard initialisation (`make_mlp(param_type='sp')`)"
    else:
        return
    warnings.warn(
        f"The weights look {found} (standard deviation {std:.3g}), but "
        f"`param_type={param_type!r}`: pass the `param_type` the model was built "
        "with, or the updates will be badly scaled.",
        stacklevel=4,
    )
