"""Activity initialisation: feedforward pass and random normal draws."""

import numbers
from collections.abc import Sequence
from typing import Any

import jax.random as jr

from ._checks import MODES, check_batch, check_model, check_option, traced_floats
from ._layers import feedforward, get_param_scalings
from ._types import Array, Float, Mode, Model, ParamType, Scalar, SkipModel


@traced_floats("gamma")
def init_activities_with_ffwd(
    model: Model,
    input: Float[Array, "batch ..."],
    *,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
) -> list[Float[Array, "batch ..."]]:
    """Initialise the activities with a feedforward pass from `input`.

    At this state every hidden prediction error is zero. The pass is compiled (a
    new `gamma` value does not recompile), with the same operations as the
    predictions inside the energies, so that the errors are exactly zero there too.

    **Arguments:**

    - `model`: list of per-example layers.
    - `input`: `(batch, ...)` data clamping the bottom of the network.
    - `skip_model`: optional skip callables, one entry (or `None`) per layer.
    - `param_type`: `"sp"`, `"mupc"` or `"ntp"` (see [`jpc.get_param_scalings`][]).
    - `gamma`: optional output scaling.

    **Returns:**

    The list `[z_1, ..., z_L]`; the last entry is the network's prediction.
    """
    check_model(model, skip_model)
    check_batch(input, None, [], y_name="input")
    scalings = get_param_scalings(
        model, input, skip_model=skip_model, param_type=param_type, gamma=gamma
    )
    return feedforward(model, input, skip_model, scalings)


def _is_count(value: Any) -> bool:
    """A positive integer (Python or NumPy), not a bool."""
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and value > 0
    )


def _as_shape(size: Any) -> tuple[int, ...]:
    return tuple(size) if isinstance(size, Sequence) else (size,)


def init_activities_from_normal(
    key: Array,
    layer_sizes: Sequence[int | Sequence[int]],
    mode: Mode,
    batch_size: int,
    sigma: Scalar = 0.05,
) -> list[Float[Array, "batch ..."]]:
    r"""Draw activities from $\mathcal{N}(0, \sigma^2)$.

    **Arguments:**

    - `key`: PRNG key.
    - `layer_sizes`: per-example sizes `[d_0, d_1, ..., d_L]` of every layer
        including the input/latent layer (an int or a shape tuple each).
    - `mode`: `"supervised"` draws `z_1..z_L`; `"unsupervised"` also draws the
        free latent `z_0`.
    - `batch_size`: leading batch size `B`.
    - `sigma`: standard deviation.

    **Returns:**

    A list of `L` (supervised) or `L + 1` (unsupervised) arrays.

    **Raises:**

    `ValueError` for an unknown `mode` or a non-positive `batch_size`.
    """
    check_option("mode", mode, MODES)
    if not _is_count(batch_size):
        raise ValueError(
            f"`batch_size` must be a positive integer, got {batch_size!r}."
        )
    sizes = list(layer_sizes[1:] if mode == "supervised" else layer_sizes)
    keys = jr.split(key, len(sizes))
    return [
        sigma * jr.normal(k, (int(batch_size), *_as_shape(size)))
        for k, size in zip(keys, sizes)
    ]
