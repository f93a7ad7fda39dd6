"""Evaluation helpers and energies along an inference trajectory."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import optax

from ._checks import (
    LOSSES,
    check_batch,
    check_model,
    check_option,
    check_random_init,
    traced_floats,
)
from ._energies import check_energy_inputs, energy_vector, layer_energies
from ._grads import unpack_vector_field_args
from ._infer import (
    DEFAULT_STEADY_STATE_ATOL,
    DEFAULT_STEADY_STATE_RTOL,
    STOP_FLOATS,
    check_finite_inputs,
    like_data,
    solve,
    stop_options,
)
from ._init import init_activities_from_normal
from ._jit import filter_jit
from ._layers import check_output, feedforward, get_param_scalings
from ._types import (
    Activities,
    Array,
    Float,
    LossId,
    Model,
    Params,
    ParamType,
    Scalar,
    SkipModel,
)
from ._updates import NAMES, discrete_inference
from ._utils import LOSS_FNS, compute_accuracy


def infer_energies(
    params,
    activities_iters,
    t_max,
    y,
    x,
    loss,
    param_type,
    gamma=None,
    output_energy_scaling=None,
    hidden_energy_scaling=None,
) -> Array:
    """Per-layer energies `(L, T)`, rows in layer order, `0.` after `t_max`."""
    options = (gamma, output_energy_scaling, hidden_energy_scaling)

    def at(activities):
        energies = layer_energies(params, activities, y, x, loss, param_type, *options)
        return energy_vector(energies)

    energies = jax.vmap(at)(list(activities_iters)).T
    steps = jnp.arange(energies.shape[1])
    return jnp.where(steps[None, :] <= t_max, energies, 0.0)


@filter_jit
def compute_infer_energies(
    params: Params,
    activities_iters: Activities,
    t_max: int | Array,
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    loss: LossId = "mse",
    param_type: ParamType = "sp",
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
) -> Float[Array, "layers time"]:
    """Energy of every layer at every recorded state of an inference trajectory.

    **Arguments:**

    - `params`: `(model, skip_model)`.
    - `activities_iters`: activities with a leading time axis (from
        [`jpc.solve_inference`][] with `record_iters=True`).
    - `t_max`: index of the last valid state (see [`jpc.get_t_max`][]).
    - `y`, `x`, `loss`, `param_type`: as for [`jpc.pc_energy_fn`][].
    - `weight_decay`, `spectral_penalty`, `activity_decay`: accepted for
        compatibility; the per-layer energies exclude the regulariser.

    **Returns:**

    An `(L, T)` array whose row `l - 1` is $E_l$ (layer order `1..L`, unlike
    `record_layers`); column `k` belongs to row `k` of the trajectory and columns
    after `t_max` are `0.` (finite, as in the JPC library). Every recorded step is
    kept.
    """
    del weight_decay, spectral_penalty, activity_decay
    first = [a[0] for a in activities_iters]
    check_energy_inputs(params, first, y, x, loss, param_type)
    return infer_energies(params, activities_iters, t_max, y, x, loss, param_type)


def _feedforward_prediction(model, input, skip_model, param_type, gamma=None):
    check_model(model, skip_model)
    scalings = get_param_scalings(
        model, input, skip_model=skip_model, param_type=param_type, gamma=gamma
    )
    return feedforward(model, input, skip_model, scalings)[-1]


def _fits_swapped(model, output, input, skip_model, param_type, gamma) -> bool:
    """Whether the model maps `output` to predictions shaped like `input`."""

    def swapped(data):
        return _feedforward_prediction(model, data, skip_model, param_type, gamma)

    try:
        return jax.eval_shape(swapped, output).shape == jnp.shape(input)
    except (TypeError, ValueError):
        return False


@traced_floats("gamma")
def test_discriminative_pc(
    model: Model,
    output: Float[Array, "batch classes"],
    input: Float[Array, "batch ..."],
    *,
    skip_model: SkipModel = None,
    loss: LossId = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Loss and accuracy of the feedforward prediction of a discriminative network.

    **Arguments:**

    - `model`, `skip_model`, `param_type`, `gamma`: the network.
    - `output`: one-hot targets; `input`: the data.
    - `loss`: `"mse"` or `"ce"`.

    **Returns:**

    `(loss, accuracy_percent)`.
    """
    check_option("loss", loss, LOSSES)
    check_batch(output, input, [], y_name="output", x_name="input")
    try:
        preds = _feedforward_prediction(model, input, skip_model, param_type, gamma)
    except ValueError as err:
        if _fits_swapped(model, output, input, skip_model, param_type, gamma):
            raise ValueError(
                f"{err} The arrays look swapped: labels come first, "
                "`test_discriminative_pc(model, output, input)`."
            ) from err
        raise
    check_output(output, preds, "output")
    return LOSS_FNS[loss](preds, output), compute_accuracy(output, preds)


@traced_floats(
    "sigma", "weight_decay", "spectral_penalty", "activity_decay", *STOP_FLOATS
)
def test_generative_pc(
    model: Model,
    output: Float[Array, "batch ..."],
    input: Float[Array, "batch classes"],
    key: Array,
    layer_sizes,
    batch_size: int,
    *,
    skip_model: SkipModel = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    sigma: Scalar = 0.05,
    ode_solver: dfx.AbstractSolver = dfx.Heun(),
    max_t1: float = 500,
    dt: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController = dfx.PIDController(
        rtol=1e-3, atol=1e-3
    ),
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    max_steps: int | None = None,
    steady_state_rtol: Scalar | None = DEFAULT_STEADY_STATE_RTOL,
    steady_state_atol: Scalar | None = DEFAULT_STEADY_STATE_ATOL,
    activity_optim: optax.GradientTransformation | None = None,
    n_inference_steps: int | None = None,
    return_info: bool = False,
) -> tuple[Float[Array, ""], Float[Array, "batch ..."]]:
    r"""Evaluate a generative network (label → data) by inferring its input.

    Starting from random activities (see [`jpc.init_activities_from_normal`][]),
    inference with the observation `output` clamped finds the latent $z_0$, whose
    argmax is scored against the labels `input` (classification by inference, as
    in Whittington & Bogacz, 2017).

    **Arguments:**

    - `model`, `skip_model`, `param_type`, `loss_id`: the network and its energy.
    - `output`: observations (e.g. images), `(batch, ...)`; `input`: one-hot
        labels, `(batch, classes)`.
    - `key`, `layer_sizes`, `batch_size`, `sigma`: random initialisation.
    - `ode_solver`, `max_t1`, `dt`, `stepsize_controller`: inference ODE options.
    - `weight_decay`, `spectral_penalty`, `activity_decay`: energy options.
    - `max_steps`, `steady_state_rtol`, `steady_state_atol`: solver step budget
        and the steady-state stop's tolerances (see [`jpc.solve_inference`][]).
    - `activity_optim`, `n_inference_steps`: discrete inference instead of the
        ODE, as in [`jpc.make_pc_step`][]: that many `activity_optim` steps on the
        activities, in one compiled loop (default `None`: the ODE).
    - `return_info`: also return what happened during the inference (default
        `False`).

    !!! tip "Settings that classify well and fast"

        The energy is a batch mean, so each example's activity gradient scales as
        $1/B$ for a batch of $B$ examples, and the ODE path needs `max_t1`
        proportional to $B$. Discrete inference has a fixed cost whatever the
        batch size: `activity_optim=jpc.per_example(optax.sgd(0.1))` with
        `n_inference_steps=100` is the setting to start from. On 1000 MNIST test
        images (a 10-256-256-784 tanh generator trained for 200 steps, batches of
        100, a shared 2-core CPU) it classified 81.9% in 2.0 s, against 82.8% in
        24 s for the ODE at `max_t1` = 20 per example and 80.4% in 8 s at the
        default `max_t1=500`; a step of 0.2 diverged (13%). The stable
        per-example step lies below about $2/\|W_L\|_2^2$, $W_L$ the output
        weights, and shrinks as training grows them: after 1500 training steps
        ($\|W_L\|_2$ = 7.3 instead of 3.5) a step of 0.1 gave 25%, and the best
        setting measured, 0.03 for 1000 steps, 55%. See
        `python -m experiments.generative_mnist` and the generative networks
        section of the basic usage page.

    !!! note "Implicit solvers and memory"

        An implicit `ode_solver` (e.g. `diffrax.Kvaerno5`) solves a nonlinear
        system at every step with Newton's method on a Jacobian that is dense over
        the whole state: for a batch of $B$ and layer widths $n_l$ (all of
        `layer_sizes`) it holds $(B \sum_l n_l)^2$ numbers. For 100 MNIST images
        and `layer_sizes=[10, 128, 128, 784]` that is $(1.05 \times 10^5)^2
        \approx 1.1 \times 10^{10}$ numbers, 44 GB in float32. Use an explicit
        solver (the default `diffrax.Heun`) or discrete inference for anything but
        small batches of small networks.

    **Returns:**

    `(input_accuracy_percent, output_predictions)`, the latter the network's
    feedforward prediction of the data from the true labels `input`. With
    `return_info=True`, a third entry: the ODE solve's [`jpc.InferenceInfo`][]
    (its `steady_state_reached` says whether the steady-state stop fired before
    `max_t1`), or `None` with discrete inference.

    **Raises:**

    `ValueError` for bad options or inputs (e.g. only one of `activity_optim` and
    `n_inference_steps`); `eqx.EquinoxRuntimeError` at run time for non-finite
    inputs or a diverging inference.
    """
    # Imported here: `_train` imports this module.
    from ._train import check_inference_options

    check_batch(output, input, [], y_name="output", x_name="input")
    check_inference_options(activity_optim, n_inference_steps)
    check_random_init(model, output, layer_sizes, batch_size)
    args = (
        (model, skip_model),
        output,
        None,
        loss_id,
        param_type,
        weight_decay,
        spectral_penalty,
        activity_decay,
    )
    ode = (ode_solver, max_t1, dt, stepsize_controller)
    stop = stop_options(
        "test_generative_pc", max_steps, steady_state_rtol, steady_state_atol
    )
    discrete = None if activity_optim is None else (activity_optim, n_inference_steps)
    input_acc, info = generative_accuracy(
        args, input, (key, layer_sizes, batch_size, sigma), ode, stop, discrete
    )
    output_preds = _feedforward_prediction(model, input, skip_model, param_type)
    return (input_acc, output_preds, info) if return_info else (input_acc, output_preds)


def generative_accuracy(args, labels, random, ode, stop, discrete=None) -> tuple:
    """Accuracy of $z_0$ inferred from random activities (not jitted).

    `random` is `(key, layer_sizes, batch_size, sigma)`, `ode` is
    `(solver, max_t1, dt, controller)`, `stop` the keyword options of `solve` and
    `discrete` `(activity_optim, n_inference_steps)` or `None` (the ODE). Returns
    `(accuracy, info)`, `info` the solve's `InferenceInfo` or `None` (discrete).
    """
    key, layer_sizes, batch_size, sigma = random
    activities = init_activities_from_normal(
        key, layer_sizes, "unsupervised", batch_size, sigma
    )
    activities = like_data(activities, args[1])
    equilibrium, info = generative_equilibrium(args, activities, ode, stop, discrete)
    return compute_accuracy(labels, equilibrium[0]), info


def generative_equilibrium(args, activities, ode, stop, discrete=None) -> tuple:
    """Final activities of inference with only the top clamped, by either path, and
    the ODE solve's `InferenceInfo` (`None` on the discrete path)."""
    if discrete is None:
        ys, info = solve(args, activities, *ode, return_info=True, **stop)
        return [z[-1] for z in ys], info
    kwargs = unpack_vector_field_args(args)
    params, y, x = kwargs.pop("params"), kwargs.pop("y"), kwargs.pop("x")
    activities = check_finite_inputs(activities, y, x, NAMES, stop["caller"])
    optim, n_steps = discrete
    final, _ = discrete_inference(
        params, activities, optim, n_steps, y, x, False, **kwargs
    )
    return final, None


test_discriminative_pc.__test__ = False  # type: ignore[attr-defined]
test_generative_pc.__test__ = False  # type: ignore[attr-defined]
