"""Validation of user input, run at trace time so it costs nothing per jitted call."""

import functools
from collections.abc import Callable, Sequence
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


def check_model(model: Any, skip_model: Any = None) -> None:
    """Check that `model` is a non-empty list and `skip_model` lines up with it."""
    check_sequence("model", model)
    if len(model) == 0:
        raise ValueError("`model` must contain at least one layer, got an empty list.")
    if skip_model is not None:
        check_sequence("skip_model", skip_model)
        if len(skip_model) != len(model):
            raise ValueError(
                f"`skip_model` must have one entry per layer of `model` "
                f"({len(model)}), got {len(skip_model)} entries."
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
    (e.g. from one model alone).
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
            f"{tuple(expected_shape)}."
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def traced_floats(*names: str) -> Callable[[Callable], Callable]:
    """Jit `fn` (like `eqx.filter_jit`), passing the keyword arguments `names` traced.

    `eqx.filter_jit` treats Python floats as static, so every new value would
    recompile. Non-zero Python numbers given for `names` are turned into weakly
    typed JAX scalars (traced arrays); an exact `0` stays static so that a switched-off
    regulariser is left out of the compiled program. The jit is `lean_jit` (`_jit.py`),
    whose per-call overhead is small.
    """

    def decorator(fn: Callable) -> Callable:
        jitted = lean_jit(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for name in names:
                value = kwargs.get(name)
                if _is_number(value) and value != 0:
                    # Weakly typed, so it takes the dtype of the arrays it meets
                    # (float32 data stays float32 with `jax_enable_x64` on).
                    kwargs[name] = jnp.asarray(float(value))
            return jitted(*args, **kwargs)

        wrapper.jitted = jitted  # type: ignore[attr-defined]
        return present(wrapper, fn)

    return decorator
