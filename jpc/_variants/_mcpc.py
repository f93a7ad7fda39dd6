r"""Monte Carlo predictive coding, MCPC (Oliviers, Bogacz & Meulemans, 2024).

Inference is overdamped Langevin dynamics on the free activities,

$$z \leftarrow z - \eta\,B\,\frac{\partial\mathcal{F}}{\partial z}
+ s\sqrt{2\eta}\,\xi, \qquad \xi \sim \mathcal{N}(0, I),$$

($B$ the batch size, which makes the step per example since $\mathcal{F}$ is a
batch mean; $s$ the `noise_scale`, 1 for exact Langevin dynamics), so that after a
burn-in each example's activities are (approximate) samples of the posterior
$p(z \mid x, y) \propto \exp(-B\,\mathcal{F})$ of the generative model that the
energy defines, instead of its mode. The parameters take one optimiser step with
the PC parameter gradient averaged over the sampled states.
"""

import functools
from collections.abc import Sequence
from typing import Any, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax

from .._checks import (
    LOSSES,
    check_batch,
    check_model,
    check_opt_state,
    check_option,
    traced_floats,
)
from .._energies import (
    check_energy_inputs,
    check_hidden_scaling,
    energy_options,
    hidden_precisions,
    layer_energies,
    make_energy_kwargs,
    record_order,
)
from .._grads import _param_value_and_grad, compute_pc_activity_grad
from .._jit import deferred_checks, error_if
from .._layers import get_param_scalings, predict, skip_at
from .._train import initial_activities
from .._types import Array, Float, LossId, Model, ParamType, Scalar, SkipModel
from .._updates import ENERGY_FLOATS, NAMES
from .._utils import LOSS_FNS
from ._common import optax_update


class MCPCStepResult(TypedDict):
    """Result of [`jpc.make_mcpc_step`][]."""

    model: Any
    skip_model: Any
    opt_state: optax.OptState
    loss: Array | None
    activities: list[Array]
    energies: Array


def _concrete(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array when it is known outside a trace, else `None`."""
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def check_langevin_options(kwargs: dict) -> None:
    """Trace-free checks of `key`, `activity_lr`, `noise_scale` and `n_burn_in`."""
    if kwargs.get("key") is None:
        raise ValueError(
            "`make_mcpc_step` draws the Langevin noise and needs a PRNG `key`, "
            "e.g. `key=jax.random.key(0)`, got key=None."
        )
    if kwargs.get("activity_lr") is None:
        raise ValueError(
            "`make_mcpc_step` needs the Langevin step size `activity_lr` (a "
            "positive float), got activity_lr=None."
        )
    lr, noise = _concrete(kwargs["activity_lr"]), _concrete(kwargs.get("noise_scale"))
    if lr is not None and not np.all(lr > 0):
        raise ValueError(
            f"`activity_lr` must be positive, got {kwargs['activity_lr']!r}."
        )
    if noise is not None and not np.all(noise >= 0):
        raise ValueError(
            f"`noise_scale` must be non-negative, got {kwargs['noise_scale']!r}."
        )
    n_steps, n_burn_in = kwargs.get("n_inference_steps"), kwargs.get("n_burn_in")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(
            "`make_mcpc_step` needs `n_inference_steps`, a positive integer, got "
            f"n_inference_steps={n_steps!r}."
        )
    if n_burn_in is not None and (
        isinstance(n_burn_in, bool)
        or not isinstance(n_burn_in, int)
        or not 0 <= n_burn_in < n_steps
    ):
        raise ValueError(
            "`n_burn_in` must be an integer in [0, n_inference_steps - 1] "
            f"(at least one sampled state), got n_burn_in={n_burn_in!r} with "
            f"n_inference_steps={n_steps!r}."
        )


def _with_langevin_checks(step):
    """Run `check_langevin_options` before `step` (and before any tracing)."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        check_langevin_options(kwargs)
        return step(*args, **kwargs)

    return wrapper


def langevin_move(params, activities, key, eta, noise_scale, y, x, kw) -> list:
    """One Langevin step on the free activities; the last (clamped) entry stays."""
    batch = y.shape[0]
    _, grads = compute_pc_activity_grad(params, activities, y, x=x, **kw)
    keys = jr.split(key, len(activities))
    scale = noise_scale * jnp.sqrt(2 * eta)
    moved = [
        z - eta * batch * g + scale * jr.normal(k, z.shape, z.dtype)
        for z, g, k in zip(activities[:-1], grads[:-1], keys)
    ]
    return [*moved, activities[-1]]


def _sampled_terms(params, activities, y, x, kw):
    """Parameter gradient and per-layer energies (`record_layers` order) at a state."""
    energy_kw = {k: v for k, v in kw.items() if k != "loss_id"}
    energy, grads = _param_value_and_grad(
        tuple(params), activities, y, x=x, loss=kw["loss_id"], **energy_kw
    )
    layers = layer_energies(params, activities, y, x, *energy_options(kw))
    return energy, grads, jnp.stack(record_order(layers))


def langevin_inference(params, activities, key, langevin, y, x, record, kw):
    """Burn-in, then sampling steps, each in a `lax.scan`.

    `langevin` is `(eta, noise_scale, n_steps, n_burn_in)`. Returns the final
    state, the parameter gradient and per-layer energies averaged over the
    `n_steps - n_burn_in` sampled states, the largest energy met (for the finite
    check) and the trajectory (one row per step) when `record`, else `None`.
    """
    eta, noise_scale, n_steps, n_burn_in = langevin
    keys = jr.split(key, n_steps)

    def burn(z, k):
        z = langevin_move(params, z, k, eta, noise_scale, y, x, kw)
        return z, (z if record else None)

    def sample(carry, k):
        z, grad_sum, energy_sum, worst = carry
        z = langevin_move(params, z, k, eta, noise_scale, y, x, kw)
        energy, grads, energies = _sampled_terms(params, z, y, x, kw)
        grad_sum = jtu.tree_map(jnp.add, grad_sum, grads)
        carry = (z, grad_sum, energy_sum + energies, jnp.maximum(worst, energy))
        return carry, (z if record else None)

    z, burnt = jax.lax.scan(burn, list(activities), keys[:n_burn_in])
    arrays = eqx.filter(tuple(params), eqx.is_inexact_array)
    zeros = jtu.tree_map(jnp.zeros_like, arrays)
    dtype = jnp.result_type(*z)
    init = (z, zeros, jnp.zeros(len(params[0]), dtype), jnp.asarray(-jnp.inf, dtype))
    (final, grad_sum, energy_sum, worst), sampled = jax.lax.scan(
        sample, init, keys[n_burn_in:]
    )
    n_samples = n_steps - n_burn_in
    grads = jtu.tree_map(lambda g: g / n_samples, grad_sum)
    trajectory = None
    if record:
        trajectory = [jnp.concatenate(rows) for rows in zip(burnt, sampled)]
    return final, grads, energy_sum / n_samples, worst, trajectory


@_with_langevin_checks
@traced_floats(*ENERGY_FLOATS, "sigma", "activity_lr", "noise_scale")
@deferred_checks  # a failed check is raised at the next call by default
def make_mcpc_step(
    model: Model,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    key: Array | None = None,
    n_inference_steps: int | None = None,
    activity_lr: Scalar | None = None,
    n_burn_in: int | None = None,
    noise_scale: Scalar = 1.0,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    skip_model: SkipModel = None,
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    layer_sizes=None,
    batch_size: int | None = None,
    sigma: Scalar = 0.05,
    record_activities: bool = False,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> MCPCStepResult:
    r"""One Monte Carlo PC training step (Oliviers, Bogacz & Meulemans, 2024).

    Flow, with the conventions of [`jpc.make_pc_step`][]: initialise the
    activities (feedforward from `input`, or random normal from `layer_sizes`,
    `batch_size`, `sigma` when `input=None`) → `n_inference_steps` steps of
    overdamped Langevin dynamics on the free activities,

    $$z \leftarrow z - \eta\,B\,\partial\mathcal{F}/\partial z
    + s\sqrt{2\eta}\,\xi, \qquad \xi \sim \mathcal{N}(0, I),$$

    ($\eta$ = `activity_lr`, $s$ = `noise_scale`, $B$ the batch size; the factor $B$
    undoes the batch mean of $\mathcal{F}$, so that each example's chain samples
    $p(z_i \mid x_i, y_i) \propto \exp(-\mathcal{F}_i)$ as $\eta \to 0$) → the
    parameter gradient $\partial\mathcal{F}/\partial\theta$ averaged over the
    states after steps `n_burn_in + 1, ..., n_inference_steps` → one `optim`
    update of `(model, skip_model)`. All steps run in one compiled program.

    With `noise_scale=0` the dynamics are gradient descent with step $\eta B$, and
    with `n_burn_in = n_inference_steps - 1` the step equals
    [`jpc.make_pc_step`][] with `activity_optim=optax.sgd(activity_lr * B)`.

    **Arguments:**

    - `model`, `skip_model`, `optim`, `opt_state`, `output`, `input`: as for
        [`jpc.make_pc_step`][].
    - `key`: PRNG key of the Langevin noise (required). Unsupervised, it is
        split into `(init_key, noise_key)` and `init_key` draws the initial
        activities.
    - `n_inference_steps`: number $T$ of Langevin steps (required).
    - `activity_lr`: step size $\eta > 0$ (required, traced).
    - `n_burn_in`: steps discarded before sampling, in `[0, T - 1]`; default
        `T // 2`.
    - `noise_scale`: $s \ge 0$ (default `1.0`, traced); `0` gives deterministic
        inference, other values sample $\exp(-B\mathcal{F}/s^2)$.
    - `loss_id`, `param_type`, `weight_decay`, `spectral_penalty`,
        `activity_decay`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: energy options (see [`jpc.pc_energy_fn`][];
        floats, and lists of floats, traced). The hidden precisions $\kappa_l$
        weight the hidden terms of $\mathcal{F}$, so the chains sample the
        generative model whose hidden layers have variance $1/\kappa_l$ (as
        [`jpc.sample_generative_pc`][] draws from).
    - `layer_sizes`, `batch_size`, `sigma`: unsupervised initialisation.
    - `record_activities`: return the whole chain.

    **Returns:**

    A dict with keys:

    - `model`, `skip_model`, `opt_state`: after the update.
    - `loss`: loss of the feedforward prediction before the update (`None` when
        unsupervised).
    - `activities`: the final state of the chains with a leading time axis of
        length 1, or, with `record_activities`, the state after every step
        (`T` rows).
    - `energies`: per-layer energies averaged over the sampled states, in the
        `record_layers` order of [`jpc.pc_energy_fn`][].

    **Raises:**

    `ValueError` if `key`, `n_inference_steps` or `activity_lr` is missing, if
    `activity_lr` is not positive, `noise_scale` is negative, `n_burn_in` is not in
    `[0, n_inference_steps - 1]`, or for the bad options and inputs of
    [`jpc.make_pc_step`][]; `eqx.EquinoxRuntimeError` if the energy at a sampled
    state is not finite (by default at the next call, see
    [`jpc.set_step_error_timing`][]).
    """
    check_option("loss_id", loss_id, LOSSES)
    check_model(model, skip_model)
    check_hidden_scaling(hidden_energy_scaling, model)
    check_opt_state(optim, opt_state, (model, skip_model))
    check_batch(output, input, [], y_name="output", x_name="input")
    if n_burn_in is None:
        n_burn_in = n_inference_steps // 2
    params = (model, skip_model)
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
    init_key, noise_key = jr.split(key) if input is None else (None, key)
    random = (init_key, layer_sizes, batch_size, sigma)
    activities, prediction = initial_activities(
        *params, output, input, param_type, gamma, random
    )
    check_energy_inputs(params, activities, output, input, loss_id, param_type, NAMES)
    langevin = (activity_lr, noise_scale, n_inference_steps, n_burn_in)
    final, grads, energies, worst, trajectory = langevin_inference(
        params, activities, noise_key, langevin, output, input, record_activities, kw
    )
    (new_model, new_skip), opt_state = optax_update(params, grads, optim, opt_state)
    new_model = error_if(
        new_model,
        ~jnp.isfinite(worst),
        "make_mcpc_step: the energy at a sampled state is not finite.",
    )
    return MCPCStepResult(
        model=new_model,
        skip_model=new_skip,
        opt_state=opt_state,
        loss=None if prediction is None else LOSS_FNS[loss_id](prediction, output),
        activities=trajectory if record_activities else [z[None] for z in final],
        energies=energies,
    )


@traced_floats("gamma", "output_energy_scaling", "hidden_energy_scaling")
def sample_generative_pc(
    key: Array,
    model: Model,
    x: Float[Array, "n_samples ..."],
    *,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    output_noise: bool = True,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> list[Float[Array, "n_samples ..."]]:
    r"""Ancestral samples of the generative model that the PC energy defines.

    The energy of [`jpc.pc_energy_fn`][] (loss `"mse"`) is, per example, the
    negative log-density, up to a constant, of the directed Gaussian model

    $$z_l \sim \mathcal{N}\big(a_l f_l(z_{l-1}) + s_l(z_{l-1}),\
    \kappa_l^{-1} I\big),\ l < L,
    \qquad y \sim \mathcal{N}\big(a_L f_L(z_{L-1}) + s_L(z_{L-1}),\
    \lambda^{-1} I\big),$$

    given $z_0$ = `x` ($\lambda$ = `output_energy_scaling`, $\kappa_l$ =
    `hidden_energy_scaling`, both 1 by default). This draws one
    sample of $p(z_1, \dots, z_{L-1}, y \mid z_0 = x)$ per row of `x`, layer after
    layer, as trained by [`jpc.make_mcpc_step`][] (Oliviers, Bogacz & Meulemans,
    2024) or [`jpc.make_pc_step`][].

    !!! note
        Supervised, `x` is the input (e.g. one-hot labels for a label → image
        model). Unsupervised, the energy puts no prior on the latent $z_0$, so
        draw `x` from the prior you choose (e.g. `jax.random.normal`).

    **Arguments:**

    - `key`: PRNG key.
    - `model`, `skip_model`, `param_type`, `gamma`: the network and its
        parameterisation, as for [`jpc.make_pc_step`][].
    - `x`: `(n_samples, ...)` values of the bottom layer $z_0$.
    - `output_energy_scaling`: output precision $\lambda$ (default 1, traced).
    - `hidden_energy_scaling`: hidden precisions $\kappa_l$ (`None`: 1; one
        number, or one per hidden layer), as for [`jpc.pc_energy_fn`][].
    - `output_noise`: if `False`, the last entry is the conditional mean
        $a_L f_L(z_{L-1}) + s_L(z_{L-1})$ of $y$ given the sampled $z_{L-1}$
        instead of a sample (for showing images, whose pixel noise hides them).

    **Returns:**

    The list `[z_1, ..., z_{L-1}, y]` of samples, each `(n_samples, ...)`.

    **Raises:**

    `ValueError` for a bad model or `param_type`, or an `x` that does not fit the
    first layer.
    """
    check_model(model, skip_model)
    check_batch(x, None, [], y_name="x")
    scalings = get_param_scalings(
        model, x, skip_model=skip_model, param_type=param_type, gamma=gamma
    )
    keys = jr.split(key, len(model))
    last = len(model) - 1
    check_hidden_scaling(hidden_energy_scaling, model)
    precisions = [
        *hidden_precisions(hidden_energy_scaling, last),
        output_energy_scaling,
    ]
    samples, z, name = [], x, "x"
    for i, (layer, k) in enumerate(zip(model, keys)):
        mean = predict(layer, skip_at(skip_model, i), scalings[i], z, name)
        std = 1.0 if precisions[i] is None else precisions[i] ** -0.5
        noisy = i < last or output_noise
        z = mean + std * jr.normal(k, mean.shape, mean.dtype) if noisy else mean
        samples.append(z)
        name = f"the output of model[{i}]"
    return samples
