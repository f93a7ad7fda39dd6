"""Inference as gradient flow, solved with diffrax."""

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
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


# `None`: the step-size controller's `rtol`/`atol`, or `_FALLBACK_TOL` without them.
DEFAULT_STEADY_STATE_RTOL = None
DEFAULT_STEADY_STATE_ATOL = None
_FALLBACK_TOL = 1e-3
STOP_FLOATS = ("steady_state_rtol", "steady_state_atol")
_DEFAULT_MAX_STEPS = 4096
_DEFAULT_RECORD_STEPS = 1024


def _rms(arrays: list) -> Array:
    total = sum(jnp.sum(a**2) for a in arrays)
    count = sum(a.size for a in arrays)
    return jnp.sqrt(total / count)


def _rms_per_example(a: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.reshape(a, (a.shape[0], -1)) ** 2, axis=1))


def steady_state_ratio(field: list, free: list, rtol: Any, atol: Any) -> Array:
    r"""$\max_{l,i} B\,\mathrm{rms}(f_{l,i}) / (a + r\,\mathrm{rms}(z_{l,i}))$.

    `field` is $-\partial\mathcal{F}/\partial z$ of the free activities `free`;
    the maximum runs over the layers $l$ and the examples $i$, so the solve is
    steady only when every example's every layer is. $B$ undoes the $1/B$ of the
    batch-mean energy (each example's own field).
    """
    batch_size = free[0].shape[0]
    ratios = [
        batch_size * _rms_per_example(f) / (atol + rtol * _rms_per_example(z))
        for f, z in zip(field, free)
    ]
    return jnp.max(jnp.stack([jnp.max(r) for r in ratios]))


def _per_example(values: Array, like: Array) -> Array:
    """`values` of shape `(batch,)` broadcast against `like` `(batch, ...)`."""
    return jnp.reshape(values, (-1,) + (1,) * (like.ndim - 1))


def polished_ratio(
    y: list,
    field: list,
    args: tuple,
    rtol: Any,
    atol: Any,
    neg_hvp=None,
    field_fn=neg_pc_activity_grad,
) -> Array:
    r"""The stop's ratio after one exact line-search step along the field.

    Per example, $s_i = \lVert f_i\rVert^2 / f_i^\top H_i f_i$ minimises the
    local quadratic model of $\mathcal{F}_i$ along its field $f_i$ (one
    Hessian-vector product); at $\tilde z = z + s f$ the ratio is the larger of
    the field's (as in `steady_state_ratio`) and the step's,
    $\mathrm{rms}(s_i f_{l,i}) / (a + r\,\mathrm{rms}(z_{l,i}))$. When the
    step size sits at the solver's stability limit, the stiffest mode stops
    decaying and keeps the field above the tolerance although the state is within
    it of the equilibrium; that step removes the mode and the step's own length
    bounds how far $z$ is from $\tilde z$.

    `neg_hvp`, when given, is the linearisation of the field at `y` (from
    `jax.linearize`, sharing the field's own evaluation). The field at $\tilde z$
    is evaluated only when the step's ratio is at most 1: otherwise that ratio
    alone is returned (above 1, so the stop's decision is the same).
    """
    batch_size = y[0].shape[0]
    direction = [batch_size * f for f in field]

    def neg_grad(z):
        return field_fn(None, z, args)

    if neg_hvp is None:
        _, neg_hvp_d = jax.jvp(neg_grad, (list(y),), (direction,))
    else:
        neg_hvp_d = neg_hvp(direction)
    sq = sum(jnp.sum(jnp.reshape(d**2, (batch_size, -1)), axis=1) for d in direction)
    curv = -batch_size * sum(
        jnp.sum(jnp.reshape(d * h, (batch_size, -1)), axis=1)
        for d, h in zip(direction, neg_hvp_d)
    )
    step = jnp.where(curv > 0, sq / jnp.where(curv > 0, curv, 1), 0)
    moves = [_per_example(step, d) * d for d in direction]
    free = list(y[:-1])
    moved = [m / batch_size for m in moves[:-1]]  # `steady_state_ratio` times by B
    step_ratio = steady_state_ratio(moved, free, rtol, atol)

    def field_ratio():
        new_field = neg_grad([z + m for z, m in zip(y, moves)])[:-1]
        return jnp.maximum(steady_state_ratio(new_field, free, rtol, atol), step_ratio)

    return jax.lax.cond(step_ratio <= 1, field_ratio, lambda: step_ratio)


_POLISH_BELOW = 1e3  # the line-search check runs only when the plain ratio is below


def steady_state_event(
    rtol: Any = DEFAULT_STEADY_STATE_RTOL,
    atol: Any = DEFAULT_STEADY_STATE_ATOL,
    field_fn=neg_pc_activity_grad,
) -> dfx.Event:
    r"""Stop once every example's every layer is steady.

    Fires when $B\,\mathrm{rms}(\partial\mathcal{F}/\partial z_{l,i}) \le a +
    r\,\mathrm{rms}(z_{l,i})$ for every free layer $l$ and example $i$, with the
    stop's own tolerances `rtol`, `atol` (not the step-size controller's), or
    when the same holds one exact line-search step further, with that step's
    length also within the tolerance (see `polished_ratio`), which a solver stuck
    at its stability limit reaches. The test is on the vector field, not the
    state (the JPC library's event tested the state and never fired), and per
    example and layer, so that large activities in one example or layer do not
    loosen it for the others. (A step-size controller passed as `rtol`, the old
    form of the call, gives its own tolerances, as the default does.) `field_fn`
    is the vector field the solve integrates (the PC field by default; in the
    activities' dtype when the state is held in a wider one), so that the stop
    tests the field that is integrated.
    """
    if isinstance(rtol, dfx.AbstractStepSizeController):
        rtol, atol = _stop_tolerances(None, None, rtol)
    test = steady_state_test(rtol, atol, field_fn)
    return dfx.Event(lambda t, y, args, **kwargs: test(t, y, args)[1])


def steady_state_test(rtol: Any, atol: Any, field_fn=neg_pc_activity_grad):
    """`test(t, y, args) -> (field, steady)`: the stop of `steady_state_event`,
    with the field at `y` it evaluated."""
    rtol = _FALLBACK_TOL if rtol is None else rtol
    atol = _FALLBACK_TOL if atol is None else atol

    def test(t, y, args):
        y = list(y)
        # One evaluation serves the field and, when the line-search check runs,
        # its Hessian-vector product (only the tangent part is left to compute).
        field, neg_hvp = jax.linearize(lambda z: field_fn(t, z, args), y)
        free = y[:-1]
        if not free:
            return field, jnp.array(True)
        ratio = steady_state_ratio(field[:-1], free, rtol, atol)
        steady = jax.lax.cond(
            (ratio > 1) & (ratio < _POLISH_BELOW),
            lambda: polished_ratio(y, field, args, rtol, atol, neg_hvp, field_fn) <= 1,
            lambda: ratio <= 1,
        )
        return field, steady

    return test


class FieldCachingHeun(dfx.AbstractAdaptiveSolver):
    """Heun's method (as `diffrax.Heun`) that ends each step with the field at its
    new state and reuses it as the next step's first stage.

    With the steady-state stop, which evaluates that same field after every step
    (see `SteadyStateStop`), a step then costs Heun's two field evaluations, where
    `diffrax.Heun` with the stop as a `diffrax.Event` costs three. The solver
    state is the field at the current state; the vector field must not depend on
    time (the PC field does not).
    """

    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = dfx.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 2

    def error_order(self, terms):
        return dfx.Heun().error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        return terms.vf(t0, y0, args)

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump  # an autonomous field: the cached one stays valid
        dt = t1 - t0
        k1 = terms.prod(solver_state, dt)
        k2 = terms.vf_prod(t1, jtu.tree_map(jnp.add, y0, k1), args, dt)
        y1 = jtu.tree_map(lambda y, a, b: y + (0.5 * a + 0.5 * b), y0, k1, k2)
        y_error = jtu.tree_map(lambda a, b: 0.5 * a - 0.5 * b, k1, k2)
        k = jtu.tree_map(lambda a, b: jnp.stack([a, b]), k1, k2)
        dense_info = dict(y0=y0, y1=y1, k=k)
        return y1, y_error, dense_info, terms.vf(t1, y1, args), dfx.RESULTS.successful


class SteadyStateStop(dfx.AbstractStepSizeController):
    """A step-size controller that also applies the steady-state stop.

    Accepts and sizes steps as `controller`, and reports
    `diffrax.RESULTS.event_occurred` (which ends the solve) on an accepted step
    whose new state passes `test` (a `steady_state_test`), as the stop's
    `diffrax.Event` would. The field the test evaluates at the new state is the
    one `FieldCachingHeun` computes at the end of the same step, so the compiled
    program evaluates it once.
    """

    controller: dfx.AbstractStepSizeController
    test: Any

    def wrap(self, direction):
        return SteadyStateStop(self.controller.wrap(direction), self.test)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        *decision, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
        )
        keep_step = decision[0]
        steady = keep_step & self.test(t1, y1_candidate, args)[1]
        result = dfx.RESULTS.where(steady, dfx.RESULTS.event_occurred, result)
        return (*decision, result)


def _max_steps(max_steps, max_t1, dt, controller, record_iters) -> int:
    if max_steps is not None:
        return max_steps
    if isinstance(controller, dfx.ConstantStepSize):
        return math.ceil(max_t1 / dt) + 1
    return _DEFAULT_RECORD_STEPS if record_iters else _DEFAULT_MAX_STEPS


def _saveat(max_t1, record_iters: bool, record_every) -> dfx.SaveAt:
    if record_iters:
        # Row k is the state after the (k+1)-th accepted step; no initial row
        # (unless no step is taken: see `_with_initial_rows`).
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


def _state_dtype(activities) -> Any:
    """The floating dtype of the activities: the ODE's time variables follow it."""
    dtypes = [jnp.result_type(a) for a in activities]
    floating = [d for d in dtypes if jnp.issubdtype(d, jnp.inexact)]
    return jnp.result_type(*floating) if floating else jnp.result_type(float)


def _time_dtype(dtype) -> Any:
    """The ODE's time dtype: the state's, but at least float32.

    Half-precision times cannot hold a grid such as `0.05 k` for `k` up to 400
    (bfloat16 has 8 significant bits), so float16/bfloat16 states keep float32
    times.
    """
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def _field_in(dtype):
    """The vector field evaluated in `dtype` on a state diffrax holds in another.

    With half-precision activities diffrax promotes the state to the float32 of
    the times; the field is still computed in the activities' own dtype.
    """

    def field(t, y, args):
        out = neg_pc_activity_grad(t, [jnp.asarray(z, dtype) for z in y], args)
        return [jnp.asarray(f, jnp.result_type(z)) for f, z in zip(out, y)]

    return field


_WARNED_RESOLUTION: set = set()


def warn_below_resolution(rtol, atol, dtype, caller: str) -> None:
    """Warn once per dtype when a concrete stop tolerance is below its resolution.

    The stop compares the field with `atol + rtol·rms(z)`; below the machine
    epsilon of the activities' dtype, round-off in the field alone can keep it
    from ever firing. Traced tolerances are not checked.
    """
    eps = float(jnp.finfo(dtype).eps)
    low = [
        f"`steady_state_{n}`={v!r}"
        for n, v in (("rtol", rtol), ("atol", atol))
        if isinstance(v, (int, float)) and v < eps
    ]
    if not low or jnp.dtype(dtype) in _WARNED_RESOLUTION:
        return
    _WARNED_RESOLUTION.add(jnp.dtype(dtype))
    warnings.warn(
        f"{caller}: the steady-state stop's {' and '.join(low)} (from the "
        f"step-size controller when not given) {'is' if len(low) == 1 else 'are'} "
        "below the resolution of "
        f"{jnp.dtype(dtype).name} activities (eps={eps:.3g}), so the stop may "
        f"never fire; pass `steady_state_rtol` and `steady_state_atol` of at least "
        f"{eps:.3g}.",
        stacklevel=3,
    )


class InferenceInfo(NamedTuple):
    """What happened during an ODE inference solve.

    **Attributes:**

    - `times`: `(T,)` array, the time of each returned row of the activities (the
        rows of `record_iters`/`record_every`, or the final state), `inf` after
        the last one; float32 or wider.
    - `n_accepted_steps`: integer scalar, the solver's accepted steps.
    - `steady_state_reached`: boolean scalar, whether the steady-state stop fired
        (`False` when the solve ran to `max_t1`).
    """

    times: Array
    n_accepted_steps: Array
    steady_state_reached: Array


def _as_dtype(saveat: dfx.SaveAt, dtype) -> dfx.SaveAt:
    """`saveat` with its save times cast to `dtype` (diffrax promotes to them)."""

    def cast(leaf):
        if isinstance(leaf, (np.ndarray, jax.Array)) and jnp.issubdtype(
            leaf.dtype, jnp.floating
        ):
            return jnp.asarray(leaf, dtype)
        return leaf

    return jtu.tree_map(cast, saveat)


def like_data(activities: list, data) -> list:
    """Random activities in the floating dtype of `data` (the user's dtype)."""
    dtype = jnp.result_type(data)
    if not jnp.issubdtype(dtype, jnp.floating):
        return list(activities)
    return [jnp.asarray(a, dtype) for a in activities]


def _all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(a)) for a in jtu.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_finite_inputs(activities, y, x, names, caller: str) -> list:
    """Runtime check that the clamps and the initial activities are finite.

    Returns `activities` (through [`error_if`][], so the check stays in the
    program); each message names the caller's argument.
    """
    _, y_name, x_name = names
    activities = list(activities)
    for value, what in ((y, f"`{y_name}`"), (x, f"`{x_name}`")):
        if value is not None:
            activities = error_if(
                activities,
                ~_all_finite(value),
                f"{caller}: {what} contains NaN or inf; inference needs finite inputs.",
            )
    # The last entry is never read (the output is clamped), so it may hold e.g.
    # logits of `-inf` for classes masked out.
    return error_if(
        activities,
        ~_all_finite(activities[:-1]),
        f"{caller}: the initial activities contain NaN or inf (check `activities`, "
        "or the model's parameters when they are computed by a feedforward pass).",
    )


def _final_state(ys: list) -> list:
    """The last row of a trajectory whose rows after the final state are `inf`."""
    first = jnp.reshape(ys[0], (ys[0].shape[0], -1))
    last = jnp.maximum(jnp.sum(~jnp.all(jnp.isinf(first), axis=1)) - 1, 0)
    return [y[last] for y in ys]


def _set_first_row(rows: Array, first: Array) -> Array:
    return rows.at[0].set(jnp.asarray(first, rows.dtype))


def _with_initial_rows(sol: dfx.Solution, subs, t0, y0, args) -> dfx.Solution:
    """`sol` with the initial state as row 0 of each per-step save, if no step.

    A solve steady at its initial state takes no step, so its per-step saves
    (`SubSaveAt(steps=True)`) would hold no row. Their row 0 becomes the initial
    state's save, `sub.fn(t0, y0, args)`, at time `t0`. `subs` has the structure
    of `SaveAt.subs`, a prefix of that of `sol.ts` and of `sol.ys`.
    """
    no_step = sol.stats["num_accepted_steps"] == 0

    def fill(sub, ts, ys):
        if not sub.steps:
            return ts, ys

        def initial():
            first = sub.fn(t0, y0, args)
            return _set_first_row(ts, t0), jtu.tree_map(_set_first_row, ys, first)

        return jax.lax.cond(no_step, initial, lambda: (ts, ys))

    leaves, treedef = jtu.tree_flatten(
        subs, is_leaf=lambda x: isinstance(x, dfx.SubSaveAt)
    )
    rows = treedef.flatten_up_to(sol.ts), treedef.flatten_up_to(sol.ys)
    filled = [fill(sub, ts, ys) for sub, ts, ys in zip(leaves, *rows)]
    ts = treedef.unflatten([f[0] for f in filled])
    ys = treedef.unflatten([f[1] for f in filled])
    return eqx.tree_at(lambda s: (s.ts, s.ys), sol, (ts, ys))


def check_solution(sol, args, n_steps: int, max_t1, caller: str, states=None):
    """`sol.ys`, with runtime errors for a non-finite state or an exhausted budget.

    `states` is the saved trajectory of the activities within `sol.ys` (all of it
    by default; the first entry when a custom `SaveAt(subs=...)` also saved other
    quantities)."""
    states = sol.ys if states is None else states
    ran_out = sol.result == dfx.RESULTS.max_steps_reached
    final = _final_state(states)
    nan_seen = ~_all_finite(
        [jnp.where(jnp.isinf(y), 0, y) for y in jtu.tree_leaves(sol.ys)]
    )
    # An adaptive controller rejects non-finite steps and stalls until the budget
    # runs out: look at the field where it stalled.
    stalled_at_inf = jax.lax.cond(
        ran_out,
        lambda: ~_all_finite(neg_pc_activity_grad(None, final, args)),
        lambda: jnp.array(False),
    )
    non_finite = nan_seen | stalled_at_inf | ~_all_finite(final[:-1])
    ys = error_if(
        sol.ys,
        non_finite,
        f"{caller}: the activities became non-finite (NaN or inf) during "
        "inference: the dynamics diverged. Use a smaller `dt` or a tighter "
        "`stepsize_controller`, or check the model, its scale and the energy "
        "options.",
    )
    ys = error_if(
        ys,
        ran_out & ~non_finite,
        f"{caller}: the ODE solver took max_steps={n_steps} steps before "
        f"t={max_t1} without reaching a steady state (if its steps were all "
        "rejected, the dynamics may be diverging); pass a larger `max_steps`, "
        "a smaller `max_t1`, looser `steady_state_rtol`/`steady_state_atol` or a "
        "looser `stepsize_controller`.",
    )
    failed = (
        (sol.result != dfx.RESULTS.successful)
        & (sol.result != dfx.RESULTS.event_occurred)
        & ~ran_out
        & ~non_finite
    )
    return error_if(
        ys,
        failed,
        f"{caller}: the ODE solver failed (a step size that became too small).",
    )


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
    steady_state_rtol=None,
    steady_state_atol=None,
    caller: str = "solve_inference",
    saveat=None,
    return_info: bool = False,
) -> list[Array]:
    """Integrate the vector field `neg_pc_activity_grad` with `args` (not jitted).

    `names` are the caller's names of the loss option and the clamps `y`, `x`,
    and `caller` the name of the public function, used in error messages.
    The ODE's times are in the activities' dtype, so float32 activities stay
    float32 with `jax_enable_x64` on. `saveat`, when given, replaces the
    `diffrax.SaveAt` built from `record_iters`/`record_every` (which then only set
    the step budget); it must be a `SaveAt(subs=[...])` whose first entry saves the
    activities, and the result is then `sol.ys` in its layout. Times are at least
    float32 (half-precision states are held in float32 by the solver and the
    results cast back). With `return_info`, returns `(ys, InferenceInfo)`.
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
    check_max_steps(max_steps)
    n_steps = _max_steps(max_steps, max_t1, dt, controller, record_iters)
    rtol, atol = _stop_tolerances(steady_state_rtol, steady_state_atol, controller)
    dtype = _state_dtype(activities)
    warn_below_resolution(rtol, atol, dtype, caller)
    time_dtype = _time_dtype(dtype)
    field = neg_pc_activity_grad if time_dtype == dtype else _field_in(dtype)
    dtype, state_dtype = time_dtype, dtype
    y0 = check_finite_inputs(activities, kwargs["y"], kwargs["x"], names, caller)
    y0 = check_stop_signs(y0, rtol, atol, caller)
    t0, t1 = jnp.zeros((), dtype), jnp.asarray(max_t1, dtype)
    save = _as_dtype(
        _saveat(max_t1, record_iters, record_every) if saveat is None else saveat,
        dtype,
    )
    if type(solver) is dfx.Heun:
        # The default solver: the stop shares the field of each step's end with
        # the next step's first stage.
        test = steady_state_test(rtol, atol, field)
        # In the dtype diffrax holds the state in (at least the times' dtype).
        y0 = [jnp.asarray(z, jnp.result_type(z, dtype)) for z in y0]
        field0, steady0 = test(t0, y0, args)
        solver = FieldCachingHeun()
        controller = SteadyStateStop(controller, test)
        # Steady at the start: no step. An event on the flag alone, which can fire
        # only at `t0`; a traced `t1` instead would put diffrax's rounding of `t1`
        # (100 `prevbefore`s, one long scalar kernel) into the compiled program.
        start = dfx.Event(lambda t, y, args, **kwargs: steady0)
        stop = dict(solver_state=field0, event=start)
    else:
        stop = dict(event=steady_state_event(rtol, atol, field))  # the field integrated
    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        solver,
        t0=t0,
        t1=t1,
        dt0=None if dt is None else jnp.asarray(dt, dtype),
        y0=y0,
        args=args,
        saveat=save,
        stepsize_controller=controller,
        max_steps=n_steps,
        throw=False,
        **stop,
    )
    sol = _with_initial_rows(sol, save.subs, t0, y0, args)
    # `error_if` (not `eqx.error_if`): the checks see only a scalar, so a
    # batch-sharded trajectory is never gathered onto one device.
    states = None if saveat is None else sol.ys[0]
    ys = check_solution(sol, args, n_steps, max_t1, caller, states)
    if state_dtype != dtype:
        ys = jtu.tree_map(lambda a: jnp.asarray(a, state_dtype), ys)
    if not return_info:
        return ys
    info = InferenceInfo(
        times=sol.ts if saveat is None else sol.ts[0],
        n_accepted_steps=sol.stats["num_accepted_steps"],
        steady_state_reached=sol.result == dfx.RESULTS.event_occurred,
    )
    return ys, info


def stop_options(caller: str, max_steps, rtol, atol) -> dict:
    """Keyword options of `solve` for the public function `caller`."""
    return dict(
        max_steps=max_steps,
        steady_state_rtol=rtol,
        steady_state_atol=atol,
        caller=caller,
    )


def check_max_steps(max_steps) -> None:
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    ):
        raise ValueError(
            f"`max_steps` must be a positive integer or None, got {max_steps!r}."
        )


def _stop_tolerances(rtol, atol, controller) -> tuple[Any, Any]:
    """The stop's tolerances; `None` takes the controller's (1e-3 without)."""
    if rtol is None:
        rtol = getattr(controller, "rtol", _FALLBACK_TOL)
    if atol is None:
        atol = getattr(controller, "atol", _FALLBACK_TOL)
    if _is_zero(rtol) and _is_zero(atol):
        raise ValueError(
            "`steady_state_rtol` and `steady_state_atol` cannot both be 0 (the "
            "stop would never fire)."
        )
    return rtol, atol


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and value == 0


def check_stop_signs(activities: list, rtol, atol, caller: str) -> list:
    """Runtime check (the tolerances are traced) that both are non-negative."""
    negative = (jnp.asarray(rtol) < 0) | (jnp.asarray(atol) < 0)
    return error_if(
        activities,
        negative,
        f"{caller}: `steady_state_rtol` and `steady_state_atol` must be non-negative.",
    )


@traced_floats(
    "weight_decay",
    "spectral_penalty",
    "activity_decay",
    "gamma",
    "output_energy_scaling",
    "hidden_energy_scaling",
    *STOP_FLOATS,
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
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
    record_iters: bool = False,
    record_every: float | None = None,
    max_steps: int | None = None,
    steady_state_rtol: Scalar | None = DEFAULT_STEADY_STATE_RTOL,
    steady_state_atol: Scalar | None = DEFAULT_STEADY_STATE_ATOL,
    return_info: bool = False,
) -> (
    list[Float[Array, "time batch ..."]]
    | tuple[list[Float[Array, "time batch ..."]], InferenceInfo]
):
    r"""Run inference $\dot z = -\partial\mathcal{F}/\partial z$ with a diffrax solver.

    Integrates from $t=0$ to `max_t1`, stopping early once every example's every
    layer is steady: $B\,\mathrm{rms}(\partial\mathcal{F}/\partial z_{l,i}) \le
    a + r\,\mathrm{rms}(z_{l,i})$ for every free layer $l$ and example $i$, with
    the stop's own tolerances $r$ = `steady_state_rtol`, $a$ = `steady_state_atol`
    (not the controller's). The factor $B$ undoes the $1/B$ of the batch-mean
    energy, so the stop does not depend on the batch size. When an adaptive step
    sits at the solver's stability limit, the stiffest mode stops decaying and
    keeps the field above the threshold although the state has converged; so the
    stop also fires when the test holds one exact line-search step further along
    the field and that step is itself within the tolerance (see the advanced-usage
    page). The ODE's time variables are in the activities' dtype, at least
    float32.

    **Arguments:**

    - `params`, `activities`: as for [`jpc.pc_energy_fn`][].
    - `output`: target `y` clamping the top layer.
    - `input`: optional `x` clamping the bottom layer (`None`: unsupervised).
    - `loss_id`, `param_type`, `weight_decay`, `spectral_penalty`,
        `activity_decay`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: energy options (see [`jpc.pc_energy_fn`][]).
    - `solver`: any diffrax solver.
    - `max_t1`: end time of the integration.
    - `dt`: initial (or, with `diffrax.ConstantStepSize`, fixed) step size;
        `None` lets an adaptive controller choose.
    - `stepsize_controller`: any diffrax step-size controller.
    - `record_iters`: save the state after every accepted step (row `k` is the
        state after step `k + 1`; the initial state is not a row, as in the JPC
        library, unless the solve takes no step (steady at the start), when it
        is row 0, at time 0; rows after the last step are `inf`, see
        [`jpc.get_t_max`][]).
    - `record_every`: save the state every `record_every` time units from $t=0$
        until the stop, then the final state (rows after it are `inf`).
    - `max_steps`: solver step budget; by default `ceil(max_t1 / dt) + 1` for a
        constant step, else 4096 (1024 when `record_iters`, which stores every
        step).
    - `steady_state_rtol`, `steady_state_atol`: tolerances of the steady-state
        stop (traced). `None` (default) takes the step-size controller's `rtol` and
        `atol` (`1e-3` for a controller without, such as
        `diffrax.ConstantStepSize`), so a tighter controller gives a tighter stop
        as before. The activities end within about this tolerance of the
        equilibrium; keep them no tighter than the controller's. A tolerance
        below the machine epsilon of the activities' dtype (e.g. the default
        `1e-3` with bfloat16) gives a one-time warning.
    - `return_info`: also return a [`jpc.InferenceInfo`][]: the time of each
        returned row, the number of accepted solver steps and whether the
        steady-state stop fired.

    The ODE's times are float32 for float16/bfloat16 activities (a half-precision
    time cannot hold a grid such as `0.05 k`); the solver then holds the state
    in float32, the field is evaluated in the activities' dtype and the result is
    returned in it.

    **Returns:**

    A list of activities with a leading time axis: length 1 (the final state)
    unless recording. When recording, the final state is the row
    [`jpc.get_t_max`][] points to. With `return_info=True`, the pair
    `(activities, info)`.

    **Raises:**

    `ValueError` for bad options or inputs (see [`jpc.pc_energy_fn`][]), a
    `max_steps` that is not a positive integer, or both stop tolerances `0`. At
    run time (`equinox.EquinoxRuntimeError`): NaN or inf in `output`, `input` or
    `activities`; activities that become non-finite during the solve; negative
    stop tolerances; or `max_steps` running out before `max_t1`.
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
        hidden_energy_scaling=hidden_energy_scaling,
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
        steady_state_rtol=steady_state_rtol,
        steady_state_atol=steady_state_atol,
        return_info=return_info,
    )
