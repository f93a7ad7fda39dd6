r"""Gradient diagnostics: alignment with backprop, signal-to-noise, layer balance.

Gradients are compared layer by layer: "layer" means an entry of the top-level list of
a model-shaped gradient (e.g. `model_grads` from [`jpc.compute_pc_param_grads`][],
or the output of [`jpc.compute_fa_param_grads`][]).
"""

from collections.abc import Sequence
from typing import Any, TypedDict

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax

from ._checks import check_layers, traced_floats
from ._energies import check_hidden_scaling, make_energy_kwargs
from ._grads import compute_pc_param_grads
from ._infer import (
    DEFAULT_STEADY_STATE_ATOL,
    DEFAULT_STEADY_STATE_RTOL,
    STOP_FLOATS,
    stop_options,
)
from ._jit import filter_jit
from ._layer_learning import (
    LayerLearning,
    check_supervised,
    layer_learning_metric,
    safe_cosine,
    unit_scaled,
)
from ._layers import weight_matrices
from ._perturbation import compute_np_param_grads, compute_wp_param_grads
from ._rules import (
    backprop_grads,
    check_rule_inputs,
    compute_fa_param_grads,
    compute_kp_updates,
    init_feedback_weights,
    output_loss,
    scalings_for,
)
from ._train import (
    check_inference_options,
    infer,
    initial_activities,
    with_activity_lr,
)
from ._types import Array, Float, LossId, Model, ParamType, PyTree, Scalar, SkipModel
from ._updates import ENERGY_FLOATS


class LayerwiseScore(TypedDict):
    """A score per layer and over all layers together."""

    per_layer: Float[Array, " layers"]
    overall: Float[Array, ""]


class VarianceRatios(TypedDict):
    """Result of [`jpc.compute_layer_grad_variance_ratios`][]."""

    variances: Float[Array, " layers"]
    ratios: Float[Array, " layers"]


class BackpropComparison(TypedDict):
    """Result of [`jpc.compare_to_backprop`][]: cosine similarities to backprop."""

    pc_equilibrium: LayerwiseScore
    pc_feedforward: LayerwiseScore
    fa: LayerwiseScore
    kp: LayerwiseScore
    wp: LayerwiseScore
    np: LayerwiseScore


def _check_leading_axis(name: str, leaves: list) -> None:
    """Every leaf needs the same leading axis of samples."""
    sizes = {a.shape[0] if a.ndim > 0 else None for a in leaves}
    if None in sizes or len(sizes) > 1:
        shapes = [tuple(a.shape) for a in leaves]
        raise ValueError(
            f"Every array leaf of `{name}` must have the same leading axis of "
            f"samples (one row per example), got leaves of shapes {shapes}."
        )


def _layer_vectors(grads: Any, name: str, with_axis: bool = False) -> list[Array]:
    """Every array leaf of each top-level entry, flattened (keeping a leading axis)."""
    check_layers(name, grads)
    vectors = []
    for layer in grads:
        leaves = jtu.tree_leaves(eqx.filter(layer, eqx.is_array))
        if with_axis:
            _check_leading_axis(name, leaves)
            parts = [jnp.reshape(a, (a.shape[0], -1)) for a in leaves]
            vectors.append(jnp.concatenate(parts, axis=1) if parts else None)
        else:
            parts = [jnp.ravel(a) for a in leaves]
            vectors.append(jnp.concatenate(parts) if parts else jnp.zeros(0))
    return vectors


def compute_grad_cosine_similarity(grads_a: PyTree, grads_b: PyTree) -> LayerwiseScore:
    r"""Cosine similarity $\langle a, b\rangle / (\lVert a\rVert\lVert b\rVert)$ of two
    gradients, per layer and over all parameters.

    **Arguments:**

    - `grads_a`, `grads_b`: model-shaped gradients (a list with one pytree per
        layer; `None` leaves are ignored), e.g. the first element of
        [`jpc.compute_pc_param_grads`][]'s result.

    **Returns:**

    A dict with `per_layer` (one value per layer; `nan` for a layer whose gradient
    is zero or has no arrays) and `overall` (over all parameters concatenated).

    **Raises:**

    `ValueError` if the two gradients have different numbers of layers or layer
    sizes.
    """
    a, b = _layer_vectors(grads_a, "grads_a"), _layer_vectors(grads_b, "grads_b")
    sizes_a, sizes_b = [v.size for v in a], [v.size for v in b]
    if sizes_a != sizes_b:
        raise ValueError(
            "`grads_a` and `grads_b` must have the same layers; got layer sizes "
            f"{sizes_a} and {sizes_b}."
        )
    per_layer = jnp.stack([safe_cosine(u, v) for u, v in zip(a, b)])
    return LayerwiseScore(
        per_layer=per_layer, overall=safe_cosine(jnp.concatenate(a), jnp.concatenate(b))
    )


def _entry_snr(v: Array, eps: float) -> Array:
    """`|mean| / (std + eps)` of each column, divided through by its max-abs first
    so that the squares of the standard deviation neither overflow nor underflow."""
    scale = jnp.max(jnp.abs(v), axis=0)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    unit = v / scale
    return jnp.abs(unit.mean(0)) / (unit.std(0) + eps / scale)


def compute_grad_snr(per_example_grads: PyTree, *, eps: float = 1e-8) -> LayerwiseScore:
    r"""Signal-to-noise ratio of a gradient across examples (or repeated estimates).

    For every parameter entry $j$, $\mathrm{SNR}_j = |\bar g_j| / (s_j + \epsilon)$
    with the mean $\bar g_j$ and the standard deviation $s_j$ (`ddof=0`) over the
    leading axis; the result averages $\mathrm{SNR}_j$ over each layer's entries and
    over all entries.

    **Arguments:**

    - `per_example_grads`: model-shaped gradients whose array leaves have a leading
        axis of samples, e.g. from [`jpc.compute_per_example_grads`][] or a stack
        of gradient estimates on different batches.
    - `eps`: added to the standard deviation.

    **Returns:**

    A dict with `per_layer` (`nan` for a layer without arrays) and `overall`.
    """
    vectors = _layer_vectors(per_example_grads, "per_example_grads", with_axis=True)
    ratios = [None if v is None else _entry_snr(v, eps) for v in vectors]
    per_layer = [jnp.nan if r is None else jnp.mean(r) for r in ratios]
    present = [r for r in ratios if r is not None]
    return LayerwiseScore(
        per_layer=jnp.stack([jnp.asarray(p, float) for p in per_layer]),
        overall=jnp.mean(jnp.concatenate(present)),
    )


def compute_layer_grad_variance_ratios(
    grads: PyTree, *, reference: int = -1
) -> VarianceRatios:
    r"""Variance of each layer's weight gradient, relative to one reference layer.

    Diagnoses how unevenly a learning rule spreads its updates over depth (e.g. PC
    with few inference steps, whose early layers receive little error): for layer
    $l$, $v_l = \mathrm{Var}_j\,[\partial W_l]_j$ over the entries of its `weight`
    gradients, and the ratio $v_l / v_{\text{reference}}$.

    **Arguments:**

    - `grads`: model-shaped gradients.
    - `reference`: index of the layer to divide by (default: the output layer).

    **Returns:**

    A dict with `variances` and `ratios`, one value per layer (`nan` for a layer
    without weights).

    **Raises:**

    `ValueError` if `reference` is not a layer index.
    """
    check_layers("grads", grads)
    if not -len(grads) <= reference < len(grads):
        raise ValueError(
            f"`reference` must index one of the {len(grads)} layers, got {reference}."
        )
    units, scales = [], []
    for layer in grads:
        weights = [jnp.ravel(w) for w in weight_matrices(layer)]
        unit, scale = unit_scaled(jnp.concatenate(weights)) if weights else (None, 1.0)
        units.append(jnp.nan if unit is None else jnp.var(unit))
        scales.append(scale)
    # Variances of the max-abs-scaled weights, so that the ratios are exact
    # whatever the gradients' magnitude (their squares may not fit the dtype).
    units = jnp.stack([jnp.asarray(v, float) for v in units])
    scales = jnp.stack([jnp.asarray(v, units.dtype) for v in scales])
    rel = scales / scales[reference]
    return VarianceRatios(
        variances=units * scales**2, ratios=units / units[reference] * rel * rel
    )


@filter_jit
def compute_per_example_grads(
    model: Model,
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    loss_id: LossId = "mse",
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
) -> PyTree:
    """Backprop gradient of each example's output loss (for [`jpc.compute_grad_snr`][]).

    **Arguments:**

    - `model`, `skip_model`, `param_type`: the network (as for
        [`jpc.make_bp_step`][]).
    - `x`, `y`: input and target batches.
    - `loss_id`: `"mse"` or `"ce"`.

    **Returns:**

    Gradients shaped like `model` whose array leaves have a leading batch axis;
    their mean over that axis is the batch-mean backprop gradient.
    """
    check_rule_inputs(model, skip_model, x, y, loss_id)
    scalings = scalings_for(model, x, skip_model, param_type)

    def one(x_i, y_i):
        return eqx.filter_grad(output_loss)(
            model, skip_model, scalings, x_i[None], y_i[None], loss_id
        )

    return jax.vmap(one)(x, y)


def _inferred_state(params, x, y, energy_kwargs, inference):
    """Feedforward activities and the state inferred from them, as in
    [`jpc.make_pc_step`][]: `inference` is `(ode, discrete, stop)`."""
    model, skip_model = params
    kw = energy_kwargs
    start, _ = initial_activities(
        model, skip_model, y, x, kw["param_type"], kw["gamma"], (None,) * 4
    )
    ode, discrete, stop = inference
    final = infer(params, start, y, x, ode, discrete, False, kw, stop)[1]
    return start, final


def _pc_grads(model, x, y, loss_id, skip_model, param_type, inference, lam, kappa):
    """PC weight gradients at the feedforward state and after inference."""
    params = (model, skip_model)
    energy_kwargs = make_energy_kwargs(
        loss_id, param_type, output_energy_scaling=lam, hidden_energy_scaling=kappa
    )
    states = _inferred_state(params, x, y, energy_kwargs, inference)
    at = [
        compute_pc_param_grads(params, acts, y, x=x, **energy_kwargs)[0]
        for acts in states
    ]
    return at[0], at[1]


@traced_floats("sigma", "output_energy_scaling", "hidden_energy_scaling", *STOP_FLOATS)
def compare_to_backprop(
    model: Model,
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    key: Array,
    loss_id: LossId = "mse",
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    feedback: list | None = None,
    sigma: Scalar = 1e-3,
    n_samples: int = 100,
    output_energy_scaling: Scalar | None = None,
    activity_optim: optax.GradientTransformation | None = None,
    n_inference_steps: int | None = None,
    ode_solver: dfx.AbstractSolver = dfx.Heun(),
    max_t1: float = 20,
    dt: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController = dfx.PIDController(
        rtol=1e-3, atol=1e-3
    ),
    max_steps: int | None = None,
    steady_state_rtol: Scalar | None = DEFAULT_STEADY_STATE_RTOL,
    steady_state_atol: Scalar | None = DEFAULT_STEADY_STATE_ATOL,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> BackpropComparison:
    r"""Cosine similarity to the backprop gradient of PC, FA, KP, WP and NP updates.

    All on the same batch and the same model, against `jax.grad` of the batch-mean
    output loss:

    - `pc_equilibrium`: PC weight gradients after inference from the feedforward
        state (as in [`jpc.make_pc_step`][]: an ODE solve, or `n_inference_steps`
        steps of `activity_optim`);
    - `pc_feedforward`: PC weight gradients at the feedforward state (only the
        output layer is non-zero there, and equals backprop's);
    - `fa`, `kp`: [`jpc.compute_fa_param_grads`][] and the forward part of
        [`jpc.compute_kp_updates`][] with `feedback` (no weight decay; on a single
        batch the two coincide, KP differs by training its feedback);
    - `wp`, `np`: [`jpc.compute_wp_param_grads`][] and
        [`jpc.compute_np_param_grads`][] with `sigma` and `n_samples`.

    !!! note
        The energy is a batch mean, so inference moves each example at a rate
        $1/B$: reaching equilibrium takes `max_t1` (or activity learning rates)
        proportional to the batch size.

    **Arguments:**

    - `model`, `skip_model`, `param_type`: a list-of-layers MLP whose layers each
        contain one `eqx.nn.Linear`.
    - `x`, `y`: input and target batches; `loss_id`: `"mse"` or `"ce"`.
    - `key`: PRNG key for the feedback matrices (when `feedback` is `None`) and
        the perturbations.
    - `feedback`: feedback matrices for FA/KP; default
        [`jpc.init_feedback_weights`][].
    - `sigma`, `n_samples`: perturbation options.
    - `output_energy_scaling`, `hidden_energy_scaling`: output and hidden
        precisions of the PC energy (see [`jpc.pc_energy_fn`][]).
    - `activity_optim`, `n_inference_steps`, `ode_solver`, `max_t1`, `dt`,
        `stepsize_controller`, `max_steps`, `steady_state_rtol`,
        `steady_state_atol`: PC inference options (as for [`jpc.make_pc_step`][]).

    **Returns:**

    A dict of [`jpc.compute_grad_cosine_similarity`][] results keyed
    `pc_equilibrium, pc_feedforward, fa, kp, wp, np`.
    """
    check_rule_inputs(model, skip_model, x, y, loss_id)
    check_inference_options(activity_optim, n_inference_steps)
    fb_key, wp_key, np_key = jr.split(key, 3)
    feedback = init_feedback_weights(fb_key, model) if feedback is None else feedback
    rule = dict(loss_id=loss_id, skip_model=skip_model, param_type=param_type)
    noise = dict(sigma=sigma, n_samples=n_samples, **rule)
    ode = (ode_solver, max_t1, dt, stepsize_controller, None)
    discrete = None if activity_optim is None else (activity_optim, n_inference_steps)
    stop = stop_options(
        "compare_to_backprop", max_steps, steady_state_rtol, steady_state_atol
    )
    pc_ffwd, pc_eq = _pc_grads(
        model,
        x,
        y,
        loss_id,
        skip_model,
        param_type,
        (ode, discrete, stop),
        output_energy_scaling,
        hidden_energy_scaling,
    )
    updates = dict(
        pc_equilibrium=pc_eq,
        pc_feedforward=pc_ffwd,
        fa=compute_fa_param_grads(model, feedback, x, y, **rule),
        kp=compute_kp_updates(model, feedback, x, y, **rule)[0],
        wp=compute_wp_param_grads(wp_key, model, x, y, **noise),
        np=compute_np_param_grads(np_key, model, x, y, **noise),
    )
    reference = backprop_grads(model, x, y, **rule)
    return BackpropComparison(
        **{k: compute_grad_cosine_similarity(g, reference) for k, g in updates.items()}
    )


@traced_floats(*ENERGY_FLOATS, "activity_lr", *STOP_FLOATS)
def compute_layer_learning(
    model: Model,
    x: Float[Array, "batch ..."],
    y: Float[Array, "batch ..."],
    *,
    skip_model: SkipModel = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
    activity_optim: optax.GradientTransformation | None = None,
    n_inference_steps: int | None = None,
    activity_lr: Scalar | None = None,
    ode_solver: dfx.AbstractSolver = dfx.Heun(),
    max_t1: float = 20,
    dt: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController = dfx.PIDController(
        rtol=1e-3, atol=1e-3
    ),
    max_steps: int | None = None,
    steady_state_rtol: Scalar | None = DEFAULT_STEADY_STATE_RTOL,
    steady_state_atol: Scalar | None = DEFAULT_STEADY_STATE_ATOL,
) -> LayerLearning:
    r"""Is every layer learning? The PC update of each layer against backprop's.

    On one batch: inference from the feedforward state exactly as in
    [`jpc.make_pc_step`][] (an ODE solve, or `n_inference_steps` steps of
    `activity_optim`), the PC parameter gradient $g^{\text{PC}}$ at the inferred
    state ([`jpc.compute_pc_param_grads`][], less the gradient of the weight
    regularisers `weight_decay` and `spectral_penalty`, which backprop's lacks) and
    the backprop gradient $g^{\text{BP}}$ of the same output loss ([`jpc.mse_loss`][] or
    [`jpc.cross_entropy_loss`][]) on the same batch. For every layer holding
    parameters (its weights and biases together):

    - `ratio` $=\lVert g^{\text{PC}}_l\rVert/\lVert g^{\text{BP}}_l\rVert$, raw. At
        the feedforward state the output layer's ratio is exactly $\lambda$
        (`output_energy_scaling`, default 1) and every other layer's is 0; at
        equilibrium and in the weak-clamping limit $\lambda\to 0$,
        $g^{\text{PC}}/\lambda \to g^{\text{BP}}$ (Whittington & Bogacz, 2017;
        Millidge et al., 2022), so every ratio tends to $\lambda$. A ratio many
        orders of magnitude below the output layer's marks a layer that inference
        has not reached.
    - `cosine` between $g^{\text{PC}}_l$ and $g^{\text{BP}}_l$ (`nan` if either is
        zero).
    - `status`: `0` (exactly zero), `1` (at or below round-off) or `2` (live); see
        `round_off`.
    - `round_off`: the round-off floor
        $\tau_l = \epsilon\,\lVert\nabla_{\theta_l}\tfrac1B\sum_i w_l
        \langle|\mu_{l,i}|,\mu_{l,i}(\theta_l)\rangle\rVert$, with $\epsilon$ the
        machine epsilon of the gradient's dtype, $\mu_l$ the layer's prediction
        (scaling and skip included) at the inferred state, and $w_l$ the layer's
        precision ($\lambda$ for the output layer, $\kappa_l$ =
        `hidden_energy_scaling` for the others, default 1). The PC gradient is
        $-\tfrac{w_l}{B}\sum_i J_{l,i}^\top e_{l,i}$ with the error
        $e_l = z_l - \mu_l$; when $z_l$ equals $\mu_l$ up to rounding, each computed
        error entry is at most about $\epsilon|\mu_l|$, so the gradient is at most
        about $\tau_l$ (all signs aligned). A gradient at or below $\tau_l$ cannot
        be told apart from round-off (e.g. a recomputed prediction that differs in
        its last bits from the feedforward pass); an adaptive optimiser such as
        Adam would nevertheless turn it into a full-size step.

    Norms and cosines are computed after dividing by the largest entry, so they
    neither overflow nor underflow. If, below the output layer, a layer's gradient
    is zero, below round-off, or its ratio is below $10^{-6}$ times the output
    layer's, a warning (once per process) names the likely fixes.
    [`jpc.format_layer_learning`][] prints the result as a table.

    **Arguments:**

    - `model`, `skip_model`, `param_type`: the network, as for
        [`jpc.make_pc_step`][].
    - `x`, `y`: input and target batches, `(batch, ...)`.
    - `loss_id`, `weight_decay`, `spectral_penalty`, `activity_decay`, `gamma`,
        `output_energy_scaling`, `hidden_energy_scaling`: energy options (see
        [`jpc.pc_energy_fn`][]); traced.
    - `activity_optim`, `n_inference_steps`, `activity_lr`, `ode_solver`, `max_t1`,
        `dt`, `stepsize_controller`, `max_steps`, `steady_state_rtol`,
        `steady_state_atol`: inference options, as for [`jpc.make_pc_step`][].

    **Returns:**

    A [`jpc.LayerLearning`][] dict of arrays with one entry per layer holding
    parameters, in layer order: `layer` (its index in `model`), `pc_norm`,
    `bp_norm`, `ratio`, `cosine`, `round_off`, `status`.

    **Raises:**

    `ValueError` if `x` is `None` (backprop needs an input), and for bad options
    or inputs as [`jpc.make_pc_step`][].
    """
    check_supervised(x, "compute_layer_learning", "x")
    check_rule_inputs(model, skip_model, x, y, loss_id)
    check_inference_options(activity_optim, n_inference_steps)
    activity_optim = with_activity_lr(activity_optim, activity_lr)
    params = (model, skip_model)
    check_hidden_scaling(hidden_energy_scaling, model)
    kw = make_energy_kwargs(
        loss_id,
        param_type,
        weight_decay,
        spectral_penalty,
        activity_decay,
        gamma,
        output_energy_scaling,
        hidden_energy_scaling,
    )
    ode = (ode_solver, max_t1, dt, stepsize_controller, None)
    discrete = None if activity_optim is None else (activity_optim, n_inference_steps)
    stop = stop_options(
        "compute_layer_learning", max_steps, steady_state_rtol, steady_state_atol
    )
    _, final = _inferred_state(params, x, y, kw, (ode, discrete, stop))
    pc_grads = compute_pc_param_grads(params, final, y, x=x, **kw)[0]
    return layer_learning_metric(
        params, pc_grads, final, y, x, kw, "compute_layer_learning"
    )
