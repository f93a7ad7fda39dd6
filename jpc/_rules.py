r"""Other local learning rules on list-of-layers MLPs.

Feedback alignment (Lillicrap et al. 2016) and Kolen–Pollack (Akrout et al. 2019)
updates for the batch-mean output loss ([`jpc.mse_loss`][] or
[`jpc.cross_entropy_loss`][]), and the pieces the perturbation estimators of
`_perturbation.py` and the diagnostics share. The models are the ones
[`jpc.make_mlp`][] builds, or any list of layers that each contain exactly one
`eqx.nn.Linear` (plus activations); scalings and skips are applied as everywhere
else in `jpc`.
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from ._checks import LOSSES, check_batch, check_model, check_option, traced_floats
from ._jit import filter_jit
from ._layers import (
    feedforward,
    get_param_scalings,
    is_weight_matrix,
    skip_at,
)
from ._types import Array, Float, LossId, Model, ParamType, PyTree, Scalar, SkipModel
from ._utils import LOSS_FNS


# ------------------------------------------------------------------ shared pieces


def _is_linear(node: Any) -> bool:
    return isinstance(node, eqx.nn.Linear)


def linear_of(layer: Any, i: int) -> eqx.nn.Linear:
    """The single `eqx.nn.Linear` inside `layer` (`model[i]`)."""
    found = [n for n in jtu.tree_leaves(layer, is_leaf=_is_linear) if _is_linear(n)]
    if len(found) != 1 or jnp.ndim(found[0].weight) != 2:
        raise ValueError(
            f"`model[{i}]` must contain exactly one `eqx.nn.Linear` with a 2-D "
            f"weight for this learning rule, found {len(found)}."
        )
    return found[0]


def check_rule_inputs(model, skip_model, x, y, loss_id) -> None:
    check_option("loss_id", loss_id, LOSSES)
    check_model(model, skip_model)
    check_batch(y, x, [])


def scalings_for(model, x, skip_model, param_type) -> list:
    return get_param_scalings(model, x, skip_model=skip_model, param_type=param_type)


def output_loss(model, skip_model, scalings, x, y, loss_id) -> Array:
    """Batch-mean output loss of the feedforward pass."""
    return LOSS_FNS[loss_id](feedforward(model, x, skip_model, scalings)[-1], y)


class _NoisySkip(eqx.Module):
    """A skip connection plus a fixed per-example shift: perturbs a layer's output."""

    skip: Any
    noise: Array

    def __call__(self, z, *, key=None):
        return self.noise if self.skip is None else self.skip(z) + self.noise


def per_example_losses(model, skip_model, scalings, x, y, loss_id, noise=None):
    """Output loss of each example, `(batch,)`; `noise` shifts each layer's output.

    `noise` is `None` or a list with one `(batch, ...)` array per layer, added to
    that layer's output $z_l$ (per example) during the feedforward pass.
    """

    def one(x_i, y_i, noise_i):
        skips = skip_model
        if noise_i is not None:
            skips = [
                _NoisySkip(skip_at(skip_model, i), n) for i, n in enumerate(noise_i)
            ]
        pred = feedforward(model, x_i[None], skips, scalings)[-1]
        return LOSS_FNS[loss_id](pred, y_i[None])

    return jax.vmap(one)(x, y, noise)


def backprop_grads(model, x, y, *, loss_id="mse", skip_model=None, param_type="sp"):
    """`eqx.filter_grad` of the batch-mean output loss with respect to `model`."""
    scalings = scalings_for(model, x, skip_model, param_type)
    return eqx.filter_grad(output_loss)(model, skip_model, scalings, x, y, loss_id)


# ------------------------------------------------------------------ feedback alignment


@jax.custom_vjp
def _feedback_matvec(weight, feedback, h):
    return weight @ h


def _feedback_matvec_fwd(weight, feedback, h):
    return weight @ h, (feedback, h)


def _feedback_matvec_bwd(residuals, g):
    feedback, h = residuals
    return jnp.outer(g, h), jnp.zeros_like(feedback), feedback @ g


_feedback_matvec.defvjp(_feedback_matvec_fwd, _feedback_matvec_bwd)


class _FeedbackLinear(eqx.Module):
    """`eqx.nn.Linear` whose backward pass sends errors through `feedback`, not `Wᵀ`."""

    linear: eqx.nn.Linear
    feedback: Array

    def __call__(self, h, *, key=None):
        out = _feedback_matvec(self.linear.weight, self.feedback, h)
        return out if self.linear.bias is None else out + self.linear.bias


def _with_feedback(model: Model, feedback: list) -> list:
    def swap(layer, fb):
        if fb is None:
            return layer
        fb = jax.lax.stop_gradient(fb)
        return jtu.tree_map(
            lambda n: _FeedbackLinear(n, fb) if _is_linear(n) else n,
            layer,
            is_leaf=_is_linear,
        )

    return [swap(layer, fb) for layer, fb in zip(model, feedback)]


def _check_feedback(model: Model, feedback: Any) -> None:
    if not isinstance(feedback, (list, tuple)):
        raise TypeError(f"`feedback` must be a list, got {type(feedback).__name__}.")
    if len(feedback) != len(model):
        raise ValueError(
            f"`feedback` must have one entry per layer ({len(model)}), got "
            f"{len(feedback)}."
        )
    for i, (layer, fb) in enumerate(zip(model, feedback)):
        expected = linear_of(layer, i).weight.T.shape
        if i > 0 and (fb is None or jnp.shape(fb) != expected):
            raise ValueError(
                f"`feedback[{i}]` must have shape {expected} (the transposed weight "
                f"of `model[{i}]`), got {None if fb is None else jnp.shape(fb)}."
            )


def init_feedback_weights(key: Array, model: Model) -> list[Array | None]:
    r"""Fixed random feedback matrices $B_l$ for feedback alignment.

    $B_l$ has the shape of $W_l^\top$ and uniform entries with the same second
    moment as $W_l$ (for a fresh `eqx.nn.Linear` that is Equinox's own
    $U(\pm 1/\sqrt{\text{fan-in}})$). The first layer sends no error further
    down, so its entry is `None`.

    **Arguments:**

    - `key`: PRNG key.
    - `model`: list of layers, each containing exactly one `eqx.nn.Linear`.

    **Returns:**

    A list with one entry per layer: `None`, then `(in_l, out_l)` arrays.

    **Raises:**

    `ValueError` if a layer does not contain exactly one `eqx.nn.Linear`.
    """
    check_model(model)
    for i, layer in enumerate(model):
        linear_of(layer, i)
    feedback: list[Array | None] = [None]
    keys = jr.split(key, len(model))
    for i in range(1, len(model)):
        weight = linear_of(model[i], i).weight
        rms = jnp.sqrt(jnp.mean(weight**2))
        rms = jnp.where(rms > 0, rms, 1 / math.sqrt(weight.shape[1]))
        bound = math.sqrt(3) * rms
        draw = jr.uniform(keys[i], weight.T.shape, weight.dtype, -1.0, 1.0)
        feedback.append(bound * draw)
    return feedback


@filter_jit
def compute_fa_param_grads(
    model: Model,
    feedback: list[Array | None],
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    loss_id: LossId = "mse",
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
) -> PyTree:
    r"""Feedback-alignment weight updates (Lillicrap et al. 2016).

    Backprop of the batch-mean output loss in which every layer's error is sent
    down through the fixed matrix $B_l$ instead of $W_l^\top$: with
    $\delta_L = \partial\mathcal{L}/\partial z_L$, the error below layer $l$ is
    $B_l \delta_l$ (times the layer's scaling and activation derivative), and
    $\Delta W_l \propto \delta_l h_{l-1}^\top$ as in backprop. With
    $B_l = W_l^\top$ this is exactly backprop.

    **Arguments:**

    - `model`: list of layers, each containing exactly one `eqx.nn.Linear`.
    - `feedback`: from [`jpc.init_feedback_weights`][].
    - `x`, `y`: input and target batches.
    - `loss_id`: `"mse"` or `"ce"`.
    - `skip_model`, `param_type`: as for [`jpc.make_bp_step`][].

    **Returns:**

    Gradients shaped like `model` (`None` where a leaf is not an array).

    **Raises:**

    `ValueError` for an unknown `loss_id` or feedback shapes that do not fit.
    """
    check_rule_inputs(model, skip_model, x, y, loss_id)
    _check_feedback(model, feedback)
    scalings = scalings_for(model, x, skip_model, param_type)

    def loss(m):
        fa_model = _with_feedback(m, feedback)
        return output_loss(fa_model, skip_model, scalings, x, y, loss_id)

    return eqx.filter_grad(loss)(model)


def add_weight_decay(grads: PyTree, model: Model, weight_decay: Any) -> PyTree:
    """`grads + weight_decay * W` on every weight (floating array with >= 2 axes,
    see `is_weight_matrix`); other leaves, such as biases, unchanged."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return grads
    params = eqx.filter(model, eqx.is_array)
    return jtu.tree_map_with_path(
        lambda path, g, p: g + weight_decay * p if is_weight_matrix(path, p) else g,
        grads,
        params,
    )


@traced_floats("weight_decay")
def compute_kp_updates(
    model: Model,
    feedback: list[Array | None],
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    loss_id: LossId = "mse",
    weight_decay: Scalar = 0.0,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
) -> tuple[PyTree, list[Array | None]]:
    r"""Kolen–Pollack updates (Akrout et al. 2019).

    The forward weights get the feedback-alignment gradient plus weight decay,
    $G_l + \lambda_w W_l$; each feedback matrix gets the transpose of its layer's
    weight gradient plus the same decay, $G_l^\top + \lambda_w B_l$. Applied with
    the same SGD step $\eta$, $B_l - W_l^\top$ shrinks by $(1 - \eta\lambda_w)$
    every step, so $B_l \to W_l^\top$.

    **Arguments:**

    As for [`jpc.compute_fa_param_grads`][], plus `weight_decay` $\lambda_w$ (on
    weights only, not biases).

    **Returns:**

    `(param_grads, feedback_grads)`: gradients shaped like `model`, and a list like
    `feedback` (entry 0 `None`).
    """
    grads = compute_fa_param_grads(
        model,
        feedback,
        x,
        y,
        loss_id=loss_id,
        skip_model=skip_model,
        param_type=param_type,
    )
    feedback_grads = [None] + [
        linear_of(grads[i], i).weight.T + weight_decay * feedback[i]
        for i in range(1, len(model))
    ]
    return add_weight_decay(grads, model, weight_decay), feedback_grads
