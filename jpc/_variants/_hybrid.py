r"""Hybrid (amortised) predictive coding, hPC (Tschantz et al. 2023).

A *generator* is an ordinary top-down PC network from the prior $z_0$ (e.g. a
label) to the observation $z_L$ (e.g. an image). An *amortiser* is a bottom-up
feedforward network of the same depth from the observation to the prior: its layer
$k$ guesses the generator activity $z_{L-k}$. One training step:

1. the amortiser's feedforward guesses initialise the generator's activities
   ([`jpc.init_activities_with_amort`][]);
2. generator inference with the observation clamped at the top, and the prior
   clamped at the bottom when `input` (the label) is given, else left free;
3. the generator takes the PC gradient at the equilibrium $z^*$;
4. the amortiser regresses each guess onto the equilibrium,
   $\frac1B\sum_i\sum_l\lVert z^*_{l,i} - g_{L-l}(\hat z_{l+1,i})\rVert^2$, each
   layer fed its own feedforward input $\hat z_{l+1}$ ($\hat z_L$ = the
   observation), not the equilibrium; the top target is the label when given.

Layouts, as in the JPC library: amortised activities in generator order (prior
first), `[ẑ_0, ..., ẑ_{L-1}, prediction]`; the generator's inference runs on
`[z_1, ..., z_L]` when the label is given (supervised, `z_0` clamped to it) and
`[z_0, ..., z_L]` otherwise, exactly as for [`jpc.pc_energy_fn`][]; the amortiser
loss reads the generator's free activities in amortiser order, `[z_{L-1}, ...,
z_1]` (and `z_0` last when there is no label), or the generator's own list with
its trailing output slot, which it reorders.
"""

from collections.abc import Sequence
from typing import Any, TypedDict

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
import optax

from .._checks import (
    check_batch,
    check_model,
    check_opt_state,
    check_random_init,
    check_sequence,
    traced_floats,
)
from .._eval import generative_accuracy, generative_equilibrium, infer_energies
from .._infer import (
    DEFAULT_STEADY_STATE_ATOL,
    DEFAULT_STEADY_STATE_RTOL,
    STOP_FLOATS,
    stop_options,
)
from .._layers import feedforward, layer_predictions, predict
from .._train import check_inference_options, infer
from .._types import Activities, Array, Float, Model, PyTree, Scalar
from .._updates import param_step
from .._utils import compute_accuracy
from ._common import check_pair, optax_update


GENERATOR_ENERGY = dict(
    loss_id="mse",
    param_type="sp",
    weight_decay=0.0,
    spectral_penalty=0.0,
    activity_decay=0.0,
    gamma=None,
    output_energy_scaling=None,
)


class HPCStepResult(TypedDict):
    """Result of [`jpc.make_hpc_step`][]."""

    generator: Any
    amortiser: Any
    opt_states: tuple[optax.OptState, optax.OptState]
    activities: tuple[list[Array], list[Array]]
    t_max: Array | None
    steady_state_reached: Array | None
    losses: tuple[Float[Array, ""] | None, Float[Array, ""]]
    energies: tuple[Array | None, Array | None]


def _check_pair_of_models(amortiser, generator) -> None:
    check_model(amortiser)
    check_model(generator)
    if len(amortiser) != len(generator):
        raise ValueError(
            "`amortiser` must have one layer per layer of `generator` "
            f"({len(generator)}), got {len(amortiser)}."
        )


@traced_floats()
def init_activities_with_amort(
    amortiser: Model,
    generator: Model,
    input: Float[Array, "batch ..."],
) -> list[Float[Array, "batch ..."]]:
    """Initialise a generator's activities with an amortiser's feedforward guesses.

    **Arguments:**

    - `amortiser`: `L` layers from the observation up to the prior.
    - `generator`: `L` layers from the prior down to the observation.
    - `input`: the observation (the amortiser's input), `(batch, ...)`.

    **Returns:**

    `[ẑ_0, ẑ_1, ..., ẑ_{L-1}, ŷ]` in generator order: the amortiser's activities
    reversed (its last layer's output $\\hat z_0$ first), then the generator's own
    prediction $\\hat y = f_L(\\hat z_{L-1})$ of the observation as the last slot
    (never read by the energy). For supervised inference drop the first entry.

    **Raises:**

    `ValueError` if the two models differ in length or sizes do not fit.
    """
    _check_pair_of_models(amortiser, generator)
    check_batch(input, None, [], y_name="input")
    guesses = feedforward(amortiser, input)[::-1]
    prediction = predict(generator[-1], None, 1.0, guesses[-1], "the amortised z_{L-1}")
    return [*guesses, prediction]


def _amortise_observation(amortiser, generator, output) -> list:
    """`init_activities_with_amort` on `output`, naming `output` in its errors."""
    try:
        return init_activities_with_amort(amortiser, generator, output)
    except ValueError as err:
        raise ValueError(
            f"`output` (the observation, the amortiser's input): {err}"
        ) from err


def amortiser_order(activities) -> list:
    """Generator activities `[(z_0,) z_1, ..., z_L]` → free ones in amortiser order."""
    return list(activities[:-1])[::-1]


def _targets(equilib_activities, n_layers, y) -> list:
    """Targets of the amortiser's layers, in amortiser order (its layer 1 first).

    One entry more than the free activities is the generator's own list, as
    [`jpc.init_activities_with_ffwd`][] or [`jpc.solve_inference`][] give it
    (generator order, trailing output slot): it is put in amortiser order.
    """
    check_sequence("equilib_activities", equilib_activities)
    expected = n_layers - 1 if y is not None else n_layers
    if len(equilib_activities) == expected + 1:
        equilib_activities = amortiser_order(equilib_activities)
    if len(equilib_activities) != expected:
        if y is not None:
            layout = (
                "[z_{L-1}, ..., z_1] (amortiser order), or the generator's "
                f"[z_1, ..., z_L] ({expected + 1}, with the output slot), with `y`"
            )
        else:
            layout = (
                "[z_{L-1}, ..., z_1, z_0] (amortiser order), or the generator's "
                f"[z_0, ..., z_L] ({expected + 1}, with the output slot), without `y`"
            )
        raise ValueError(
            f"`equilib_activities` must have {expected} entries {layout} for a "
            f"{n_layers}-layer amortiser, got {len(equilib_activities)}."
        )
    return [*equilib_activities, y] if y is not None else list(equilib_activities)


def _amortiser_layer_energies(model, equilib_activities, amort_activities, x, y):
    """`[E_1, ..., E_L]` in amortiser order (layer 1, fed the observation, first)."""
    check_model(model)
    n_layers = len(model)
    check_sequence("amort_activities", amort_activities)
    if len(amort_activities) not in (n_layers, n_layers + 1):
        raise ValueError(
            f"`amort_activities` must have {n_layers + 1} entries (as returned by "
            f"`init_activities_with_amort`), or {n_layers} without the trailing "
            f"output slot, got {len(amort_activities)}."
        )
    check_batch(x, y, [*equilib_activities, *amort_activities], y_name="x", x_name="y")
    targets = _targets(equilib_activities, n_layers, y)
    inputs = [x, *list(amort_activities[1:n_layers])[::-1]]
    names = ["x"] + [f"amort_activities[{n_layers - k}]" for k in range(1, n_layers)]
    preds = layer_predictions(model, None, [1.0] * n_layers, inputs, names)
    energies = []
    for k, (target, pred) in enumerate(zip(targets, preds)):
        if jnp.shape(target) != pred.shape:
            raise ValueError(
                f"`model[{k}]` predicts shape {pred.shape} but its target (generator "
                f"activity {n_layers - 1 - k}) has shape {jnp.shape(target)}."
            )
        energies.append(jnp.sum((target - pred) ** 2) / x.shape[0])
    return energies


@traced_floats()
def hpc_energy_fn(
    model: Model,
    equilib_activities: Activities,
    amort_activities: Activities,
    x: Float[Array, "batch ..."],
    y: Float[Array, "batch ..."] | None = None,
    record_layers: bool = False,
) -> Float[Array, ""] | Float[Array, " layers"]:
    r"""Amortiser regression loss of hybrid PC.

    $$\mathcal{L} = \frac1B\sum_i\sum_{l=0}^{L-1}\lVert t_{l,i}
    - g_{L-l}(\hat z_{l+1,i})\rVert^2 \quad(\text{no } \tfrac12),$$

    with targets $t_0 = y$ (the label) when given, else the inferred $z^*_0$, and
    $t_l = z^*_l$ for $l \ge 1$; $\hat z_L = x$ and the other $\hat z$ are the
    amortised activities (each layer sees its own feedforward input).

    **Arguments:**

    - `model`: the amortiser, `L` layers from the observation to the prior.
    - `equilib_activities`: the generator's inferred free activities in amortiser
        order, as in the JPC library: `[z_{L-1}, ..., z_1]` when `y` is given and
        `[z_{L-1}, ..., z_1, z_0]` otherwise. The generator's own list, as
        [`jpc.init_activities_with_ffwd`][] or [`jpc.solve_inference`][] return it
        (`[z_1, ..., z_L]`, or `[z_0, ..., z_L]` without `y`: generator order
        with the trailing output slot, one entry more), is also accepted and
        gives the same loss: it is reordered and its slot is never read.
    - `amort_activities`: as returned by [`jpc.init_activities_with_amort`][],
        with or without its trailing output slot (never read).
    - `x`: the observation (the amortiser's input).
    - `y`: optional label, the target of the amortiser's last layer.
    - `record_layers`: return the per-layer terms instead of their sum.

    **Returns:**

    A scalar; with `record_layers=True` an array of the `L` terms in amortiser
    order (layer 1, fed `x`, first; the prior/label term last).

    **Raises:**

    `ValueError` if the list lengths, batch sizes or shapes do not fit.
    """
    energies = _amortiser_layer_energies(
        model, equilib_activities, amort_activities, x, y
    )
    return jnp.stack(energies) if record_layers else sum(energies)


@traced_floats()
def compute_hpc_param_grads(
    model: Model,
    equilib_activities: Activities,
    amort_activities: Activities,
    x: Float[Array, "batch ..."],
    y: Float[Array, "batch ..."] | None = None,
) -> PyTree:
    """Gradient of [`jpc.hpc_energy_fn`][] with respect to the amortiser.

    **Arguments:**

    As [`jpc.hpc_energy_fn`][]: `equilib_activities` in amortiser order or as the
    generator's own list (with its trailing output slot), `amort_activities` with
    or without its slot.

    **Returns:**

    A pytree shaped like `model` (`None` where a leaf is not an array).

    **Raises:**

    `ValueError` if the list lengths, batch sizes or shapes do not fit.
    """
    return eqx.filter_grad(hpc_energy_fn)(
        model, list(equilib_activities), list(amort_activities), x, y
    )


@traced_floats(*STOP_FLOATS)
def make_hpc_step(
    generator: Model,
    amortiser: Model,
    optims: Sequence[optax.GradientTransformation],
    opt_states: Sequence[optax.OptState],
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    ode_solver: dfx.AbstractSolver = dfx.Heun(),
    max_t1: float = 300,
    dt: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController = dfx.PIDController(
        rtol=1e-3, atol=1e-3
    ),
    record_activities: bool = False,
    record_energies: bool = False,
    activity_optim: optax.GradientTransformation | None = None,
    n_inference_steps: int | None = None,
    max_steps: int | None = None,
    steady_state_rtol: Scalar | None = DEFAULT_STEADY_STATE_RTOL,
    steady_state_atol: Scalar | None = DEFAULT_STEADY_STATE_ATOL,
) -> HPCStepResult:
    """One hybrid PC training step (see the module description for the flow).

    **Arguments:**

    - `generator`: `L` PC layers from the prior to the observation.
    - `amortiser`: `L` layers from the observation to the prior.
    - `optims`: `(generator_optim, amortiser_optim)`.
    - `opt_states`: their states: the generator's made as for
        [`jpc.make_pc_step`][], `optim.init((eqx.filter(generator, eqx.is_array),
        None))`; the amortiser's `optim.init(eqx.filter(amortiser, eqx.is_array))`.
    - `output`: the observation (e.g. images), clamping the generator's top.
    - `input`: optional prior (e.g. one-hot labels): clamps the generator's $z_0$
        and is the target of the amortiser's last layer; `None` leaves $z_0$ free.
    - `ode_solver`, `max_t1`, `dt`, `stepsize_controller`: ODE inference options
        (see [`jpc.solve_inference`][]).
    - `max_steps`, `steady_state_rtol`, `steady_state_atol`: solver step budget
        and the steady-state stop's tolerances (see [`jpc.solve_inference`][]).
    - `activity_optim`, `n_inference_steps`: discrete inference instead (new, as in
        [`jpc.make_pc_step`][]).
    - `record_activities`, `record_energies`: return the inference trajectory and
        the generator's per-layer energies along it.

    **Returns:**

    A dict, with the layouts of the JPC library:

    - `generator`, `amortiser`: the updated networks; `opt_states`: their states.
    - `activities`: `(amort_activities, equilib_activities)`: the amortiser's
        guesses (as [`jpc.init_activities_with_amort`][]) and the generator's
        inference output, with a leading time axis (length 1 unless recording).
    - `t_max`: the row of the final state when recording, else `None`.
    - `steady_state_reached`: whether the ODE inference's steady-state stop fired
        before `max_t1` (a boolean scalar); `None` with discrete inference.
    - `losses`: `(generator_loss, amortiser_loss)` before the updates:
        `mean((output - generator(input))²)` of the generator's feedforward
        prediction from `input` (`None` when `input` is `None`) and
        `mean((target - ẑ_0)²)` of the amortiser's top guess, the target being
        `input` or, without it, the generator's inferred $z_0$ (means over batch
        and features).
    - `energies`: `(generator_energies, amortiser_energies)`, both `None` unless
        `record_energies`: then the generator's per-layer energies along the
        inference (as [`jpc.compute_infer_energies`][]) and the amortiser's
        per-layer terms at the equilibrium (as [`jpc.hpc_energy_fn`][] with
        `record_layers=True`).

    **Raises:**

    `ValueError` for mismatched models, bad inference options or sizes.
    """
    _check_pair_of_models(amortiser, generator)
    check_inference_options(activity_optim, n_inference_steps)
    generator_optim, amortiser_optim = check_pair("optims", optims)
    generator_state, amortiser_state = check_pair("opt_states", opt_states)
    check_opt_state(
        generator_optim, generator_state, (generator, None), "opt_states[0]"
    )
    check_opt_state(
        amortiser_optim,
        amortiser_state,
        amortiser,
        "opt_states[1]",
        "amortiser_optim.init(eqx.filter(amortiser, eqx.is_array))",
    )
    check_batch(output, input, [], y_name="output", x_name="input")
    amort_activities = _amortise_observation(amortiser, generator, output)
    activities = amort_activities if input is None else amort_activities[1:]
    params = (generator, None)
    record = record_activities or record_energies
    ode = (ode_solver, max_t1, dt, stepsize_controller, None)
    discrete = None if activity_optim is None else (activity_optim, n_inference_steps)
    stop = stop_options(
        "make_hpc_step", max_steps, steady_state_rtol, steady_state_atol
    )
    trajectory, final, t_max, reached = infer(
        params,
        activities,
        output,
        input,
        ode,
        discrete,
        record,
        GENERATOR_ENERGY,
        stop,
    )
    _, generator, _, _, generator_state = param_step(
        params,
        final,
        generator_optim,
        generator_state,
        output,
        input,
        **GENERATOR_ENERGY,
    )
    equilib = amortiser_order(final)
    grads = eqx.filter_grad(hpc_energy_fn)(
        amortiser, equilib, amort_activities, output, input
    )
    amortiser_before = amortiser
    amortiser, amortiser_state = optax_update(
        amortiser, grads, amortiser_optim, amortiser_state
    )
    generator_loss = None
    if input is not None:
        prediction = feedforward(params[0], input)[-1]
        generator_loss = jnp.mean((output - prediction) ** 2)
    target = input if input is not None else final[0]
    amortiser_loss = jnp.mean((target - amort_activities[0]) ** 2)
    energies = (None, None)
    if record_energies:
        energies = (
            infer_energies(params, trajectory, t_max, output, input, "mse", "sp"),
            hpc_energy_fn(
                amortiser_before,
                equilib,
                amort_activities,
                output,
                input,
                record_layers=True,
            ),
        )
    return HPCStepResult(
        generator=generator,
        amortiser=amortiser,
        opt_states=(generator_state, amortiser_state),
        activities=(amort_activities, trajectory),
        t_max=t_max,
        steady_state_reached=reached,
        losses=(generator_loss, amortiser_loss),
        energies=energies,
    )


@traced_floats("sigma", *STOP_FLOATS)
def test_hpc(
    generator: Model,
    amortiser: Model,
    output: Float[Array, "batch ..."],
    input: Float[Array, "batch classes"],
    key: Array,
    layer_sizes: Sequence[int],
    batch_size: int,
    sigma: Scalar = 0.05,
    ode_solver: dfx.AbstractSolver = dfx.Heun(),
    max_t1: float = 500,
    dt: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController = dfx.PIDController(
        rtol=1e-3, atol=1e-3
    ),
    max_steps: int | None = None,
    steady_state_rtol: Scalar | None = DEFAULT_STEADY_STATE_RTOL,
    steady_state_atol: Scalar | None = DEFAULT_STEADY_STATE_ATOL,
    return_info: bool = False,
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""], Array]:
    """Evaluate a hybrid PC network: amortised, hybrid and generative inference.

    **Arguments:**

    - `generator`, `amortiser`: the trained networks.
    - `output`: observations; `input`: one-hot labels.
    - `key`, `layer_sizes`, `batch_size`, `sigma`: random initialisation of the
        purely generative inference (see [`jpc.init_activities_from_normal`][]).
    - `ode_solver`, `max_t1`, `dt`, `stepsize_controller`: inference ODE options.
    - `max_steps`, `steady_state_rtol`, `steady_state_atol`: solver step budget
        and the steady-state stop's tolerances (see [`jpc.solve_inference`][]).
    - `return_info`: also return what happened during the two inferences (default
        `False`).

    **Returns:**

    `(amortiser_acc, hybrid_acc, generator_acc, output_predictions)`: accuracy (%)
    of the amortiser's feedforward guess of the prior; of $z_0$ inferred by the
    generator starting from the amortised activities; of $z_0$ inferred from random
    activities (as [`jpc.test_generative_pc`][]); and the generator's feedforward
    prediction of the observation from the true labels. With `return_info=True`,
    a fifth entry `(hybrid_info, generator_info)`: the [`jpc.InferenceInfo`][] of
    the hybrid and of the generative solve (their `steady_state_reached` says
    whether each stopped at a steady state before `max_t1`).
    """
    check_random_init(generator, output, layer_sizes, batch_size)
    amort_activities = _amortise_observation(amortiser, generator, output)
    check_batch(output, input, amort_activities, y_name="output", x_name="input")
    args = ((generator, None), output, None, "mse", "sp", 0.0, 0.0, 0.0)
    stop = stop_options("test_hpc", max_steps, steady_state_rtol, steady_state_atol)
    ode = (ode_solver, max_t1, dt, stepsize_controller)
    equilibrium, hybrid_info = generative_equilibrium(args, amort_activities, ode, stop)
    generator_acc, generator_info = generative_accuracy(
        args, input, (key, layer_sizes, batch_size, sigma), ode, stop
    )
    output_predictions = feedforward(generator, input)[-1]
    result = (
        compute_accuracy(input, amort_activities[0]),
        compute_accuracy(input, equilibrium[0]),
        generator_acc,
        output_predictions,
    )
    return (*result, (hybrid_info, generator_info)) if return_info else result


test_hpc.__test__ = False  # type: ignore[attr-defined]
