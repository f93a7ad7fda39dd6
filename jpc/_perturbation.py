r"""Perturbation estimators of the gradient: weight and node perturbation.

Both estimate the gradient of the batch-mean output loss of a list-of-layers model
from loss changes under random perturbations, $S$ perturbations at a time in
parallel (`jax.vmap`), never through a backward pass of the network.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree

from ._checks import traced_floats
from ._layers import feedforward, layer_inputs, layer_predictions
from ._rules import check_rule_inputs, output_loss, per_example_losses, scalings_for
from ._types import Array, Float, LossId, Model, ParamType, PyTree, Scalar, SkipModel


def _normal_like(key: Array, tree: PyTree, sigma: Any) -> PyTree:
    r"""$\mathcal{N}(0, \sigma^2)$ noise shaped like `tree`, drawn in one call."""
    flat, unravel = ravel_pytree(tree)
    return unravel(sigma * jr.normal(key, flat.shape, flat.dtype))


def _check_samples(n_samples: Any) -> None:
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"`n_samples` must be a positive integer, got {n_samples!r}.")


def _check_sigma(sigma: Any) -> None:
    """A zero `sigma` divides by zero (NaN estimates); it stays static, so check it.

    Non-zero Python numbers arrive traced (`traced_floats`) and are not checked: a
    negative `sigma` is valid (the perturbations are symmetric).
    """
    if isinstance(sigma, bool) or (
        isinstance(sigma, (int, float, np.number)) and sigma == 0
    ):
        raise ValueError(f"`sigma` must be a non-zero float, got {sigma!r}.")


@traced_floats("sigma")
def compute_wp_param_grads(
    key: Array,
    model: Model,
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    sigma: Scalar = 1e-3,
    n_samples: int = 1,
    loss_id: LossId = "mse",
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
) -> PyTree:
    r"""Weight-perturbation estimate of the gradient of the batch-mean output loss.

    $$\hat g = \frac{1}{S}\sum_{s=1}^{S}
    \frac{\mathcal{L}(\theta + \Psi_s) - \mathcal{L}(\theta)}{\sigma^2}\,\Psi_s,
    \qquad \Psi_s \sim \mathcal{N}(0, \sigma^2 I),$$

    over every array parameter $\theta$ of `model` (weights and biases), with the
    $S$ = `n_samples` perturbations evaluated in parallel (`jax.vmap`). Unbiased up
    to $O(\sigma^2)$; its variance grows with the number of parameters.

    **Arguments:**

    - `key`: PRNG key for the perturbations.
    - `model`, `x`, `y`, `loss_id`, `skip_model`, `param_type`: as for
        [`jpc.compute_fa_param_grads`][].
    - `sigma`: standard deviation of the perturbations.
    - `n_samples`: number of perturbations averaged.

    **Returns:**

    The estimate, shaped like `model`.

    **Raises:**

    `ValueError` for an unknown `loss_id`, a non-positive `n_samples` or a zero
    `sigma`.
    """
    check_rule_inputs(model, skip_model, x, y, loss_id)
    _check_samples(n_samples)
    _check_sigma(sigma)
    scalings = scalings_for(model, x, skip_model, param_type)
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p):
        m = eqx.combine(p, static)
        return output_loss(m, skip_model, scalings, x, y, loss_id)

    base = loss(params)

    def estimate(k):
        psi = _normal_like(k, params, sigma)
        change = loss(jtu.tree_map(jnp.add, params, psi)) - base
        return jtu.tree_map(lambda p: change * p / sigma**2, psi)

    samples = jax.vmap(estimate)(jr.split(key, n_samples))
    return jtu.tree_map(lambda s: jnp.mean(s, axis=0), samples)


def grads_from_node_errors(model, skip_model, scalings, x, deltas) -> PyTree:
    r"""$\sum_l \sum_i \delta_{l,i}^\top \partial z_{l,i}/\partial\theta_l$ at fixed
    layer inputs: each layer's error correlated with its presynaptic activity.

    `deltas[l]` has the shape of the layer's output $z_l$ (batch first). With the
    exact errors $\partial\mathcal{L}/\partial z_l$ this is the backprop gradient.
    """
    activities = feedforward(model, x, skip_model, scalings)
    inputs, names = layer_inputs(activities, x)
    inputs = [jax.lax.stop_gradient(z) for z in inputs]
    deltas = [jax.lax.stop_gradient(d) for d in deltas]

    def surrogate(m):
        preds = layer_predictions(m, skip_model, scalings, inputs, names)
        return sum(jnp.vdot(d, p) for d, p in zip(deltas, preds))

    return eqx.filter_grad(surrogate)(model)


@traced_floats("sigma")
def compute_np_param_grads(
    key: Array,
    model: Model,
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    sigma: Scalar = 1e-3,
    n_samples: int = 1,
    loss_id: LossId = "mse",
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
) -> PyTree:
    r"""Node-perturbation estimate of the gradient of the batch-mean output loss.

    Each layer's output $z_l$ (the pre-activation of the next layer in
    [`jpc.make_mlp`][] models) is shifted by $\xi_{l} \sim \mathcal{N}(0,
    \sigma^2 I)$, independently per example; the change of each example's loss
    estimates its error, $\hat\delta_{l,i} = \frac{1}{S}\sum_s
    (\mathcal{L}_i(\xi_s) - \mathcal{L}_i(0))\,\xi_{s,l,i} / \sigma^2$, which is
    then correlated with the layer's presynaptic activity exactly as backprop
    does ($\Delta W_l \propto \frac{1}{B}\sum_i a_l \hat\delta_{l,i}
    \phi(z_{l-1,i})^\top$). The $S$ = `n_samples` perturbations run in parallel
    (`jax.vmap`).

    **Arguments:**

    As for [`jpc.compute_wp_param_grads`][].

    **Returns:**

    The estimate, shaped like `model`.

    **Raises:**

    `ValueError` for an unknown `loss_id`, a non-positive `n_samples` or a zero
    `sigma`.
    """
    check_rule_inputs(model, skip_model, x, y, loss_id)
    _check_samples(n_samples)
    _check_sigma(sigma)
    scalings = scalings_for(model, x, skip_model, param_type)
    outputs = feedforward(model, x, skip_model, scalings)
    base = per_example_losses(model, skip_model, scalings, x, y, loss_id)

    def errors(k):
        xi = _normal_like(k, outputs, sigma)
        change = per_example_losses(model, skip_model, scalings, x, y, loss_id, xi)
        change = change - base
        return [jnp.reshape(change, (-1,) + (1,) * (n.ndim - 1)) * n for n in xi]

    samples = jax.vmap(errors)(jr.split(key, n_samples))
    batch = x.shape[0]
    deltas = [jnp.mean(s, axis=0) / (sigma**2 * batch) for s in samples]
    return grads_from_node_errors(model, skip_model, scalings, x, deltas)
