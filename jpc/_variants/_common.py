"""Small pieces shared by the variants (not by standard PC, which has its own)."""

from typing import Any

import equinox as eqx
import optax


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


def check_optim(name: str, value: Any) -> None:
    """Raise a `TypeError` unless `value` is an optax optimiser."""
    if not isinstance(value, optax.GradientTransformation):
        raise TypeError(
            f"`{name}` must be an optax optimiser (a `GradientTransformation`), got "
            f"{type(value).__name__} {value!r:.80}."
        )
