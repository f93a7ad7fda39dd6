"""Hybrid (amortised) PC (SPEC §6.1): initialisation, energy, gradients, steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, central_fd_grad, ref_energy, ref_forward

import jpc


D_PRIOR, N, D_OBS, L, B = 2, 5, 4, 3, 4


def make_problem(key):
    kg, ka, ko, kl = jr.split(key, 4)
    generator = jpc.make_mlp(kg, D_PRIOR, N, L, D_OBS, "tanh", use_bias=True)
    amortiser = jpc.make_mlp(ka, D_OBS, N, L, D_PRIOR, "tanh", use_bias=True)
    obs = jr.normal(ko, (B, D_OBS))
    labels = jax.nn.one_hot(jr.randint(kl, (B,), 0, D_PRIOR), D_PRIOR)
    return generator, amortiser, obs, labels


def ref_amort(amortiser, generator, obs):
    guesses = ref_forward(amortiser, obs)[::-1]
    return [*guesses, ref_forward(generator[-1:], guesses[-1])[0]]


def ref_hpc_terms(amortiser, equilib, amort, obs, label=None):
    """Σ_i ||t_l - g(ẑ_{l+1})||² / B per generator layer l = 0..L-1 (no ½)."""
    targets = [label, *equilib[: L - 1]] if label is not None else list(equilib[:L])
    inputs = [*amort[1:L], obs]
    terms = []
    for i in range(L):
        layer = amortiser[L - 1 - i : L - i]
        pred = ref_forward(layer, inputs[i])[0]
        terms.append(jnp.sum((targets[i] - pred) ** 2) / B)
    return terms


def ref_hpc(*args, **kwargs):
    return sum(ref_hpc_terms(*args, **kwargs))


def equilibrium_like(key, supervised):
    sizes = [N, N, D_OBS] if supervised else [D_PRIOR, N, N, D_OBS]
    return [jr.normal(k, (B, n)) for k, n in zip(jr.split(key, len(sizes)), sizes)]


def test_init_activities_with_amort(key):
    generator, amortiser, obs, _ = make_problem(key)
    got = jpc.init_activities_with_amort(amortiser, generator, obs)
    assert [a.shape for a in got] == [(B, D_PRIOR), (B, N), (B, N), (B, D_OBS)]
    assert_trees_close(got, ref_amort(amortiser, generator, obs), rtol=1e-12)


@pytest.mark.parametrize("supervised", [True, False])
def test_hpc_energy_matches_formula(key, supervised):
    generator, amortiser, obs, labels = make_problem(key)
    label = labels if supervised else None
    amort = ref_amort(amortiser, generator, obs)
    equilib = equilibrium_like(jr.PRNGKey(7), supervised)
    # the library takes the free activities in amortiser order: [z_{L-1}, ..., z_0]
    amortiser_order = equilib[-2::-1]
    got = jpc.hpc_energy_fn(amortiser, amortiser_order, amort, obs, label)
    np.testing.assert_allclose(
        got, ref_hpc(amortiser, equilib, amort, obs, label), rtol=1e-12
    )
    layers = jpc.hpc_energy_fn(
        amortiser, amortiser_order, amort, obs, label, record_layers=True
    )
    terms = ref_hpc_terms(amortiser, equilib, amort, obs, label)[
        ::-1
    ]  # amortiser order
    np.testing.assert_allclose(layers, np.array(terms), rtol=1e-12)


def test_hpc_energy_vanishes_at_amortised_guesses(key):
    """Regressing the amortiser's own feedforward guesses costs nothing."""
    generator, amortiser, obs, _ = make_problem(key)
    amort = jpc.init_activities_with_amort(amortiser, generator, obs)
    guesses = amort[-2::-1]  # [ẑ_{L-1}, ..., ẑ_0], amortiser order
    assert float(jpc.hpc_energy_fn(amortiser, guesses, amort, obs)) < 1e-20


@pytest.mark.parametrize("supervised", [True, False])
def test_hpc_param_grads_against_autodiff_and_fd(key, supervised):
    generator, amortiser, obs, labels = make_problem(key)
    label = labels if supervised else None
    amort = ref_amort(amortiser, generator, obs)
    equilib = equilibrium_like(jr.PRNGKey(8), supervised)
    grads = jpc.compute_hpc_param_grads(amortiser, equilib[-2::-1], amort, obs, label)

    def f(m):
        return ref_hpc(m, equilib, amort, obs, label)

    assert_trees_close(grads, eqx.filter_grad(f)(amortiser), rtol=1e-10, atol=1e-14)
    fd = central_fd_grad(f, amortiser)
    assert_trees_close(eqx.filter(grads, eqx.is_array), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("supervised", [True, False])
def test_hpc_accepts_generator_list_with_output_slot(key, supervised):
    """The generator's own list (generator order, trailing output slot) and the
    amortiser-order list give the same loss and gradients, equal to the formula;
    so do `amort_activities` with and without their trailing slot."""
    generator, amortiser, obs, labels = make_problem(key)
    label = labels if supervised else None
    amort = jpc.init_activities_with_amort(amortiser, generator, obs)
    if supervised:  # exactly as `init_activities_with_ffwd` returns it
        equilib = jpc.init_activities_with_ffwd(generator, labels)
    else:
        equilib = equilibrium_like(jr.PRNGKey(9), supervised)
    want = ref_hpc(amortiser, equilib, amort, obs, label)
    want_terms = np.array(ref_hpc_terms(amortiser, equilib, amort, obs, label)[::-1])
    want_grads = eqx.filter_grad(ref_hpc)(amortiser, equilib, amort, obs, label)
    assert float(want) > 1e-3  # the equilibrium differs from the guesses
    for eq in (equilib, equilib[-2::-1]):
        for am in (amort, amort[:-1]):
            got = jpc.hpc_energy_fn(amortiser, eq, am, obs, label)
            np.testing.assert_allclose(got, want, rtol=1e-12)
            terms = jpc.hpc_energy_fn(amortiser, eq, am, obs, label, True)
            np.testing.assert_allclose(terms, want_terms, rtol=1e-12)
            grads = jpc.compute_hpc_param_grads(amortiser, eq, am, obs, label)
            assert_trees_close(grads, want_grads, rtol=1e-10, atol=1e-14)


def init_states(optims, generator, amortiser):
    return (
        optims[0].init((eqx.filter(generator, eqx.is_array), None)),
        optims[1].init(eqx.filter(amortiser, eqx.is_array)),
    )


def hand_hpc_step(generator, amortiser, optims, states, obs, label, lr, T):
    amort = ref_amort(amortiser, generator, obs)
    acts = amort if label is None else amort[1:]

    def gen_energy(model, a):
        return ref_energy(model, a, obs, x=label)

    grad_fn = jax.jit(jax.grad(lambda a: gen_energy(generator, a)))
    for _ in range(T):
        acts = [a - lr * g for a, g in zip(acts, grad_fn(acts))]
    g_gen = eqx.filter_grad(gen_energy)(generator, acts)
    updates, s_gen = optims[0].update(
        (g_gen, None), states[0], (eqx.filter(generator, eqx.is_array), None)
    )
    new_gen = eqx.apply_updates(generator, updates[0])
    g_am = eqx.filter_grad(ref_hpc)(amortiser, acts, amort, obs, label)
    updates, s_am = optims[1].update(
        g_am, states[1], eqx.filter(amortiser, eqx.is_array)
    )
    new_am = eqx.apply_updates(amortiser, updates)
    # losses of the JPC library: mean squared errors of the feedforward predictions
    gen_loss = None
    if label is not None:
        gen_loss = jnp.mean((obs - ref_forward(generator, label)[-1]) ** 2)
    target = label if label is not None else acts[0]
    am_loss = jnp.mean((target - amort[0]) ** 2)
    return new_gen, new_am, (s_gen, s_am), (amort, acts), (gen_loss, am_loss)


@pytest.mark.parametrize("supervised", [True, False])
@pytest.mark.slow
def test_make_hpc_step_equals_hand_loop(key, supervised):
    generator, amortiser, obs, labels = make_problem(key)
    label = labels if supervised else None
    optims = (optax.adam(1e-2), optax.sgd(0.1))
    states = init_states(optims, generator, amortiser)
    lr, T = 0.3 * B, 6
    out = jpc.make_hpc_step(
        generator,
        amortiser,
        optims,
        states,
        obs,
        input=label,
        activity_optim=optax.sgd(lr),
        n_inference_steps=T,
    )
    assert set(out) == {
        "generator",
        "amortiser",
        "opt_states",
        "activities",
        "t_max",
        "steady_state_reached",
        "losses",
        "energies",
    }
    gen, am, ref_states, (amort, acts), losses = hand_hpc_step(
        generator, amortiser, optims, states, obs, label, lr, T
    )
    assert_trees_close(out["generator"], gen, rtol=1e-10, atol=1e-14)
    assert_trees_close(out["amortiser"], am, rtol=1e-10, atol=1e-14)
    assert_trees_close(out["opt_states"], ref_states, rtol=1e-10, atol=1e-14)
    out_amort, out_equilib = out["activities"]
    assert_trees_close(list(out_amort), amort, rtol=1e-12)
    assert all(a.shape[0] == 1 for a in out_equilib)  # leading time axis
    assert_trees_close([a[-1] for a in out_equilib][:-1], acts[:-1], rtol=1e-10)
    if supervised:
        np.testing.assert_allclose(out["losses"][0], losses[0], rtol=1e-10)
    else:
        assert out["losses"][0] is None and losses[0] is None
    np.testing.assert_allclose(out["losses"][1], losses[1], rtol=1e-10)
    assert out["energies"] == (None, None)


@pytest.mark.slow
def test_make_hpc_step_reduces_losses_on_fixed_batch(key):
    """Default ODE inference; both losses fall over repeated steps on one batch."""
    generator, amortiser, obs, labels = make_problem(key)
    optims = (optax.adam(2e-2), optax.adam(2e-2))
    states = init_states(optims, generator, amortiser)
    history = []
    for _ in range(25):
        out = jpc.make_hpc_step(
            generator,
            amortiser,
            optims,
            states,
            obs,
            input=labels,
            max_t1=10,
            record_energies=True,
        )
        generator, amortiser, states = (
            out["generator"],
            out["amortiser"],
            out["opt_states"],
        )
        history.append([float(v) for v in out["losses"]])
    first, last = history[0], history[-1]
    assert last[0] < 0.7 * first[0] and last[1] < 0.7 * first[1]
    energies, amortiser_energies = out["energies"]
    t = int(out["t_max"])
    assert energies.shape[0] == L and np.all(np.isfinite(energies[:, : t + 1]))
    assert amortiser_energies.shape == (L,)


@pytest.mark.slow
def test_test_hpc_against_references(key):
    generator, amortiser, obs, labels = make_problem(key)
    k = jr.PRNGKey(11)
    sizes = [D_PRIOR, N, N, D_OBS]
    amort_acc, hybrid_acc, gen_acc, preds = jpc.test_hpc(
        generator, amortiser, obs, labels, k, sizes, B, max_t1=20
    )
    amort = ref_amort(amortiser, generator, obs)
    hits = jnp.argmax(amort[0], -1) == jnp.argmax(labels, -1)
    np.testing.assert_allclose(amort_acc, 100 * jnp.mean(hits), rtol=1e-12)
    eq = jpc.solve_inference((generator, None), amort, obs, max_t1=20)
    hits = jnp.argmax(eq[0][-1], -1) == jnp.argmax(labels, -1)
    np.testing.assert_allclose(hybrid_acc, 100 * jnp.mean(hits), rtol=1e-12)
    ref_acc, ref_preds = jpc.test_generative_pc(
        generator, obs, labels, k, sizes, B, max_t1=20
    )
    np.testing.assert_allclose(gen_acc, ref_acc, rtol=1e-12)
    np.testing.assert_allclose(preds, ref_forward(generator, labels)[-1], rtol=1e-12)
    np.testing.assert_allclose(ref_preds, preds, rtol=1e-12)


def test_errors_raise(key):
    generator, amortiser, obs, labels = make_problem(key)
    amort = jpc.init_activities_with_amort(amortiser, generator, obs)
    with pytest.raises(ValueError, match="`amortiser` must have one layer per layer"):
        jpc.init_activities_with_amort(amortiser[:-1], generator, obs)
    with pytest.raises(ValueError, match="`equilib_activities` must have 2 entries"):
        jpc.hpc_energy_fn(amortiser, amort, amort, obs, labels)
    with pytest.raises(ValueError, match="`equilib_activities` must have 3 entries"):
        jpc.hpc_energy_fn(amortiser, amort[:2], amort, obs)
    with pytest.raises(ValueError, match="`amort_activities` must have 4 entries"):
        jpc.hpc_energy_fn(amortiser, amort, amort[2:], obs)
    with pytest.raises(TypeError, match="`equilib_activities` must be a list"):
        jpc.hpc_energy_fn(amortiser, obs, amort, obs)
    with pytest.raises(TypeError, match="`amort_activities` must be a list"):
        jpc.hpc_energy_fn(amortiser, amort, obs, obs)
    with pytest.raises(ValueError, match="must have the same batch size"):
        jpc.hpc_energy_fn(amortiser, amort[1:], amort, obs, labels[:2])
    optims = (optax.sgd(0.1), optax.sgd(0.1))
    states = init_states(optims, generator, amortiser)
    with pytest.raises(TypeError, match="`optims` must be a pair"):
        jpc.make_hpc_step(generator, amortiser, optax.sgd(0.1), states, obs)
    with pytest.raises(ValueError, match="must be given together"):
        jpc.make_hpc_step(
            generator, amortiser, optims, states, obs, activity_optim=optax.sgd(0.1)
        )


def test_step_errors_name_the_arguments(key):
    """Bad `output`, `input`, `layer_sizes` and `batch_size` are named in the error."""
    generator, amortiser, obs, labels = make_problem(key)
    optims = (optax.sgd(0.1), optax.sgd(0.1))
    states = init_states(optims, generator, amortiser)
    with pytest.raises(ValueError, match="`input` and `output` must have the same"):
        jpc.make_hpc_step(generator, amortiser, optims, states, obs, input=labels[:2])
    with pytest.raises(ValueError, match="`output` \\(the observation"):
        jpc.make_hpc_step(generator, amortiser, optims, states, obs[:, :2])
    sizes = [D_PRIOR, N, N, D_OBS]
    with pytest.raises(ValueError, match="`layer_sizes` must have 4 entries.*got 3"):
        jpc.test_hpc(generator, amortiser, obs, labels, key, sizes[1:], B)
    with pytest.raises(ValueError, match=f"`batch_size` must equal .*\\({B}\\), got 7"):
        jpc.test_hpc(generator, amortiser, obs, labels, key, sizes, 7)
