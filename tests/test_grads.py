"""Activity and parameter gradients (SPEC §3.2) against jax.grad of the reference
energy and central finite differences (float64)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    array_leaves,
    assert_trees_close,
    backprop_grads,
    central_fd_grad,
    random_problem,
    ref_activity_grads,
    ref_energy,
    ref_equilibrium,
    ref_param_grads,
)

import jpc


WIDTHS = [4, 5, 5, 5, 3]
FD_RTOL, FD_ATOL = 1e-6, 1e-8


def lib_activity_grad(p, activities=None, **kw):
    return jpc.compute_pc_activity_grad(
        p.params,
        p.activities if activities is None else activities,
        p.y,
        x=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
        **kw,
    )


def lib_param_grads(p, activities=None, **kw):
    return jpc.compute_pc_param_grads(
        p.params,
        p.activities if activities is None else activities,
        p.y,
        x=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
        **kw,
    )


CASES = [
    dict(loss="mse", param_type="sp", skip=False, supervised=True),
    dict(loss="ce", param_type="sp", skip=True, supervised=True),
    dict(loss="mse", param_type="mupc", skip=True, supervised=True, gamma=2.0),
    dict(loss="ce", param_type="ntp", skip=False, supervised=True),
    dict(loss="mse", param_type="sp", skip=False, supervised=False),
    dict(loss="mse", param_type="mupc", skip=True, supervised=False),
    dict(loss="mse", param_type="ntp", skip=True, supervised=False),
]
REGS = [
    {},
    {"output_energy_scaling": 0.3},
    {"weight_decay": 0.2, "spectral_penalty": 0.05, "activity_decay": 0.3},
]


def _problem(key, case, **kw):
    case = dict(case)
    supervised = case.pop("supervised")
    skip = case.pop("skip")
    return random_problem(key, WIDTHS, 3, supervised, skip, use_bias=True, **case, **kw)


def _split_lam(reg):
    reg = dict(reg)
    lam = reg.pop("output_energy_scaling", 1.0)
    return lam, reg


# ------------------------------------------------------------------ activities


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.slow
def test_activity_grad_matches_autodiff_of_reference(key, case, reg):
    p = _problem(key, case)
    lam, ref_reg = _split_lam(reg)
    energy, grads = lib_activity_grad(p, **reg)
    np.testing.assert_allclose(energy, p.ref(lam=lam, **ref_reg), rtol=1e-10)
    want = ref_activity_grads(p, lam=lam, **ref_reg)
    assert len(grads) == len(p.activities)
    assert_trees_close(list(grads), want, rtol=1e-10, atol=1e-14, check_structure=False)


@pytest.mark.parametrize("supervised", [True, False])
def test_activity_grad_dummy_slot_is_zero(key, supervised):
    p = random_problem(key, WIDTHS, 3, supervised)
    _, grads = lib_activity_grad(p, activity_decay=0.5)
    np.testing.assert_array_equal(grads[-1], jnp.zeros_like(p.activities[-1]))
    assert grads[-1].shape == p.activities[-1].shape
    # every free activity has a non-trivial gradient (random, non-equilibrium state)
    for g in grads[:-1]:
        assert float(jnp.max(jnp.abs(g))) > 1e-3


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:6])
def test_activity_grad_matches_finite_differences(key, case):
    p = _problem(key, case)
    reg = dict(weight_decay=0.1, activity_decay=0.2, output_energy_scaling=0.7)
    _, grads = lib_activity_grad(p, **reg)

    def lib_F(acts):
        return jpc.pc_energy_fn(
            p.params,
            acts,
            p.y,
            x=p.x,
            loss=p.loss,
            param_type=p.param_type,
            gamma=p.gamma,
            **reg,
        )

    fd = central_fd_grad(lib_F, list(p.activities))
    assert_trees_close(
        list(grads), fd, rtol=FD_RTOL, atol=FD_ATOL, check_structure=False
    )
    lam, ref_reg = _split_lam(reg)
    fd_ref = central_fd_grad(lambda a: p.ref(a, lam=lam, **ref_reg), list(p.activities))
    assert_trees_close(
        list(grads), fd_ref, rtol=FD_RTOL, atol=FD_ATOL, check_structure=False
    )


@pytest.mark.slow
def test_activity_grad_per_example_scales_as_one_over_B(key):
    """vmap = loop: the batch gradient row i is the single-example gradient / B."""
    B = 4
    p = random_problem(key, WIDTHS, B)
    _, full = lib_activity_grad(p)
    for i in range(B):
        acts = [a[i : i + 1] for a in p.activities]
        _, single = jpc.compute_pc_activity_grad(
            p.params, acts, p.y[i : i + 1], x=p.x[i : i + 1]
        )
        for gf, gs in zip(full, single, strict=True):
            np.testing.assert_allclose(gf[i : i + 1], gs / B, rtol=1e-10, atol=1e-15)


@pytest.mark.slow
def test_activity_grad_vmap_equals_loop(key):
    p = random_problem(key, WIDTHS, 3)
    ys = jr.normal(jr.PRNGKey(4), (4,) + p.y.shape)
    vm = jax.vmap(
        lambda y: jpc.compute_pc_activity_grad(p.params, p.activities, y, x=p.x)[1]
    )(ys)
    for j, y in enumerate(ys):
        _, g = jpc.compute_pc_activity_grad(p.params, p.activities, y, x=p.x)
        for a, b in zip(vm, g, strict=True):
            np.testing.assert_allclose(a[j], b, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("n_args", [8, 10])
def test_neg_pc_activity_grad_is_minus_gradient(key, n_args):
    p = random_problem(key, WIDTHS, 3, param_type="mupc", skip=True, gamma=1.5)
    args = (p.params, p.y, p.x, "mse", "mupc", 0.1, 0.05, 0.2, 1.5, 0.5)
    ref_reg = dict(weight_decay=0.1, spectral_penalty=0.05, activity_decay=0.2)
    lam = 0.5
    if n_args == 8:
        args = args[:8]
        p = random_problem(key, WIDTHS, 3, param_type="mupc", skip=True)
        lam = 1.0
    vf = jpc.neg_pc_activity_grad(0.0, p.activities, args)
    want = ref_activity_grads(p, lam=lam, **ref_reg)
    assert_trees_close(
        list(vf), [-g for g in want], rtol=1e-10, atol=1e-14, check_structure=False
    )


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reg", REGS)
def test_param_grads_match_autodiff_of_reference(key, case, reg):
    p = _problem(key, case)
    lam, ref_reg = _split_lam(reg)
    model_grads, skip_grads = lib_param_grads(p, **reg)
    want_model, want_skip = ref_param_grads(p, lam=lam, **ref_reg)
    assert_trees_close(model_grads, want_model, rtol=1e-10, atol=1e-14)
    if p.skip_model is None:
        assert skip_grads is None
    else:
        assert array_leaves(skip_grads) == []


def test_param_grads_with_trainable_skips(key):
    p = random_problem(key, WIDTHS, 3, param_type="mupc")
    ks = jr.split(jr.PRNGKey(8), 2)
    skip = [None, eqx.nn.Linear(5, 5, key=ks[0]), eqx.nn.Linear(5, 5, key=ks[1]), None]
    p.skip_model = skip
    # hidden layers now have skips: recompute the reference scalings
    from helpers import ref_scalings

    p.scalings = ref_scalings(
        "mupc", D=4, fan_ins=[4, 5, 5, 5], skip_flags=[s is not None for s in skip]
    )
    got = lib_param_grads(p, weight_decay=0.3)
    want = ref_param_grads(p, weight_decay=0.3)
    assert_trees_close(got, want, rtol=1e-10, atol=1e-14)
    assert float(jnp.max(jnp.abs(got[1][1].weight))) > 1e-4


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]])
def test_param_grads_match_finite_differences(key, case):
    p = _problem(key, case)
    reg = dict(weight_decay=0.1, spectral_penalty=0.05, output_energy_scaling=0.6)
    model_grads, _ = lib_param_grads(p, **reg)

    def lib_F(model):
        return jpc.pc_energy_fn(
            (model, p.skip_model),
            p.activities,
            p.y,
            x=p.x,
            loss=p.loss,
            param_type=p.param_type,
            gamma=p.gamma,
            **reg,
        )

    fd = central_fd_grad(lib_F, p.model)
    assert_trees_close(
        array_leaves(model_grads), array_leaves(fd), rtol=FD_RTOL, atol=FD_ATOL
    )


def test_param_grads_jit_equals_eager(key):
    p = random_problem(key, WIDTHS, 3, skip=True, param_type="ntp")
    eager = jpc.compute_pc_param_grads(
        p.params, p.activities, p.y, x=p.x, param_type="ntp", weight_decay=0.2
    )
    jitted = eqx.filter_jit(
        lambda params, a, y, x: jpc.compute_pc_param_grads(
            params, a, y, x=x, param_type="ntp", weight_decay=0.2
        )
    )(p.params, p.activities, p.y, p.x)
    assert_trees_close(jitted, eager, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("param_type", ["sp", "mupc", "ntp"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("skip", [False, True])
def test_output_layer_grad_at_ffwd_equals_backprop(key, param_type, loss, skip):
    """SPEC §3.2: at the feedforward state only the output error is non-zero; the
    output layer's PC gradient equals backprop's, the others vanish."""
    p = random_problem(
        key, WIDTHS, 4, skip=skip, param_type=param_type, loss=loss, use_bias=True
    )
    acts = p.ffwd()
    model_grads, _ = lib_param_grads(p, acts)
    bp = backprop_grads(p, loss)
    assert_trees_close(model_grads[-1], bp[-1], rtol=1e-10, atol=1e-14)
    for g in model_grads[:-1]:
        for leaf in array_leaves(g):
            np.testing.assert_allclose(leaf, 0.0, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("param_type,skip", [("sp", False), ("mupc", True)])
def test_pc_grads_over_lambda_converge_to_backprop(key, param_type, skip):
    """SPEC §3.2: as λ → 0, PC parameter gradients at equilibrium / λ → backprop.

    The equilibrium is found by an independent Newton solve of the reference energy;
    the gap to backprop must shrink roughly linearly in λ.
    """
    p = random_problem(key, [3, 4, 4, 4, 2], 3, skip=skip, param_type=param_type)
    bp = array_leaves(backprop_grads(p))
    bp_flat = jnp.concatenate([g.ravel() for g in bp])
    errs = []
    for lam in [1e-1, 1e-2, 1e-3, 1e-4]:
        eq = ref_equilibrium(p, lam=lam)
        g, _ = lib_param_grads(p, eq, output_energy_scaling=lam)
        pc_flat = jnp.concatenate([v.ravel() for v in array_leaves(g)]) / lam
        errs.append(
            float(jnp.linalg.norm(pc_flat - bp_flat) / jnp.linalg.norm(bp_flat))
        )
    assert errs[-1] < 1e-3, errs
    for a, b in zip(errs, errs[1:], strict=False):
        assert b < a / 5, errs


def test_equilibrium_grads_differ_from_backprop_at_lambda_one(key):
    """Sanity: the λ → 0 limit is not trivial (at λ = 1 hidden grads are not BP)."""
    p = random_problem(key, [3, 4, 4, 2], 3)
    eq = ref_equilibrium(p)
    g, _ = lib_param_grads(p, eq)
    bp = backprop_grads(p)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(array_leaves(g), array_leaves(bp), strict=True)
    )
    assert diff > 1e-4


def test_activity_grad_zero_at_reference_equilibrium(key):
    p = random_problem(key, [3, 4, 4, 2], 3, param_type="mupc", skip=True)
    eq = ref_equilibrium(p)
    _, g = lib_activity_grad(p, eq)
    for v in g:
        np.testing.assert_allclose(v, 0.0, atol=1e-12)
    # and the equilibrium lowers the energy below the feedforward one
    assert float(p.ref(eq)) < float(p.ref(p.ffwd()))


def test_grad_of_weight_decay_term(key):
    """Only the regulariser differs: difference of grads is weight_decay · W."""
    p = random_problem(key, [3, 4, 2], 2, use_bias=True)
    g0, _ = lib_param_grads(p)
    g1, _ = lib_param_grads(p, weight_decay=0.4)
    for blk0, blk1, blk in zip(g0, g1, p.model, strict=True):
        np.testing.assert_allclose(
            blk1.layers[1].weight - blk0.layers[1].weight,
            0.4 * blk.layers[1].weight,
            rtol=1e-10,
            atol=1e-14,
        )
        np.testing.assert_allclose(blk1.layers[1].bias, blk0.layers[1].bias, rtol=1e-12)


def test_ref_energy_sanity():
    """The reference itself: a one-layer model reduces to λ/2 ‖y − W x‖² / B."""
    model = jpc.make_mlp(jr.PRNGKey(0), 2, 2, 1, 2, "linear")
    x = jnp.array([[1.0, 2.0]])
    y = jnp.array([[0.0, 1.0]])
    W = model[0].layers[1].weight
    want = 0.5 * 0.3 * jnp.sum((y[0] - W @ x[0]) ** 2)
    got = ref_energy(model, [jnp.zeros((1, 2))], y, x=x, lam=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-12)
