"""Small pieces shared by the variants (not by standard PC, which has its own)."""

from typing import Any

import equinox as eqx
import numpy as np
import optax

from .._checks import check_sequence


def optax_update(
    tree: Any, grads: Any, optim: optax.GradientTransformation, opt_state: Any
) -> tuple[Any, Any]:
    """One `optim` step on the array leaves of `tree`; returns `(tree, opt_state)`.

    `tree` is a model, a `(model, skip_model)` pair or a list of arrays; its
    optimiser state is `optim.init(eqx.filter(tree, eqx.is_array))`.
    """
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(tree, eqx.is_array))
    return eqx.apply_updates(tree, updates), opt_state


def check_pair(name: str, value: Any) -> tuple[Any, Any]:
    """Unpack a `(first, second)` pair such as `optims` or `opt_states`."""
    single = isinstance(value, optax.GradientTransformation)
    if single or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(
            f"`{name}` must be a pair (a tuple or list of two entries), got "
            f"{type(value).__name__} {value!r:.80}."
        )
    return value[0], value[1]


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
