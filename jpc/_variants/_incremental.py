r"""Incremental predictive coding, iPC (Salvatori et al., ICLR 2024).

Activities and parameters descend the energy together: at every one of the `T`
inference steps both gradients are taken at the current state $(z_t, \theta_t)$
and both optimisers step,

$$z_{t+1} = z_t - \mathrm{opt}_z(\partial_z\mathcal{F}(z_t, \theta_t)), \qquad
\theta_{t+1} = \theta_t - \mathrm{opt}_\theta(\partial_\theta
\mathcal{F}(z_t, \theta_t)),$$

instead of one parameter update after `T` steps. All `T` steps run in one
`lax.scan` inside the compiled step.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from .._checks import (
    LOSSES,
    check_batch,
    check_model,
    check_opt_state,
    check_option,
    traced_floats,
)
from .._energies import energy_options, layer_energies, make_energy_kwargs
from .._jit import deferred_checks, error_if
from .._train import (
    PCStepResult,
    _norms,
    check_inference_options,
    initial_activities,
    with_activity_lr,
)
from .._types import Array, Float, LossId, Model, ParamType, Scalar, SkipModel
from .._updates import ENERGY_FLOATS, activity_step, param_step
from .._utils import LOSS_FNS, compute_accuracy, compute_activity_norms


def _layer_energies(params, activities, y, x, kw) -> Array:
    return jnp.stack(layer_energies(params, activities, y, x, *energy_options(kw)))


def incremental_inference(
    params, activities, optim, opt_state, activity_optim, n_steps, y, x, record, kw
):
    """`n_steps` simultaneous activity and parameter steps in one `lax.scan`.

    Returns `(params, activities, grads, opt_state, trajectory, energies)`; the last
    two have one row per step (the state after it) when `record`, else are `None`.
    """
    arrays, static = eqx.partition(tuple(params), eqx.is_array)
    zero_grads = jtu.tree_map(jnp.zeros_like, eqx.filter(arrays, eqx.is_inexact_array))

    def step(carry, _):
        arrays, z, state, activity_state, _ = carry
        p = eqx.combine(arrays, static)
        _, new_z, _, activity_state = activity_step(
            p, z, activity_optim, activity_state, y, x, **kw
        )
        _, model, skip, grads, state = param_step(p, z, optim, state, y, x, **kw)
        new_p = (model, skip)
        rows = (new_z, _layer_energies(new_p, new_z, y, x, kw)) if record else None
        new_arrays = eqx.filter(new_p, eqx.is_array)
        return (new_arrays, new_z, state, activity_state, grads), rows

    activities = list(activities)
    init = (arrays, activities, opt_state, activity_optim.init(activities), zero_grads)
    (arrays, final, opt_state, _, grads), rows = jax.lax.scan(
        step, init, length=n_steps
    )
    trajectory, energies = rows if record else (None, None)
    params = eqx.combine(arrays, static)
    return params, final, grads, opt_state, trajectory, energies


@traced_floats(*ENERGY_FLOATS, "sigma", "activity_lr")
@deferred_checks  # a failed check is raised at the next call by default
def make_ipc_step(
    model: Model,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    activity_optim: optax.GradientTransformation,
    n_inference_steps: int,
    activity_lr: Scalar | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    skip_model: SkipModel = None,
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    key: Array | None = None,
    layer_sizes=None,
    batch_size: int | None = None,
    sigma: Scalar = 0.05,
    record_activities: bool = False,
    record_energies: bool = False,
    activity_norms: bool = False,
    param_norms: bool = False,
    grad_norms: bool = False,
    calculate_accuracy: bool = False,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> PCStepResult:
    """One incremental PC step: `n_inference_steps` joint activity/parameter steps.

    Same conventions as [`jpc.make_pc_step`][] with discrete inference: the
    activities start from a feedforward pass (or, unsupervised, from
    $\\mathcal{N}(0, \\sigma^2)$ with `key`, `layer_sizes`, `batch_size`), and the
    activity optimiser state is initialised per call; but `optim` steps at every
    inference step, with both gradients taken at the same state.

    **Arguments:**

    - `model`, `skip_model`, `optim`, `opt_state`, `output`, `input`: as for
        [`jpc.make_pc_step`][] (`opt_state` made with
        `optim.init((eqx.filter(model, eqx.is_array), skip_model))`).
    - `activity_optim`, `n_inference_steps`: the activity optimiser and the number
        `T` of joint steps (both required).
    - `activity_lr`: optional traced multiplier of `activity_optim`'s updates, as
        for [`jpc.make_pc_step`][].
    - `loss_id`, `param_type`, `weight_decay`, `spectral_penalty`,
        `activity_decay`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: energy options (traced; see
        [`jpc.pc_energy_fn`][]).
    - `key`, `layer_sizes`, `batch_size`, `sigma`: unsupervised initialisation.
    - `record_activities`, `record_energies`: the activities after each step and
        the per-layer energies `(L, T)` at each step's new state (new parameters).
    - `activity_norms`, `param_norms`, `grad_norms`, `calculate_accuracy`: metrics
        (`grad_norms` are those of the last step's parameter gradient).

    **Returns:**

    A dict with the keys of [`jpc.make_pc_step`][]; `loss` and `acc` are those of
    the feedforward prediction before the step.

    **Raises:**

    `ValueError` for bad options or inputs; `eqx.EquinoxRuntimeError` if the
    parameter gradient of the last step is not finite (diverged inference).
    """
    check_option("loss_id", loss_id, LOSSES)
    check_model(model, skip_model)
    check_opt_state(optim, opt_state, (model, skip_model))
    if activity_optim is None or n_inference_steps is None:
        raise ValueError(
            "`make_ipc_step` needs `activity_optim` and `n_inference_steps`, got "
            f"activity_optim={activity_optim!r}, n_inference_steps="
            f"{n_inference_steps!r}."
        )
    check_inference_options(activity_optim, n_inference_steps)
    activity_optim = with_activity_lr(activity_optim, activity_lr)
    check_batch(output, input, [], y_name="output", x_name="input")
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
    activities, prediction = initial_activities(
        model,
        skip_model,
        output,
        input,
        param_type,
        gamma,
        (key, layer_sizes, batch_size, sigma),
    )
    record = record_activities or record_energies
    (new_model, new_skip), final, grads, opt_state, trajectory, energies = (
        incremental_inference(
            (model, skip_model),
            activities,
            optim,
            opt_state,
            activity_optim,
            n_inference_steps,
            output,
            input,
            record,
            kw,
        )
    )
    leaves = jtu.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
    new_model = error_if(
        new_model,
        ~finite,
        "make_ipc_step: the parameter gradient at the last inference step is not "
        "finite.",
    )
    supervised = prediction is not None
    return PCStepResult(
        model=new_model,
        skip_model=new_skip,
        opt_state=opt_state,
        loss=LOSS_FNS[loss_id](prediction, output) if supervised else None,
        acc=compute_accuracy(output, prediction)
        if supervised and calculate_accuracy
        else None,
        activities=trajectory if record else [z[None] for z in final],
        t_max=jnp.asarray(n_inference_steps - 1) if record else None,
        energies=energies.T if record_energies else None,
        activity_norms=compute_activity_norms(final) if activity_norms else None,
        model_param_norms=_norms(param_norms, new_model),
        skip_model_param_norms=_norms(param_norms, new_skip),
        model_grad_norms=_norms(grad_norms, grads[0], new_model),
        skip_model_grad_norms=_norms(grad_norms, grads[1], new_skip),
    )
