"""Small pieces shared by the variants; `optax_update` is that of standard PC."""

from typing import Any

import optax

from .._updates import optax_update as optax_update


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
