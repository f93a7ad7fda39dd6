"""Inference as gradient flow, solved with diffrax (SPEC §4.1)."""

import math
from typing import Any

import diffrax as dfx
import jax.numpy as jnp
import numpy as np

from ._checks import traced_floats
from ._energies import check_energy_inputs
from ._grads import (
    neg_pc_activity_grad,
    unpack_vector_field_args,
    vector_field_args,
)
from ._jit import error_if
from ._types import Activities, Array, Float, LossId, Params, ParamType, Scalar


_DEFAULT_TOL = 1e-3
_DEFAULT_MAX_STEPS = 4096
_DEFAULT_RECORD_STEPS = 1024


def _rms(arrays: list) -> Array:
    total = sum(jnp.sum(a**2) for a in arrays)
    count = sum(a.size for a in arrays)
    return jnp.sqrt(total / count)


def steady_state_event(stepsize_controller: Any) -> dfx.Event:
    r"""Stop when $\mathrm{rms}(B\,\partial\mathcal{F}/\partial z) < a + r\,
    \mathrm{rms}(z)$ over the free activities.

    `r` and `a` are the controller's `rtol` and `atol` (1e-3 if it has none). The
    test is on the vector field, not the state, so it fires once inference has
    converged (the JPC library's event never fired, SPEC §11.1). The field is
    taken per example: $\mathcal{F}$ is a batch mean, so $\partial\mathcal{F}/
    \partial z$ carries a factor $1/B$, and without undoing it a batch of 64 would
    look converged at $t = 0$ while each example's error is still large.
    """
    rtol = getattr(stepsize_controller, "rtol", _DEFAULT_TOL)
    atol = getattr(stepsize_controller, "atol", _DEFAULT_TOL)

    def cond_fn(t, y, args, **kwargs):
        free = list(y[:-1])
        if not free:
            return jnp.array(True)
        field = neg_pc_activity_grad(t, y, args)[:-1]
        batch_size = free[0].shape[0]
        return batch_size * _rms(field) < atol + rtol * _rms(free)

    return dfx.Event(cond_fn)


def _max_steps(max_steps, max_t1, dt, controller, record_iters) -> int:
    if max_steps is not None:
        return max_steps
    if isinstance(controller, dfx.ConstantStepSize):
        return math.ceil(max_t1 / dt) + 1
    return _DEFAULT_RECORD_STEPS if record_iters else _DEFAULT_MAX_STEPS


def _saveat(max_t1, record_iters: bool, record_every) -> dfx.SaveAt:
    if record_iters:
        # Row k is the state after the (k+1)-th accepted step; no initial row.
        return dfx.SaveAt(steps=True)
    if record_every is not None:
        if not record_every > 0:
            raise ValueError(f"`record_every` must be positive, got {record_every!r}.")
        return dfx.SaveAt(ts=np.arange(0, max_t1, record_every), t1=True)
    return dfx.SaveAt(t1=True)


def _check_solve_options(dt, controller, max_t1) -> None:
    if isinstance(controller, dfx.ConstantStepSize) and dt is None:
        raise ValueError(
            "`dt` must be given with `stepsize_controller=diffrax.ConstantStepSize()`, "
            "got `dt=None`."
        )
    if not max_t1 > 0:
        raise ValueError(f"`max_t1` must be positive, got {max_t1!r}.")


def solve(
    args: tuple,
    activities,
    solver,
    max_t1,
    dt,
    controller,
    *,
    record_iters=False,
    record_every=None,
    max_steps=None,
    names=("loss_id", "output", "input"),
    saveat=None,
) -> list[Array]:
    """Integrate the vector field `neg_pc_activity_grad` with `args` (not jitted).

    `names` are the caller's names of the loss option and the clamps `y`, `x`,
    used in error messages. `saveat`, when given, replaces the `diffrax.SaveAt`
    built from `record_iters`/`record_every` (which then only set the step budget);
    the result is then `sol.ys` in its layout.
    """
    kwargs = unpack_vector_field_args(args)
    check_energy_inputs(
        kwargs["params"],
        activities,
        kwargs["y"],
        kwargs["x"],
        kwargs["loss_id"],
        kwargs["param_type"],
        names,
    )
    _check_solve_options(dt, controller, max_t1)
    n_steps = _max_steps(max_steps, max_t1, dt, controller, record_iters)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(neg_pc_activity_grad),
        solver,
        t0=0.0,
        t1=max_t1,
        dt0=dt,
        y0=list(activities),
        args=args,
        saveat=_saveat(max_t1, record_iters, record_every)
        if saveat is None
        else saveat,
        stepsize_controller=controller,
        event=steady_state_event(controller),
        max_steps=n_steps,
        throw=False,
    )
    # `error_if` (not `eqx.error_if`): the checks see only a scalar, so a
    # batch-sharded trajectory is never gathered onto one device (SPEC §9).
    ys = error_if(
        sol.ys,
        sol.result == dfx.RESULTS.max_steps_reached,
        f"solve_inference: the ODE solver took max_steps={n_steps} steps before "
        f"t={max_t1} without reaching a steady state; pass a larger `max_steps`, a "
        "smaller `max_t1` or a looser `stepsize_controller`.",
    )
    failed = (
        (sol.result != dfx.RESULTS.successful)
        & (sol.result != dfx.RESULTS.event_occurred)
        & (sol.result != dfx.RESULTS.max_steps_reached)
    )
    return error_if(
        ys,
        failed,
        "solve_inference: the ODE solver failed (non-finite activities "
        "or a step size that became too small).",
    )


@traced_floats(
    "weight_decay",
    "spectral_penalty",
    "activity_decay",
    "gamma",
    "output_energy_scaling",
)
def solve_inference(
    params: Params,
    activities: Activities,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    solver: dfx.AbstractSolver = dfx.Heun(),
    max_t1: float = 20,
    dt: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController = dfx.PIDController(
        rtol=1e-3, atol=1e-3
    ),
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    record_iters: bool = False,
    record_every: float | None = None,
    max_steps: int | None = None,
) -> list[Float[Array, "time batch ..."]]:
    r"""Run inference $\dot z = -\partial\mathcal{F}/\partial z$ with a diffrax solver.

    Integrates from $t=0$ to `max_t1`, stopping early at a steady state:
    $\mathrm{rms}(B\,\partial\mathcal{F}/\partial z) < \texttt{atol} +
    \texttt{rtol} \cdot \mathrm{rms}(z)$ over the free activities, with the
    controller's tolerances (1e-3 if it has none). The field is taken per example
    (times the batch size $B$, undoing the $1/B$ of the batch-mean energy), so the
    stop does not depend on the batch size.

    **Arguments:**

    - `params`, `activities`: as for [`jpc.pc_energy_fn`][].
    - `output`: target `y` clamping the top layer.
    - `input`: optional `x` clamping the bottom layer (`None`: unsupervised).
    - `loss_id`, `param_type`, `weight_decay`, `spectral_penalty`,
        `activity_decay`, `gamma`, `output_energy_scaling`: energy options.
    - `solver`: any diffrax solver.
    - `max_t1`: end time of the integration.
    - `dt`: initial (or, with `diffrax.ConstantStepSize`, fixed) step size;
        `None` lets an adaptive controller choose.
    - `stepsize_controller`: any diffrax step-size controller.
    - `record_iters`: save the state after every accepted step (row `k` is the
        state after step `k + 1`; the initial state is not a row, as in the JPC
        library; rows after the last step are `inf`, see [`jpc.get_t_max`][]).
    - `record_every`: save the state every `record_every` time units from $t=0$
        until the stop, then the final state (rows after it are `inf`).
    - `max_steps`: solver step budget; by default `ceil(max_t1 / dt) + 1` for a
        constant step, else 4096 (1024 when `record_iters`, which stores every
        step).

    **Returns:**

    A list of activities with a leading time axis: length 1 (the final state)
    unless recording. When recording, the final state is the row
    [`jpc.get_t_max`][] points to.

    **Raises:**

    `ValueError` for bad options or inputs (see [`jpc.pc_energy_fn`][]); a
    runtime error naming `max_steps` if the budget runs out before `max_t1`.
    """
    args = vector_field_args(
        params,
        output,
        input,
        loss_id=loss_id,
        param_type=param_type,
        weight_decay=weight_decay,
        spectral_penalty=spectral_penalty,
        activity_decay=activity_decay,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
    )
    return solve(
        args,
        activities,
        solver,
        max_t1,
        dt,
        stepsize_controller,
        record_iters=record_iters,
        record_every=record_every,
        max_steps=max_steps,
    )
