"""Independent references for the test suite.

Everything here is written from the formulas of SPEC §2-§3 with explicit Python loops
over layers; it never calls the library's energy, gradient or inference code, so the
tests compare two independent implementations. Only `random_problem` uses
`jpc.make_mlp` / `jpc.make_skip_model` to build a model (their layout is itself
checked against hand-written formulas in `test_init.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.flatten_util import ravel_pytree

import jpc


# --------------------------------------------------------------------------- trees


def assert_trees_close(a, b, *, rtol=1e-10, atol=0.0, check_structure=True):
    """Assert two pytrees have the same structure and numerically close leaves."""
    if check_structure:
        sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
        assert sa == sb, f"tree structures differ:\n{sa}\n{sb}"
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb), f"{len(la)} leaves vs {len(lb)} leaves"
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        if callable(x) or callable(y):  # static-ish leaves such as Lambda's fn
            assert x is y or x == y, f"leaf {i}: {x!r} vs {y!r}"
            continue
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape, f"leaf {i}: shape {x.shape} vs {y.shape}"
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"leaf {i}")


def array_leaves(tree):
    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))


# --------------------------------------------------------------- activations


REF_ACT_FNS: dict[str, Callable] = {
    "linear": lambda z: z,
    "tanh": jnp.tanh,
    "hard_tanh": lambda z: jnp.clip(z, -1.0, 1.0),
    "relu": lambda z: jnp.maximum(z, 0.0),
    "silu": lambda z: z / (1.0 + jnp.exp(-z)),
    "selu": lambda z: (
        1.0507009873554804934193349852946
        * jnp.where(z > 0, z, 1.6732632423543772848170429916717 * (jnp.exp(z) - 1.0))
    ),
}


# --------------------------------------------------------------- scalings (§3.3)


def ref_scalings(param_type, *, D, fan_ins, skip_flags=None, gamma=None):
    """The a_l of SPEC §3.3, written from the table.

    `fan_ins[k]` is the fan-in of layer k+1's weight (N for hidden/output layers);
    `skip_flags[k]` says whether layer k+1 has a non-None skip.
    """
    L = len(fan_ins)
    skip_flags = skip_flags or [False] * L
    if param_type == "sp":
        a = [1.0] * L
    else:
        a = []
        for k in range(L):
            N = fan_ins[k]
            if k == 0:
                a.append(1.0 / math.sqrt(D))
            elif k == L - 1:
                a.append(1.0 / N if param_type == "mupc" else 1.0 / math.sqrt(N))
            elif skip_flags[k]:
                a.append(1.0 / math.sqrt(N * L))
            else:
                a.append(1.0 / math.sqrt(N))
    if gamma is not None:
        a[-1] = a[-1] / gamma
    return a


# --------------------------------------------------------------- forward / energy


def _apply(layer, z):
    return jax.vmap(layer)(z)


def _predict(model, skip_model, scalings, k, z_prev):
    pred = scalings[k] * _apply(model[k], z_prev)
    if skip_model is not None and skip_model[k] is not None:
        pred = pred + _apply(skip_model[k], z_prev)
    return pred


def ref_forward(model, x, *, skip_model=None, scalings=None):
    """Feedforward pass: list [z_1, ..., z_L] with z_l = a_l f_l(z_{k-1}) + s_l."""
    scalings = [1.0] * len(model) if scalings is None else scalings
    zs, z = [], x
    for k in range(len(model)):
        z = _predict(model, skip_model, scalings, k, z)
        zs.append(z)
    return zs


def _sum_per_example(v):
    return jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1)


def ref_output_loss(pred, y, loss="mse"):
    """Per-batch SUM (not mean) of the per-example output term without λ."""
    if loss == "mse":
        return 0.5 * jnp.sum(_sum_per_example(y - pred))
    logits = pred.reshape(pred.shape[0], -1)
    lse = jnp.log(jnp.sum(jnp.exp(logits - logits.max(-1, keepdims=True)), -1))
    log_sm = logits - logits.max(-1, keepdims=True) - lse[:, None]
    return -jnp.sum(y.reshape(y.shape[0], -1) * log_sm)


def ref_layer_energies(
    model,
    activities,
    y,
    *,
    x=None,
    skip_model=None,
    scalings=None,
    loss="mse",
    lam=1.0,
):
    """[E_1, ..., E_L], each the batch sum divided by B (SPEC §3.1), in layer order."""
    L = len(model)
    B = y.shape[0]
    scalings = [1.0] * L if scalings is None else scalings
    if x is None:
        z_prev, hidden = activities[0], list(activities[1:L])
    else:
        z_prev, hidden = x, list(activities[: L - 1])
    energies = []
    for k in range(L):
        pred = _predict(model, skip_model, scalings, k, z_prev)
        if k < L - 1:
            energies.append(0.5 * jnp.sum(_sum_per_example(hidden[k] - pred)) / B)
            z_prev = hidden[k]
        else:
            energies.append(lam * ref_output_loss(pred, y, loss) / B)
    return energies


def ref_regulariser(
    weights,
    activities,
    *,
    supervised,
    L,
    weight_decay=0.0,
    spectral_penalty=0.0,
    activity_decay=0.0,
):
    """R of SPEC §3.1 over an explicit list of weight arrays."""
    r = 0.0
    for W in weights:
        W2 = W.reshape(W.shape[0], -1)
        r = r + 0.5 * weight_decay * jnp.sum(W2**2)
        gram = W2.T @ W2 - jnp.eye(W2.shape[1])
        r = r + 0.5 * spectral_penalty * jnp.sum(gram**2)
    free = activities[: L - 1] if supervised else activities[:L]
    for z in free:
        r = r + 0.5 * activity_decay * jnp.mean(_sum_per_example(z))
    return r


def ref_energy(
    model,
    activities,
    y,
    *,
    x=None,
    skip_model=None,
    scalings=None,
    loss="mse",
    lam=1.0,
    weights=None,
    weight_decay=0.0,
    spectral_penalty=0.0,
    activity_decay=0.0,
):
    """Total energy F of SPEC §3.1 (batch-mean layer terms plus R)."""
    E = sum(
        ref_layer_energies(
            model,
            activities,
            y,
            x=x,
            skip_model=skip_model,
            scalings=scalings,
            loss=loss,
            lam=lam,
        )
    )
    if weights is None:
        weights = mlp_weights(model)
    return E + ref_regulariser(
        weights,
        activities,
        supervised=x is not None,
        L=len(model),
        weight_decay=weight_decay,
        spectral_penalty=spectral_penalty,
        activity_decay=activity_decay,
    )


def mlp_weights(model):
    """The weight matrices of a `make_mlp` model, read from its documented layout."""
    return [blk.layers[1].weight for blk in model]


# --------------------------------------------------------------- problems


@dataclasses.dataclass
class Problem:
    model: list
    skip_model: list | None
    x: Any
    y: Any
    activities: list
    widths: list
    scalings: list
    param_type: str
    loss: str
    act_fn: str
    gamma: float | None = None

    @property
    def params(self):
        return (self.model, self.skip_model)

    @property
    def L(self):
        return len(self.model)

    @property
    def B(self):
        return self.y.shape[0]

    @property
    def supervised(self):
        return self.x is not None

    def ref(self, activities=None, *, model=None, lam=1.0, **reg):
        """Reference energy at `activities` (default: the problem's own)."""
        model = self.model if model is None else model
        return ref_energy(
            model,
            self.activities if activities is None else activities,
            self.y,
            x=self.x,
            skip_model=self.skip_model,
            scalings=self.scalings,
            loss=self.loss,
            lam=lam,
            weights=mlp_weights(model),
            **reg,
        )

    def ffwd(self):
        return ref_forward(
            self.model, self.x, skip_model=self.skip_model, scalings=self.scalings
        )


def random_problem(
    key,
    widths: Sequence[int],
    batch: int,
    supervised: bool = True,
    skip: bool = False,
    *,
    act_fn: str = "tanh",
    param_type: str = "sp",
    use_bias: bool = False,
    loss: str = "mse",
    gamma: float | None = None,
    act_scale: float = 1.0,
) -> Problem:
    """Random model, data and (random, not feedforward) activities.

    `widths = [d_0, N, ..., N, d_L]` (L+1 entries; `make_mlp` has one hidden width).
    Supervised: x has width d_0 and activities are [z_1, ..., z_L]. Unsupervised:
    x is None and activities are [z_0, ..., z_L] (z_0 is the free latent).
    """
    widths = list(widths)
    L = len(widths) - 1
    hidden = widths[1:-1]
    assert len(set(hidden)) <= 1, "make_mlp has a single hidden width"
    width = hidden[0] if hidden else widths[-1]
    km, kx, ky, ka = jr.split(key, 4)
    model = jpc.make_mlp(
        km,
        widths[0],
        width,
        L,
        widths[-1],
        act_fn,
        use_bias=use_bias,
        param_type=param_type,
    )
    skip_model = jpc.make_skip_model(L) if skip else None
    x = jr.normal(kx, (batch, widths[0])) if supervised else None
    if loss == "mse":
        y = jr.normal(ky, (batch, widths[-1]))
    else:
        y = jax.nn.one_hot(jr.randint(ky, (batch,), 0, widths[-1]), widths[-1])
    sizes = widths[1:] if supervised else widths
    akeys = jr.split(ka, len(sizes))
    activities = [
        act_scale * jr.normal(k, (batch, n)) for k, n in zip(akeys, sizes, strict=True)
    ]
    skip_flags = (
        [False] * L if skip_model is None else [s is not None for s in skip_model]
    )
    scalings = ref_scalings(
        param_type,
        D=widths[0],
        fan_ins=widths[:-1],
        skip_flags=skip_flags,
        gamma=gamma,
    )
    return Problem(
        model=model,
        skip_model=skip_model,
        x=x,
        y=y,
        activities=activities,
        widths=widths,
        scalings=scalings,
        param_type=param_type,
        loss=loss,
        act_fn=act_fn,
        gamma=gamma,
    )


# --------------------------------------------------------------- compilation


@contextlib.contextmanager
def count_compiles():
    """Collect the names of XLA compilations that happen inside the block."""
    events = []

    def listener(name, *args, **kwargs):
        if "backend_compile" in name:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------- numerics


def central_fd_grad(f, tree, eps=1e-6):
    """Central finite-difference gradient of scalar `f` w.r.t. the arrays of `tree`."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    flat, unravel = ravel_pytree(arrays)
    g = jax.jit(lambda v: f(eqx.combine(unravel(v), static)))
    out = np.zeros(flat.shape, dtype=np.float64)
    for i in range(flat.shape[0]):
        e = jnp.zeros_like(flat).at[i].set(eps)
        out[i] = (float(g(flat + e)) - float(g(flat - e))) / (2 * eps)
    return unravel(jnp.asarray(out))


def free_slice(problem):
    """Indices of the free activities in the activities list."""
    return list(range(problem.L - 1)) if problem.supervised else list(range(problem.L))


def ref_equilibrium(problem, activities=None, *, lam=1.0, iters=60, **reg):
    """Minimise the reference energy over the free activities by Newton's method.

    Starts from the feedforward state (supervised) or from `activities`. Returns the
    full activities list (dummy last slot left as given).
    """
    if activities is None:
        activities = problem.ffwd() if problem.supervised else problem.activities
    activities = list(activities)
    idx = free_slice(problem)
    flat, unravel = ravel_pytree([activities[i] for i in idx])

    def energy(v):
        acts = list(activities)
        for i, z in zip(idx, unravel(v), strict=True):
            acts[i] = z
        return problem.ref(acts, lam=lam, **reg)

    grad = jax.jit(jax.grad(energy))
    hess = jax.jit(jax.hessian(energy))
    for _ in range(iters):
        g = grad(flat)
        if float(jnp.max(jnp.abs(g))) < 1e-15:
            break
        flat = flat - jnp.linalg.solve(hess(flat), g)
    g = grad(flat)
    assert float(jnp.max(jnp.abs(g))) < 1e-12, "Newton reference did not converge"
    for i, z in zip(idx, unravel(flat), strict=True):
        activities[i] = z
    return activities


def backprop_grads(problem, loss="mse"):
    """jax.grad of the batch-mean output loss of the feedforward pass w.r.t. model."""

    def loss_fn(model):
        pred = ref_forward(
            model, problem.x, skip_model=problem.skip_model, scalings=problem.scalings
        )[-1]
        return ref_output_loss(pred, problem.y, loss) / problem.B

    return eqx.filter_grad(loss_fn)(problem.model)


def ref_param_grads(problem, activities=None, *, lam=1.0, **reg):
    """eqx.filter_grad of the reference energy w.r.t. (model, skip_model)."""
    acts = problem.activities if activities is None else activities

    def f(params):
        model, skip_model = params
        return ref_energy(
            model,
            acts,
            problem.y,
            x=problem.x,
            skip_model=skip_model,
            scalings=problem.scalings,
            loss=problem.loss,
            lam=lam,
            weights=mlp_weights(model),
            **reg,
        )

    return eqx.filter_grad(f)((problem.model, problem.skip_model))


def ref_activity_grads(problem, activities=None, *, lam=1.0, **reg):
    acts = problem.activities if activities is None else activities
    return jax.grad(lambda a: problem.ref(a, lam=lam, **reg))(list(acts))


def sgd_apply(params, grads, lr):
    """Plain SGD on the array leaves of `params` (hand-written, not optax)."""
    return jax.tree_util.tree_map(
        lambda p, g: p if g is None else p - lr * g,
        params,
        grads,
        is_leaf=lambda v: v is None,
    )


def optax_param_update(optim, opt_state, model, skip_model, grads):
    """Apply one optax update to (model, skip_model) the documented way."""
    updates, opt_state = optim.update(
        grads, opt_state, (eqx.filter(model, eqx.is_array), skip_model)
    )
    model, skip_model = eqx.apply_updates((model, skip_model), updates)
    return model, skip_model, opt_state


def init_param_opt(optim, model, skip_model=None):
    return optim.init((eqx.filter(model, eqx.is_array), skip_model))


__all__ = [
    "assert_trees_close",
    "array_leaves",
    "REF_ACT_FNS",
    "ref_scalings",
    "ref_forward",
    "ref_output_loss",
    "ref_layer_energies",
    "ref_regulariser",
    "ref_energy",
    "mlp_weights",
    "Problem",
    "random_problem",
    "central_fd_grad",
    "free_slice",
    "ref_equilibrium",
    "backprop_grads",
    "ref_param_grads",
    "ref_activity_grads",
    "sgd_apply",
    "optax_param_update",
    "init_param_opt",
]
