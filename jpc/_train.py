"""High-level, jit-compiled training steps: `make_pc_step` and `make_bp_step`."""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
import optax

from . import _packed
from ._checks import (
    LOSSES,
    check_batch,
    check_model,
    check_opt_state,
    check_option,
    check_random_init,
    traced_floats,
)
from ._energies import (
    check_energy_inputs,
    energy_options,
    energy_vector,
    layer_energies,
    make_energy_kwargs,
    record_order,
)
from ._eval import infer_energies
from ._grads import unpack_vector_field_args, vector_field_args
from ._infer import (
    DEFAULT_STEADY_STATE_ATOL,
    DEFAULT_STEADY_STATE_RTOL,
    STOP_FLOATS,
    _saveat,
    check_finite_inputs,
    like_data,
    solve,
    stop_options,
)
from ._init import init_activities_from_normal
from ._jit import deferred_checks, error_if, lean_jit
from ._layer_learning import LayerLearning, layer_learning_metric
from ._layers import check_output, feedforward, get_param_scalings
from ._types import Array, Float, LossId, Model, ParamType, Scalar, SkipModel
from ._updates import (
    ENERGY_FLOATS,
    NAMES,
    discrete_inference,
    optax_update,
    param_step,
)
from ._utils import (
    LOSS_FNS,
    compute_accuracy,
    compute_activity_norms,
    get_t_max,
    leaf_norms,
)
from ._variants._nudging import NUDGINGS, check_beta, nudged_param_step


class _PCStepResult(TypedDict):
    """The keys every [`jpc.make_pc_step`][] result has."""

    model: Any
    skip_model: Any
    opt_state: optax.OptState
    loss: Array | None
    acc: Array | None
    activities: list[Array]
    t_max: Array
    steady_state_reached: Array | None
    energies: Array
    activity_norms: Array | None
    model_param_norms: Array | None
    skip_model_param_norms: Array | None
    model_grad_norms: Array | None
    skip_model_grad_norms: Array | None


class PCStepResult(_PCStepResult, total=False):
    """Result of [`jpc.make_pc_step`][]; metrics that were not requested are `None`.

    `layer_learning` is present only when requested.
    """

    layer_learning: LayerLearning


class BPStepResult(TypedDict):
    """Result of [`jpc.make_bp_step`][]."""

    model: Any
    skip_model: Any
    opt_state: optax.OptState
    loss: Array


def check_inference_options(activity_optim, n_inference_steps) -> None:
    """`activity_optim` and `n_inference_steps` come together or not at all."""
    if (activity_optim is None) != (n_inference_steps is None):
        raise ValueError(
            "`activity_optim` and `n_inference_steps` must be given together for "
            f"discrete inference, got activity_optim={activity_optim!r} and "
            f"n_inference_steps={n_inference_steps!r}."
        )
    if n_inference_steps is not None and (
        isinstance(n_inference_steps, bool)
        or not isinstance(n_inference_steps, int)
        or n_inference_steps < 1
    ):
        raise ValueError(
            "`n_inference_steps` must be a positive integer, got "
            f"{n_inference_steps!r}."
        )


def with_activity_lr(activity_optim, activity_lr):
    """`activity_optim` whose updates are multiplied by `activity_lr` (traced).

    `None` leaves `activity_optim` unchanged. Built with learning rate 1 and given
    the rate as `activity_lr`, the optimiser is the same object for every rate, so
    a sweep over rates compiles once.
    """
    if activity_lr is None:
        return activity_optim
    if activity_optim is None:
        raise ValueError(
            "`activity_lr` multiplies the updates of `activity_optim` (discrete "
            "inference), but `activity_optim=None`: pass e.g. "
            "`activity_optim=optax.sgd(1.0)` and `n_inference_steps`, got "
            f"activity_lr={activity_lr!r}."
        )
    return optax.chain(activity_optim, optax.scale(activity_lr))


def initial_activities(model, skip_model, output, input, param_type, gamma, random):
    """Feedforward activities (supervised) or random normal ones (unsupervised).

    `random` is `(key, layer_sizes, batch_size, sigma)`. Returns the activities and
    the feedforward prediction (`None` when unsupervised).
    """
    if input is not None:
        scalings = get_param_scalings(
            model, input, skip_model=skip_model, param_type=param_type, gamma=gamma
        )
        activities = feedforward(model, input, skip_model, scalings)
        return activities, activities[-1]
    key, layer_sizes, batch_size, sigma = random
    check_random_init(model, output, layer_sizes, batch_size)
    missing = [
        n for n, v in zip(("key", "layer_sizes", "batch_size"), random) if v is None
    ]
    if missing:
        raise ValueError(
            "Unsupervised mode (`input=None`) draws random activities and needs "
            f"`key`, `layer_sizes` and `batch_size`; missing: {', '.join(missing)}."
        )
    activities = init_activities_from_normal(
        key, layer_sizes, "unsupervised", batch_size, sigma
    )
    return like_data(activities, output), None


def infer(
    params,
    activities,
    output,
    input,
    ode,
    discrete,
    record,
    energy_kwargs,
    stop=None,
):
    """Inference on either path; returns `(trajectory, final, t_max, reached)`.

    `ode` is `(solver, max_t1, dt, controller, record_every)`; `discrete` is
    `(optim, n_steps)` or `None`; `stop` holds keyword options of `solve` (the
    steady-state tolerances, `max_steps` and the caller's name). The trajectory has
    a leading time axis; `reached` is whether the steady-state stop fired (a
    boolean scalar on the ODE path, `None` on the discrete path).
    """
    if discrete is not None:
        optim, n_steps = discrete
        final, trajectory = discrete_inference(
            params, activities, optim, n_steps, output, input, record, **energy_kwargs
        )
        if not record:
            return [z[None] for z in final], final, None, None
        return trajectory, final, jnp.asarray(n_steps - 1), None
    solver, max_t1, dt, controller, record_every = ode
    args = vector_field_args(params, output, input, **energy_kwargs)
    trajectory, info = solve(
        args,
        activities,
        solver,
        max_t1,
        dt,
        controller,
        record_iters=record and record_every is None,
        record_every=record_every if record else None,
        return_info=True,
        **(stop or {}),
    )
    reached = info.steady_state_reached
    if not record:
        return trajectory, [z[-1] for z in trajectory], None, reached
    # Recorded rows are followed by `inf` padding; the final state is the last row.
    t_max = get_t_max(trajectory)
    return trajectory, [z[t_max] for z in trajectory], t_max, reached


def _energies_at(t, y, args) -> Array:
    """Per-layer energies `[E_1, ..., E_L]` of the state `y` (a `SaveAt` `fn`)."""
    kw = unpack_vector_field_args(args)
    return jnp.stack(
        layer_energies(kw["params"], y, kw["y"], kw["x"], *energy_options(kw))
    )


def _recorded_energies(rows: Array, t_max) -> Array:
    """`(T, L)` energies saved by the solve → `(L, T)`, `0.` after `t_max`."""
    steps = jnp.arange(rows.shape[0])
    return jnp.where(steps[None, :] <= t_max, rows.T, 0.0)


def infer_recorded(
    params,
    activities,
    output,
    input,
    ode,
    discrete,
    record_activities: bool,
    record_energies: bool,
    energy_kwargs,
    stop=None,
):
    """[`infer`][] that also records the per-layer energies along the way.

    Returns `((trajectory, energies), final, t_max, steady_state_reached)`;
    `energies` is `(L, T)` in layer order (`0.` after `t_max`) or `None`, and
    `steady_state_reached` is `None` on the discrete path. On the ODE path the
    energies of each saved state are computed inside the solve (a `SaveAt` `fn`),
    so recording them stores no states: without `record_activities`, `trajectory`
    is the final state only (leading axis of length 1) and the step budget is that
    of an unrecorded solve.
    """
    if not record_energies or discrete is not None:
        record = record_activities or record_energies
        trajectory, final, t_max, reached = infer(
            params,
            activities,
            output,
            input,
            ode,
            discrete,
            record,
            energy_kwargs,
            stop,
        )
        energies = None
        if record_energies:
            energies = infer_energies(
                params, trajectory, t_max, output, input, *energy_options(energy_kwargs)
            )
        return (trajectory, energies), final, t_max, reached
    solver, max_t1, dt, controller, record_every = ode
    args = vector_field_args(params, output, input, **energy_kwargs)
    times = _saveat(max_t1, record_every is None, record_every).subs
    states = times if record_activities else dfx.SubSaveAt(t1=True)
    saved, info = solve(
        args,
        activities,
        solver,
        max_t1,
        dt,
        controller,
        record_iters=record_activities and record_every is None,
        saveat=dfx.SaveAt(subs=[states, dataclasses.replace(times, fn=_energies_at)]),
        return_info=True,
        **(stop or {}),
    )
    trajectory, energy_rows = saved
    t_max = get_t_max([energy_rows])
    if record_activities:
        final = [z[t_max] for z in trajectory]
    else:
        final = [z[-1] for z in trajectory]
    energies = _recorded_energies(energy_rows, t_max)
    return (trajectory, energies), final, t_max, info.steady_state_reached


def _final_energies(params, final, output, input, energy_kwargs) -> Array:
    """Per-layer energies at the inferred state, `record_layers` order."""
    energies = layer_energies(
        params, final, output, input, *energy_options(energy_kwargs)
    )
    return energy_vector(record_order(energies))


def _norms(requested: bool, tree, like=None) -> Array | None:
    return leaf_norms(tree, like) if requested and tree is not None else None


@traced_floats(*ENERGY_FLOATS, "sigma", "beta", "activity_lr", *STOP_FLOATS)
@deferred_checks  # a failed check is raised at the next call by default
def make_pc_step(
    model: Model,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    ode_solver: dfx.AbstractSolver = dfx.Heun(),
    max_t1: float = 20,
    dt: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController = dfx.PIDController(
        rtol=1e-3, atol=1e-3
    ),
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
    record_every: float | None = None,
    activity_norms: bool = False,
    param_norms: bool = False,
    grad_norms: bool = False,
    calculate_accuracy: bool = False,
    layer_learning: bool = False,
    activity_optim: optax.GradientTransformation | None = None,
    n_inference_steps: int | None = None,
    activity_lr: Scalar | None = None,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
    nudging: Literal["positive", "negative", "centred"] | None = None,
    beta: Scalar = 0.1,
    max_steps: int | None = None,
    steady_state_rtol: Scalar | None = DEFAULT_STEADY_STATE_RTOL,
    steady_state_atol: Scalar | None = DEFAULT_STEADY_STATE_ATOL,
) -> PCStepResult:
    """One predictive-coding training step: inference, then a parameter update.

    Flow: initialise the activities (feedforward from `input`, or random normal
    with `key`, `layer_sizes`, `batch_size`, `sigma` when `input=None`) → loss of
    the feedforward prediction → inference (an ODE solve by default; with
    `activity_optim` and `n_inference_steps`, that many optax steps fused into the
    same compiled program) → parameter gradients at the final inferred state → one
    `optim` update of `(model, skip_model)`.

    **Arguments:**

    - `model`, `skip_model`: the network (see [`jpc.make_mlp`][],
        [`jpc.make_skip_model`][]).
    - `optim`, `opt_state`: parameter optimiser and its state, made with
        `optim.init((eqx.filter(model, eqx.is_array), skip_model))`.
    - `output`, `input`: targets `y` and optional input `x`.
    - `loss_id`, `param_type`, `weight_decay`, `spectral_penalty`,
        `activity_decay`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: energy options (see [`jpc.pc_energy_fn`][]).
        Floats, and lists of floats, are traced: new values do not recompile.
    - `ode_solver`, `max_t1`, `dt`, `stepsize_controller`, `record_every`: ODE
        inference options (see [`jpc.solve_inference`][]).
    - `max_steps`, `steady_state_rtol`, `steady_state_atol`: solver step budget
        and the steady-state stop's tolerances (see [`jpc.solve_inference`][]).
    - `activity_optim`, `n_inference_steps`: discrete inference instead.
    - `activity_lr`: optional multiplier of `activity_optim`'s updates, traced: build
        the optimiser once with learning rate 1 (e.g. `optax.sgd(1.0)`) and pass the
        rate here, so that a sweep over rates compiles once and can be vmapped over
        (see the advanced usage page). `None` (default) leaves the updates as they
        are.
    - `nudging`, `beta`: weight the output energy by ±β instead of 1 and scale the
        parameter gradient g at the inferred state back: `"positive"` g(β)/β,
        `"negative"` g(−β)/(−β), `"centred"` (g(β) − g(−β))/(2β) (two inference
        phases, equilibrium propagation); see the nudging page. `beta` is traced.
    - `record_activities`, `record_energies`: return the inference trajectory and
        the per-layer energies along it.
    - `activity_norms`, `param_norms`, `grad_norms`, `calculate_accuracy`:
        optional metrics.
    - `layer_learning`: also return the per-layer learning diagnostics of
        [`jpc.compute_layer_learning`][] for this step's update (one extra
        forward and backward pass, in the same compiled program; supervised
        only), and warn once if the lower layers' updates are inert.

    **Returns:**

    A dict with keys `model, skip_model, opt_state, loss, acc, activities, t_max,
    steady_state_reached, energies, activity_norms, model_param_norms,
    skip_model_param_norms, model_grad_norms, skip_model_grad_norms`; unrequested
    metrics are `None`. With
    `layer_learning=True`, also `layer_learning`.

    - `loss`: loss of the feedforward prediction before the update (`None` when
        unsupervised); `acc`: accuracy (%) of the **updated** model's feedforward
        prediction on the batch.
    - `activities`: leading time axis; the final state only (length 1) unless
        `record_activities`, then one row per accepted solver step (or per
        `record_every` time, or per discrete step).
    - `t_max`: the row of the final state when recording, else `0`.
    - `steady_state_reached`: on the ODE path, a boolean scalar saying whether the
        steady-state stop fired before `max_t1` (with `nudging`, in every phase);
        `None` with discrete inference, which always runs `n_inference_steps`.
    - `energies`: with `record_energies`, an `(L, T)` array of per-layer energies
        along the inference (layer order, `0.` after `t_max`, as
        [`jpc.compute_infer_energies`][]), computed inside the ODE solve without
        storing the states; otherwise the per-layer energies at the inferred state
        in `record_layers` order (see [`jpc.pc_energy_fn`][]).
    - `activity_norms`: [`jpc.compute_activity_norms`][] of the inferred state.
    - `model_param_norms`, `skip_model_param_norms`: norms of the parameters used
        for inference (before the update), one per leaf as
        [`jpc.compute_param_norms`][]; `model_grad_norms`, `skip_model_grad_norms`:
        the same for the gradients (`0.` where a leaf is not an array).
    - `layer_learning`: a [`jpc.compute_layer_learning`][] result for the
        gradients of this update, against backprop on the same batch.

    **Raises:**

    `ValueError` for bad options or inputs; `eqx.EquinoxRuntimeError` if the
    energy at the inferred state is not finite, and, on the ODE path, the runtime
    errors of [`jpc.solve_inference`][] (non-finite inputs or state, `max_steps`
    run out), naming this function: by default at the *next* call, so that calls
    never wait for their step to finish; see [`jpc.set_step_error_timing`][].
    """
    check_option("loss_id", loss_id, LOSSES)
    check_model(model, skip_model)
    check_opt_state(optim, opt_state, (model, skip_model))
    check_inference_options(activity_optim, n_inference_steps)
    if nudging is not None:
        check_option("nudging", nudging, NUDGINGS)
        check_beta(beta)
    params = (model, skip_model)
    energy_kwargs = make_energy_kwargs(
        loss_id,
        param_type,
        weight_decay,
        spectral_penalty,
        activity_decay,
        gamma,
        output_energy_scaling,
        hidden_energy_scaling,
    )
    pack = net = None  # discrete inference only: the ODE stop works per layer
    if activity_optim is not None and nudging is None:
        pack, net = _packed.packer(params, input, param_type, gamma)
    if net is not None:
        # Runs of identical layers held stacked for the whole step (`jpc._packed`).
        activities = _packed.feedforward(net, input)
        prediction = activities[-1]
        if not _packed.elementwise(activity_optim, net, activities):
            pack = net = None
    if net is None:
        activities, prediction = initial_activities(
            model,
            skip_model,
            output,
            input,
            param_type,
            gamma,
            (key, layer_sizes, batch_size, sigma),
        )
        check_energy_inputs(
            params, activities, output, input, loss_id, param_type, NAMES
        )
    else:  # the feedforward pass has checked the hidden layers' shapes
        placeholders = _packed.shapes(net, activities)
        check_energy_inputs(
            params, placeholders, output, input, loss_id, param_type, NAMES, prediction
        )
    activity_optim = with_activity_lr(activity_optim, activity_lr)
    ode = (ode_solver, max_t1, dt, stepsize_controller, record_every)
    discrete = None if activity_optim is None else (activity_optim, n_inference_steps)
    if discrete is not None:  # the ODE path checks them in `solve`
        activities = check_finite_inputs(
            activities, output, input, NAMES, "make_pc_step"
        )
    stop = stop_options("make_pc_step", max_steps, steady_state_rtol, steady_state_atol)
    recording = (record_activities, record_energies)
    if nudging is None:
        (trajectory, energies), final, t_max, reached = infer_recorded(
            params if net is None else (net, None),
            activities,
            output,
            input,
            ode,
            discrete,
            *recording,
            energy_kwargs,
            stop,
        )
        energy, new_model, new_skip, grads, opt_state = param_step(
            params, final, optim, opt_state, output, input, pack, **energy_kwargs
        )
    else:
        phases, *update = nudged_param_step(
            lambda kw: infer_recorded(
                params, activities, output, input, ode, discrete, *recording, kw, stop
            ),
            params,
            optim,
            opt_state,
            output,
            input,
            energy_kwargs,
            nudging,
            beta,
        )
        energy, new_model, new_skip, grads, opt_state = update
        ((trajectory, energies), final, t_max, _), output_energy_scaling = phases[0]
        reached = [inferred[-1] for inferred, _ in phases]
        reached = None if reached[0] is None else jnp.all(jnp.stack(reached))
    new_model = error_if(
        new_model,
        ~jnp.isfinite(energy),
        "make_pc_step: the energy at the inferred activities is not finite.",
    )
    supervised = prediction is not None
    if energies is None:
        final_kwargs = dict(energy_kwargs, output_energy_scaling=output_energy_scaling)
        energy_params = params if net is None else (net, None)
        energies = _final_energies(energy_params, final, output, input, final_kwargs)
    if net is not None:  # the user's lists of arrays, split once
        trajectory = _packed.unpack(net, trajectory, axis=1)
        final = _packed.unpack(net, final)
    if t_max is None:
        t_max = jnp.asarray(0)
    acc = None
    if supervised and calculate_accuracy:
        # The accuracy of the updated model, as in the JPC library.
        if net is None:
            updated = initial_activities(
                new_model, new_skip, output, input, param_type, gamma, None
            )[1]
        else:
            updated = _packed.feedforward(pack((new_model, new_skip)), input)[-1]
        acc = compute_accuracy(output, updated)
    result = PCStepResult(
        model=new_model,
        skip_model=new_skip,
        opt_state=opt_state,
        loss=LOSS_FNS[loss_id](prediction, output) if supervised else None,
        acc=acc,
        activities=trajectory,
        t_max=t_max,
        steady_state_reached=reached,
        energies=energies,
        activity_norms=compute_activity_norms(final) if activity_norms else None,
        model_param_norms=_norms(param_norms, model),
        skip_model_param_norms=_norms(param_norms, skip_model),
        model_grad_norms=_norms(grad_norms, grads[0], model),
        skip_model_grad_norms=_norms(grad_norms, grads[1], skip_model),
    )
    if layer_learning:
        result["layer_learning"] = layer_learning_metric(
            params, grads[0], final, output, input, energy_kwargs, "make_pc_step"
        )
    return result


def _check_bp_step(params, loss, output, input):
    """Runtime checks of `make_bp_step`, naming where a NaN or inf came from."""
    for value, name in ((output, "output"), (input, "input")):
        params = error_if(
            params,
            ~jnp.all(jnp.isfinite(value)),
            f"make_bp_step: `{name}` contains NaN or inf.",
        )
    return error_if(
        params,
        ~jnp.isfinite(loss),
        "make_bp_step: the loss is not finite (check the model's parameters and "
        "the learning rate).",
    )


@lean_jit  # `eqx.filter_jit` semantics, smaller per-call cost
@deferred_checks  # a failed check is raised at the next call by default
def make_bp_step(
    model: Model,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."],
    loss_id: LossId = "mse",
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
) -> BPStepResult:
    """One backprop step on the same list-of-layers model (the baseline).

    The forward pass uses the same scalings and skips as PC; the loss is
    [`jpc.mse_loss`][] or [`jpc.cross_entropy_loss`][] of its prediction.

    **Arguments:**

    - `model`, `skip_model`, `param_type`: the network.
    - `optim`, `opt_state`: optimiser and its state, made exactly as for
        [`jpc.make_pc_step`][].
    - `output`, `input`: targets and data.
    - `loss_id`: `"mse"` or `"ce"`.

    **Returns:**

    A dict with the updated `model`, `skip_model`, `opt_state` and the `loss`
    before the update.

    **Raises:**

    `ValueError` for bad options or inputs; `eqx.EquinoxRuntimeError` if `output`
    or `input` holds NaN or inf or the loss is not finite (the message says
    which): by default at the *next* call, as for [`jpc.make_pc_step`][] (see
    [`jpc.set_step_error_timing`][]).
    """
    check_option("loss_id", loss_id, LOSSES)
    check_model(model, skip_model)
    check_opt_state(optim, opt_state, (model, skip_model))
    check_batch(output, input, [], y_name="output", x_name="input")

    def loss_fn(params):
        m, s = params
        scalings = get_param_scalings(m, input, skip_model=s, param_type=param_type)
        prediction = feedforward(m, input, s, scalings)[-1]
        check_output(output, prediction, "output")
        return LOSS_FNS[loss_id](prediction, output)

    params = (model, skip_model)
    loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
    updated, opt_state = optax_update(params, grads, optim, opt_state, loss, loss_fn)
    model, skip_model = _check_bp_step(updated, loss, output, input)
    return BPStepResult(
        model=model, skip_model=skip_model, opt_state=opt_state, loss=loss
    )
