"""Type aliases shared across `jpc`."""

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

from jaxtyping import Array, ArrayLike, Float, PyTree


Layer: TypeAlias = Callable[..., Any]
"""A per-example callable (usually an Equinox module) mapping `z_{l-1}` to `z_l`."""

Model: TypeAlias = Sequence[Layer]
"""A list of `L` per-example layers; entry `l` predicts activity `l` from `l - 1`."""

SkipModel: TypeAlias = Sequence[Layer | None] | None
"""`None`, or a list of `L` entries that are `None` or a per-example skip callable."""

Params: TypeAlias = tuple[Model, SkipModel]
"""`(model, skip_model)`, the way most low-level functions receive both."""

Activities: TypeAlias = Sequence[Float[Array, "batch ..."]]
"""One `(batch, ...)` array per PC layer (see the conventions page)."""

Scalar: TypeAlias = float | Float[ArrayLike, ""]
"""A continuous hyperparameter: a Python float or a 0-d JAX array (both traced)."""

LossId: TypeAlias = Literal["mse", "ce"]
ParamType: TypeAlias = Literal["sp", "mupc", "ntp"]
Mode: TypeAlias = Literal["supervised", "unsupervised"]

__all__ = [
    "Activities",
    "Array",
    "Float",
    "Layer",
    "LossId",
    "Mode",
    "Model",
    "Params",
    "ParamType",
    "PyTree",
    "Scalar",
    "SkipModel",
]
