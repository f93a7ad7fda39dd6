"""Model builders, losses and small metrics."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from ._checks import PARAM_TYPES, check_option, check_same_shape
from ._types import Activities, Array, Float, ParamType, PyTree


def _identity(x):
    return x


_ACT_FNS: dict[str, Callable] = {
    "linear": _identity,
    "tanh": jnp.tanh,
    "hard_tanh": jax.nn.hard_tanh,
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "gelu": jax.nn.gelu,
    "selu": jax.nn.selu,
    "silu": jax.nn.silu,
}


def get_act_fn(name: str | Callable) -> Callable:
    """The activation function called `name`.

    **Arguments:**

    - `name`: one of `"linear"`, `"tanh"`, `"hard_tanh"`, `"relu"`, `"leaky_relu"`,
        `"gelu"`, `"selu"`, `"silu"`; a callable is returned unchanged.

    **Returns:**

    The elementwise function.

    **Raises:**

    `ValueError` if `name` is not a known activation.
    """
    if callable(name):
        return name
    check_option("act_fn", name, tuple(_ACT_FNS))
    return _ACT_FNS[name]


def _check_dim(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def make_mlp(
    key: Array,
    input_dim: int,
    width: int,
    depth: int,
    output_dim: int,
    act_fn: str | Callable,
    use_bias: bool = False,
    param_type: ParamType = "sp",
) -> list[eqx.nn.Sequential]:
    r"""A multi-layer perceptron as a list of `depth` PC layers.

    Layer $l$ is `eqx.nn.Sequential([Lambda(act), Linear])`, i.e.
    $f_l(z) = W_l \phi(z) + b_l$, with the identity as the first layer's activation
    (`Lambda(eqx.nn.Identity())`, which holds no pytree leaf) and no activation
    after the last linear map. As in Equinox's examples, `key` is split into
    `depth` keys and layer $l$'s `eqx.nn.Linear` receives key $l$ unchanged, so a
    key gives the same network as the JPC library's `make_mlp`.

    **Arguments:**

    - `key`: PRNG key for the weights.
    - `input_dim`, `width`, `output_dim`: input, hidden and output sizes.
    - `depth`: number of layers `L` (`depth - 1` hidden layers).
    - `act_fn`: activation name (see [`jpc.get_act_fn`][]) or function.
    - `use_bias`: whether the linear maps have biases.
    - `param_type`: `"sp"` keeps Equinox's default initialisation; `"mupc"` and
        `"ntp"` draw every weight from $\mathcal{N}(0, 1)$ with the layer's own key
        (`jax.random.normal(keys[l], shape)`; biases keep Equinox's default); the
        scaling is applied in the forward pass by [`jpc.get_param_scalings`][].

    **Returns:**

    A list of `depth` `eqx.nn.Sequential` layers.

    **Raises:**

    `ValueError` for non-positive sizes, an unknown `act_fn` or `param_type`.
    """
    for name, value in [("input_dim", input_dim), ("width", width)]:
        _check_dim(name, value)
    _check_dim("depth", depth)
    _check_dim("output_dim", output_dim)
    check_option("param_type", param_type, PARAM_TYPES)
    act = get_act_fn(act_fn)
    dims = [input_dim] + [width] * (depth - 1) + [output_dim]
    keys = jr.split(key, depth)
    layers = []
    for i in range(depth):
        linear = eqx.nn.Linear(dims[i], dims[i + 1], use_bias=use_bias, key=keys[i])
        if param_type != "sp":
            weight = jr.normal(keys[i], linear.weight.shape, linear.weight.dtype)
            linear = eqx.tree_at(lambda m: m.weight, linear, weight)
        activation = eqx.nn.Lambda(eqx.nn.Identity() if i == 0 else act)
        layers.append(eqx.nn.Sequential([activation, linear]))
    return layers


def make_skip_model(depth: int) -> list[eqx.nn.Identity | None]:
    """Identity skip connections for every hidden layer of a `depth`-layer model.

    **Returns:**

    A list of `depth` entries: `None` first and last, `eqx.nn.Identity()` between.
    """
    _check_dim("depth", depth)
    return [None if i in (0, depth - 1) else eqx.nn.Identity() for i in range(depth)]


def mse_loss(preds: Float[Array, "batch ..."], labels: Float[Array, "batch ..."]):
    r"""$\frac{1}{2B}\sum_i \lVert y_i - \hat y_i \rVert^2$ (half the batch mean).

    **Raises:**

    `ValueError` naming both shapes if `preds` and `labels` differ in shape (no
    broadcasting).
    """
    check_same_shape(("preds", "labels"), preds, labels)
    return 0.5 * jnp.sum((labels - preds) ** 2) / labels.shape[0]


def cross_entropy_loss(
    logits: Float[Array, "batch classes"], labels: Float[Array, "batch classes"]
):
    r"""$-\frac{1}{B}\sum_i \sum_k y_{ik} \log \mathrm{softmax}(\hat y_i)_k$.

    Terms with $y_{ik} = 0$ are exactly zero ($0 \log 0 = 0$), so classes masked
    out with a logit of $-\infty$ give a finite loss and finite gradients, as long
    as their label is 0.

    **Raises:**

    `ValueError` naming both shapes if `logits` and `labels` differ in shape (no
    broadcasting); the message suggests [`jpc.datasets.one_hot`][] for integer
    class labels.
    """
    check_same_shape(("logits", "labels"), logits, labels)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    # Double `where`: the masked entries are replaced before the product too, so
    # that neither the value nor its gradient meets 0 * inf.
    unused = labels == 0
    safe_log_probs = jnp.where(unused, 0.0, log_probs)
    terms = jnp.where(unused, 0.0, labels * safe_log_probs)
    return -jnp.sum(terms) / labels.shape[0]


LOSS_FNS = {"mse": mse_loss, "ce": cross_entropy_loss}


def compute_accuracy(
    truths: Float[Array, "batch classes"], preds: Float[Array, "batch classes"]
):
    """Percentage of rows whose argmax agrees between `truths` and `preds`.

    Computed from the integer count as quotient plus remainder, so that a percentage
    that is an exact float (9 of 9 rows: `100.0`; 3 of 8: `37.5`) is returned exactly.

    **Raises:**

    `ValueError` naming both shapes if `truths` and `preds` differ in shape.
    """
    check_same_shape(("truths", "preds"), truths, preds)
    hits = jnp.argmax(truths, axis=-1) == jnp.argmax(preds, axis=-1)
    whole, rest = jnp.divmod(100 * jnp.sum(hits), hits.size)
    return whole + rest / hits.size


def get_t_max(activities_iters: Activities):
    """Index of the last recorded state of a trajectory padded with `inf`.

    **Arguments:**

    - `activities_iters`: activities with a leading time axis, as returned by
        [`jpc.solve_inference`][] with `record_iters=True` (rows after the last
        accepted step are `inf`).

    **Returns:**

    A scalar integer array.
    """
    first = activities_iters[0]
    rows = jnp.reshape(first, (first.shape[0], -1))
    return jnp.sum(~jnp.all(jnp.isinf(rows), axis=1)) - 1


def compute_activity_norms(activities: Activities) -> Array:
    r"""Mean L2 norm of each layer's activities over the batch.

    For each array $z_l$ of shape `(batch, ...)`, each example is flattened and
    $\frac1B\sum_i\lVert z_{l,i}\rVert_2$ is taken, as in the JPC library: the
    rows `[[3, 4], [0, 0]]` give `2.5`.

    **Arguments:**

    - `activities`: list of arrays with a leading batch axis.

    **Returns:**

    An array with one entry per layer.
    """
    return jnp.stack(
        [
            jnp.mean(jnp.linalg.norm(jnp.reshape(z, (jnp.shape(z)[0], -1)), axis=1))
            for z in activities
        ]
    )


def leaf_norms(tree: PyTree, like: PyTree | None = None) -> Array:
    """L2 norm of each leaf of `like` (default `tree`), read from `tree`.

    One entry per leaf of `jax.tree_util.tree_leaves(like)`: the norm of the
    matching leaf of `tree` when it is an array, else `0.`. `tree` may hold `None`
    where `like` has a non-array leaf (the layout of `eqx.filter_grad`).
    """
    like = tree if like is None else like
    is_none = lambda x: x is None  # noqa: E731
    values = jtu.tree_leaves(tree, is_leaf=is_none)
    reference = jtu.tree_leaves(like, is_leaf=is_none)
    if len(values) != len(reference):
        raise ValueError("`tree` does not have the structure of `like`.")
    norms = [
        jnp.linalg.norm(jnp.ravel(v)) if eqx.is_array(v) else None
        for v, r in zip(values, reference)
        if r is not None
    ]
    found = [n for n in norms if n is not None]
    dtype = jnp.result_type(*found) if found else jnp.result_type(float)
    return jnp.asarray(
        [jnp.zeros((), dtype) if n is None else n for n in norms], dtype=dtype
    )


def compute_param_norms(params: PyTree) -> tuple[Array, Array | None]:
    """L2 norm of every leaf of a model and of its skip model.

    **Arguments:**

    - `params`: `(model, skip_model)`; `skip_model` may be `None`.

    **Returns:**

    `(model_norms, skip_model_norms)`: `model_norms` has one entry per leaf of
    `jax.tree_util.tree_leaves(model)`, the L2 norm of an array leaf and `0.` for
    any other leaf (e.g. the activation function inside an `eqx.nn.Lambda`);
    `skip_model_norms` likewise, or `None` when `skip_model` is `None`.

    **Raises:**

    `TypeError` if `params` is not a `(model, skip_model)` pair.
    """
    if not isinstance(params, (tuple, list)) or len(params) != 2:
        raise TypeError(
            "`params` must be the pair `(model, skip_model)`, got "
            f"{type(params).__name__} {params!r:.80}."
        )
    model, skip_model = params
    return leaf_norms(model), None if skip_model is None else leaf_norms(skip_model)
