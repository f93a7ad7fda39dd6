"""The yardstick: a minimal pure-JAX PC training step and backprop step.

Parameters are a list of `(W, b)` with `W` of shape `(out, in)` (the layout of
`eqx.nn.Linear`), layer `l` predicts `z_l = W_l φ_l(z_{l-1}) + b_l` with `φ_1` the
identity (the layout of `jpc.make_mlp`). One `jax.jit` holds the whole step: the
feedforward initialisation, `T` SGD steps on the hidden activities in a
`lax.fori_loop`, the parameter gradient at the final state and an Adam update.
The energy is the standard PC energy with the batch-mean normalisation and an
MSE output term. `make_ode_pc_step` is the same step with the default
continuous-time inference instead (diffrax's Heun solver, a PID controller and the
steady-state stop, written directly with `jax.grad`/`jax.jvp`).
No jpc code is used here.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


Params = list[tuple[jax.Array, jax.Array]]


def _layer(params: Params, act: Callable, i: int, z: jax.Array) -> jax.Array:
    w, b = params[i]
    h = z if i == 0 else act(z)
    return h @ w.T + b


def feedforward(params: Params, act: Callable, x: jax.Array) -> list[jax.Array]:
    zs, z = [], x
    for i in range(len(params)):
        z = _layer(params, act, i, z)
        zs.append(z)
    return zs


def energy(params: Params, hidden: list, x, y, act: Callable) -> jax.Array:
    """Batch-mean energy; `hidden` is `[z_1, ..., z_{L-1}]`."""
    inputs = [x, *hidden]
    targets = [*hidden, y]
    total = 0.0
    for i, (z_in, z_out) in enumerate(zip(inputs, targets)):
        total = total + 0.5 * jnp.sum((z_out - _layer(params, act, i, z_in)) ** 2)
    return total / y.shape[0]


def bp_loss(params: Params, x, y, act: Callable) -> jax.Array:
    return 0.5 * jnp.sum((y - feedforward(params, act, x)[-1]) ** 2) / y.shape[0]


def adam_init(params: Params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return (jnp.zeros((), jnp.int32), zeros, zeros)


def adam_update(params, grads, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam as in `optax.adam` (bias-corrected moments, `eps` outside the root)."""
    count, mu, nu = state
    count = count + 1
    tmap = jax.tree_util.tree_map
    mu = tmap(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
    nu = tmap(lambda v, g: b2 * v + (1 - b2) * g**2, nu, grads)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    params = tmap(
        lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, mu, nu
    )
    return params, (count, mu, nu)


def infer(params: Params, x, y, act: Callable, n_steps: int, activity_lr: float):
    """Feedforward init, then `n_steps` SGD steps on the hidden activities in a
    `lax.fori_loop`; returns `[z_1, ..., z_{L-1}]`."""
    grad_z = jax.grad(energy, argnums=1)

    def body(_, zs):
        grads = grad_z(params, zs, x, y, act)
        return [z - activity_lr * g for z, g in zip(zs, grads)]

    return jax.lax.fori_loop(0, n_steps, body, feedforward(params, act, x)[:-1])


@functools.cache
def make_pc_step(act: Callable, n_steps: int, activity_lr: float, param_lr: float):
    """`step(params, opt_state, x, y) -> (params, opt_state, energy)`, one `jax.jit`.

    Feedforward init → `n_steps` SGD activity steps in a `lax.fori_loop` → Adam on
    the parameters at the final activities. Hyperparameters are closed over, so a
    call passes only arrays (the fastest dispatch `jax.jit` has).
    """

    @jax.jit
    def step(params, opt_state, x, y):
        hidden = infer(params, x, y, act, n_steps, activity_lr)
        e, grads = jax.value_and_grad(energy)(params, hidden, x, y, act)
        params, opt_state = adam_update(params, grads, opt_state, param_lr)
        return params, opt_state, e

    return step


@functools.cache
def make_bp_step(act: Callable, param_lr: float):
    """`step(params, opt_state, x, y) -> (params, opt_state, loss)`: backprop + Adam."""

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(bp_loss)(params, x, y, act)
        params, opt_state = adam_update(params, grads, opt_state, param_lr)
        return params, opt_state, loss

    return step


# ------------------------------------------------------------------ ODE inference
# The default continuous-time inference of the package, written directly:
# dz/dt = -∂F/∂z with diffrax's Heun solver and a PID step-size controller from
# t = 0 to `max_t1`, stopping once every example's every hidden layer is steady
# (B·rms(∂F/∂z) <= atol + rtol·rms(z); B undoes the batch mean), or when that holds
# one exact line-search step along the field further, with the step's own length
# within the same tolerance (`stop="polish"`; `"plain"` keeps the plain test only;
# `"none"` integrates to `max_t1` with no stop, the cost of a solve whose stop
# evaluates nothing, like the JPC library's, whose event tests the state).


def _ratio(fields: list, zs: list, rtol: float, atol: float) -> jax.Array:
    """max over layers and examples of B·rms(f) / (atol + rtol·rms(z))."""
    batch = zs[0].shape[0]

    def rms(a):
        return jnp.sqrt(jnp.mean(a**2, axis=1))

    ratios = [batch * rms(f) / (atol + rtol * rms(z)) for f, z in zip(fields, zs)]
    return jnp.max(jnp.stack([jnp.max(r) for r in ratios]))


def infer_ode(
    params: Params,
    x,
    y,
    act: Callable,
    max_t1: float,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    stop: str = "polish",
):
    """Feedforward init, then the ODE solve; returns `[z_1, ..., z_{L-1}]`."""
    import diffrax as dfx  # only the ODE yardstick needs it

    batch = y.shape[0]

    def field(zs):
        grads = jax.grad(energy, argnums=1)(params, zs, x, y, act)
        return [-g for g in grads]

    def polished(zs, fs):
        d = [batch * f for f in fs]
        _, neg_hd = jax.jvp(field, (zs,), (d,))
        sq = sum(jnp.sum(di**2, axis=1) for di in d)
        curv = -batch * sum(jnp.sum(di * hi, axis=1) for di, hi in zip(d, neg_hd))
        step = jnp.where(curv > 0, sq / jnp.where(curv > 0, curv, 1), 0)
        moves = [step[:, None] * di for di in d]
        new = field([z + m for z, m in zip(zs, moves)])
        moved = [m / batch for m in moves]
        return jnp.maximum(_ratio(new, zs, rtol, atol), _ratio(moved, zs, rtol, atol))

    def cond_fn(t, zs, args, **kwargs):
        fs = field(zs)
        ratio = _ratio(fs, zs, rtol, atol)
        if stop == "plain":
            return ratio <= 1
        return jax.lax.cond(
            (ratio > 1) & (ratio < 1e3),
            lambda: polished(zs, fs) <= 1,
            lambda: ratio <= 1,
        )

    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, zs, args: field(zs)),
        dfx.Heun(),
        0.0,
        max_t1,
        None,
        feedforward(params, act, x)[:-1],
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
        event=None if stop == "none" else dfx.Event(cond_fn),
        max_steps=4096,
    )
    return [z[-1] for z in sol.ys]


@functools.cache
def make_ode_pc_step(act: Callable, max_t1: float, param_lr: float, stop="polish"):
    """`step(params, opt_state, x, y) -> (params, opt_state, energy)`, one `jax.jit`.

    Feedforward init → the ODE solve of `infer_ode` → Adam on the parameters at
    the final activities.
    """

    @jax.jit
    def step(params, opt_state, x, y):
        hidden = infer_ode(params, x, y, act, max_t1, stop=stop)
        e, grads = jax.value_and_grad(energy)(params, hidden, x, y, act)
        params, opt_state = adam_update(params, grads, opt_state, param_lr)
        return params, opt_state, e

    return step
