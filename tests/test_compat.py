"""Drop-in compatibility with the JPC library's layouts and argument forms (SPEC §14).

One test per item of §14.1-§14.6, each checking the value or layout stated there on
small hand-made inputs, against numbers worked out by hand, `jax.grad` of a
hand-written energy, or central finite differences (float64, see conftest.py).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, central_fd_grad

import jpc


def linear(weight, bias=None):
    """An `eqx.nn.Linear` holding the given (hand-chosen) weight and bias."""
    weight = jnp.asarray(weight, dtype=float)
    out_dim, in_dim = weight.shape
    layer = eqx.nn.Linear(in_dim, out_dim, use_bias=bias is not None, key=jr.PRNGKey(0))
    layer = eqx.tree_at(lambda m: m.weight, layer, weight)
    if bias is not None:
        layer = eqx.tree_at(lambda m: m.bias, layer, jnp.asarray(bias, dtype=float))
    return layer


def tanh_block(weight, bias=None):
    """`Sequential([Lambda(tanh), Linear])`, the layout of `jpc.make_mlp`."""
    return eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh), linear(weight, bias)])


# ------------------------------------------------------------------ §14.1 names, args


def test_check_param_type():
    for name in ("sp", "mupc", "ntp"):
        assert jpc._check_param_type(name) is None
    for bad in ("mup", "SP", None, 3):
        with pytest.raises(ValueError, match="Invalid parameterisation"):
            jpc._check_param_type(bad)


@pytest.mark.slow
def test_neg_pc_activity_grad_accepts_eleven_tuple():
    """`(params, y, x, loss_id, param_type, wd, sp, ad, gamma, lam, controller)`."""
    model = [linear([[1.0, -2.0], [0.5, 0.0]]), linear([[2.0, 1.0]])]
    x = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    y = jnp.array([[0.5], [1.5]])
    z = [jnp.array([[0.1, 0.2], [0.3, -0.4]]), jnp.zeros((2, 1))]
    args = ((model, None), y, x, "mse", "sp", 0.1, 0.0, 0.2, 2.0, 0.5)
    controller = diffrax.PIDController(rtol=1e-3, atol=1e-3)
    got = jpc.neg_pc_activity_grad(0.0, z, args + (controller,))

    def energy(z1):  # hand-written: ½‖z1 − W1 x‖² + λ ½‖y − W2 z1 / γ‖², /B, + decay
        w1, w2 = model[0].weight, model[1].weight
        e1 = 0.5 * jnp.sum((z1 - x @ w1.T) ** 2)
        e2 = 0.5 * 0.5 * jnp.sum((y - z1 @ w2.T / 2.0) ** 2)
        wd = 0.5 * 0.1 * (jnp.sum(w1**2) + jnp.sum(w2**2))
        return (e1 + e2) / 2 + wd + 0.5 * 0.2 * jnp.sum(z1**2) / 2

    np.testing.assert_allclose(got[0], -jax.grad(energy)(z[0]), rtol=1e-12)
    assert not np.any(np.asarray(got[1]))
    assert_trees_close(got, jpc.neg_pc_activity_grad(0.0, z, args), rtol=1e-14)


@pytest.mark.slow
def test_update_bpc_params_takes_four_optimiser_arguments():
    """`(td, bu, z, td_optim, bu_optim, td_state, bu_state, y)` → models, grads,
    opt_states; gradients of the hand-written bPC energy of a 1-hidden-layer net."""
    td = [linear([[1.0, 0.5]]), linear([[2.0]])]
    bu = [linear([[0.5], [-1.0]]), linear([[1.5]])]
    x, y, z = jnp.array([[1.0, 2.0]]), jnp.array([[3.0]]), [jnp.array([[0.5]])]

    def energy(models):
        (f0, f1), (g0, g1) = models
        z1 = z[0]
        terms = [
            z1 - x @ f0.weight.T,
            y - z1 @ f1.weight.T,
            x - z1 @ g0.weight.T,
            z1 - y @ g1.weight.T,
        ]
        return sum(0.5 * jnp.sum(t**2) for t in terms)

    td_optim, bu_optim = optax.sgd(0.1), optax.adam(0.01)
    td_state = td_optim.init(eqx.filter(td, eqx.is_array))
    bu_state = bu_optim.init(eqx.filter(bu, eqx.is_array))
    out = jpc.update_bpc_params(
        td, bu, z, td_optim, bu_optim, td_state, bu_state, y, input=x
    )
    assert set(out) == {"models", "grads", "opt_states"}
    want = eqx.filter_grad(energy)((td, bu))
    assert_trees_close(out["grads"], want, rtol=1e-12)
    for model, g, optim, state, got in zip(
        (td, bu), want, (td_optim, bu_optim), (td_state, bu_state), out["models"]
    ):
        updates, _ = optim.update(g, state, eqx.filter(model, eqx.is_array))
        assert_trees_close(got, eqx.apply_updates(model, updates), rtol=1e-12)


# ------------------------------------------------------------------ §14.2 metrics


def test_compute_activity_norms_is_batch_mean_of_example_norms():
    acts = [
        jnp.array([[3.0, 4.0], [0.0, 0.0]]),  # norms 5, 0 -> 2.5
        jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [1.0, 0.0]]]),  # 1, 3 -> 2
    ]
    np.testing.assert_allclose(jpc.compute_activity_norms(acts), [2.5, 2.0])


def test_compute_param_norms_layout():
    model = [tanh_block([[3.0, 4.0]], [12.0]), linear([[1.0], [2.0]])]
    skip = [None, linear([[0.0], [6.0]], [8.0, 0.0])]
    norms, skip_norms = jpc.compute_param_norms((model, skip))
    # tree_leaves(model): tanh (not an array), W1, b1, W2
    assert len(jax.tree_util.tree_leaves(model)) == 4
    np.testing.assert_allclose(norms, [0.0, 5.0, 12.0, np.sqrt(5.0)])
    np.testing.assert_allclose(skip_norms, [6.0, 8.0])
    norms, skip_norms = jpc.compute_param_norms((model, None))
    assert skip_norms is None and norms.shape == (4,)


def test_make_mlp_param_norms_layout(key):
    """make_mlp's first activation (the identity) holds no leaf, later ones one:
    norms are [|W1|, |b1|, 0, |W2|, |b2|, 0, |W3|, |b3|]."""
    model = jpc.make_mlp(key, 3, 4, 3, 2, "tanh", use_bias=True)
    assert jax.tree_util.tree_leaves(model[0].layers[0]) == []
    linears = [block.layers[1] for block in model]
    want = []
    for i, lin in enumerate(linears):
        want += ([] if i == 0 else [0.0]) + [
            float(jnp.linalg.norm(lin.weight)),
            float(jnp.linalg.norm(lin.bias)),
        ]
    norms, skip_norms = jpc.compute_param_norms((model, jpc.make_skip_model(3)))
    assert len(jax.tree_util.tree_leaves(model)) == 8
    np.testing.assert_allclose(norms, want, rtol=1e-12)
    assert skip_norms.shape == (0,)  # identity skips hold no leaves either
    x = jr.normal(jr.PRNGKey(3), (5, 3))
    w = [lin.weight for lin in linears]
    b = [lin.bias for lin in linears]
    got = jpc.init_activities_with_ffwd(model, x)
    np.testing.assert_allclose(got[-1], ref_forward(w, b, x)[-1], rtol=1e-12)


@pytest.mark.parametrize("use_bias", [False, True])
def test_make_mlp_gives_each_linear_one_split_key(key, use_bias):
    """`keys = split(key, depth)`, layer i is `eqx.nn.Linear(..., key=keys[i])`;
    for "mupc"/"ntp" its weight is redrawn as `normal(keys[i], shape)`."""
    dims, depth = [3, 4, 4, 2], 3
    keys = jr.split(key, depth)
    want = [
        eqx.nn.Linear(dims[i], dims[i + 1], use_bias=use_bias, key=keys[i])
        for i in range(depth)
    ]
    sp = jpc.make_mlp(key, 3, 4, depth, 2, "relu", use_bias=use_bias)
    assert_trees_close([blk.layers[1] for blk in sp], want, rtol=0)
    for param_type in ("mupc", "ntp"):
        model = jpc.make_mlp(key, 3, 4, depth, 2, "relu", use_bias, param_type)
        for i, blk in enumerate(model):
            normal = jr.normal(keys[i], want[i].weight.shape)
            np.testing.assert_array_equal(blk.layers[1].weight, normal)
            if use_bias:
                np.testing.assert_array_equal(blk.layers[1].bias, want[i].bias)


def ref_forward(weights, biases, x):
    """`make_mlp` forward pass by hand: z1 = W0 x + b0, z_l = W tanh(z_{l-1}) + b."""
    z, out = x, []
    for i, (w, b) in enumerate(zip(weights, biases)):
        z = (z if i == 0 else jnp.tanh(z)) @ w.T + b
        out.append(z)
    return out


@pytest.mark.slow
def test_make_pc_step_metrics_and_energies_layout(key):
    """acc of the updated model, param norms before the update, energies at the
    final state in record_layers order, t_max = 0 when not recording."""
    model = jpc.make_mlp(key, 3, 4, 3, 2, "tanh", use_bias=True)
    x = jr.normal(jr.PRNGKey(1), (6, 3))
    y = jax.nn.one_hot(jnp.array([0, 1, 1, 0, 1, 0]), 2)
    optim = optax.sgd(0.5)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    out = jpc.make_pc_step(
        model,
        optim,
        state,
        y,
        input=x,
        activity_optim=optax.sgd(0.5),
        n_inference_steps=4,
        calculate_accuracy=True,
        param_norms=True,
        grad_norms=True,
    )
    weights = [m.layers[1].weight for m in out["model"]]
    biases = [m.layers[1].bias for m in out["model"]]
    pred = ref_forward(weights, biases, x)[-1]
    acc = 100 * np.mean(np.argmax(pred, 1) == np.argmax(y, 1))
    np.testing.assert_allclose(out["acc"], acc)
    leaves = jax.tree_util.tree_leaves(model)
    assert len(leaves) == 8  # W, b, then 2 x (act fn, W, b)
    want = [float(jnp.linalg.norm(v)) if eqx.is_array(v) else 0.0 for v in leaves]
    np.testing.assert_allclose(out["model_param_norms"], want, rtol=1e-12)
    assert out["skip_model_param_norms"] is None
    assert out["model_grad_norms"].shape == (len(leaves),)
    assert int(out["t_max"]) == 0
    z1, z2, _ = [a[-1] for a in out["activities"]]
    w = [m.layers[1].weight for m in model]
    b = [m.layers[1].bias for m in model]
    e1 = 0.5 * jnp.sum((z1 - (x @ w[0].T + b[0])) ** 2) / 6
    e2 = 0.5 * jnp.sum((z2 - (jnp.tanh(z1) @ w[1].T + b[1])) ** 2) / 6
    e3 = 0.5 * jnp.sum((y - (jnp.tanh(z2) @ w[2].T + b[2])) ** 2) / 6
    np.testing.assert_allclose(out["energies"], [e3, e2, e1], rtol=1e-10)


def euler_problem():
    model = [linear([[1.0, -1.0], [0.5, 2.0]]), linear([[1.0, 1.0]])]
    x = jnp.array([[1.0, 0.0], [2.0, -1.0]])
    y = jnp.array([[4.0], [-3.0]])
    z0 = [x @ model[0].weight.T, x @ model[0].weight.T @ model[1].weight.T]
    return model, x, y, z0


@pytest.mark.slow
def test_record_iters_has_no_initial_row_and_energies_line_up():
    """Row k is the state after the (k+1)-th Euler step; compute_infer_energies
    column k is row k's energies; after t_max the columns are 0."""
    model, x, y, z0 = euler_problem()
    dt, n = 0.25, 3
    iters = jpc.solve_inference(
        (model, None),
        z0,
        y,
        input=x,
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt=dt,
        max_t1=n * dt,
        record_iters=True,
        max_steps=8,
    )
    w1, w2 = model[0].weight, model[1].weight

    def layer_energies(z1):
        e1 = 0.5 * jnp.sum((z1 - x @ w1.T) ** 2) / 2
        e2 = 0.5 * jnp.sum((y - z1 @ w2.T) ** 2) / 2
        return jnp.stack([e1, e2])

    z1, rows = z0[0], []
    for _ in range(n):
        z1 = z1 - dt * jax.grad(lambda z: jnp.sum(layer_energies(z)))(z1)
        rows.append(z1)
    t_max = int(jpc.get_t_max(iters))
    assert t_max == n - 1  # n accepted steps, no row for the initial state
    np.testing.assert_allclose(iters[0][:n], jnp.stack(rows), rtol=1e-12)
    assert np.all(np.isinf(iters[0][n:]))
    got = jpc.compute_infer_energies((model, None), iters, t_max, y, x=x)
    assert got.shape == (2, 8)
    want = jnp.stack([layer_energies(r) for r in rows]).T
    np.testing.assert_allclose(got[:, :n], want, rtol=1e-12)


def test_compute_infer_energies_zero_after_t_max():
    model, x, y, z0 = euler_problem()
    rows = 5
    iters = [jnp.stack([z] * rows).at[3:].set(jnp.inf) for z in z0]
    got = jpc.compute_infer_energies((model, None), iters, 2, y, x=x)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[:, 3:], 0.0)
    e1 = 0.0  # z0 is the feedforward state
    e2 = 0.5 * jnp.sum((y - z0[0] @ model[1].weight.T) ** 2) / 2
    np.testing.assert_allclose(got[:, :3], [[e1] * 3, [e2] * 3], atol=1e-12)


@pytest.mark.slow
def test_record_energies_inside_the_solve(key):
    """record_energies alone stores no states (one row of activities), gives the
    energies of every accepted step (those of the recorded trajectory, computed by
    a second code path) and does not change the update."""
    model = jpc.make_mlp(key, 3, 4, 3, 2, "tanh")
    x = jr.normal(jr.PRNGKey(1), (4, 3))
    y = jr.normal(jr.PRNGKey(2), (4, 2))
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    kw = dict(input=x, max_t1=5.0)
    plain = jpc.make_pc_step(model, optim, state, y, **kw)
    rec = jpc.make_pc_step(model, optim, state, y, record_energies=True, **kw)
    both = jpc.make_pc_step(
        model, optim, state, y, record_energies=True, record_activities=True, **kw
    )
    assert all(a.shape[0] == 1 for a in rec["activities"])
    assert_trees_close(rec["model"], plain["model"], rtol=1e-12)
    t_max = int(rec["t_max"])
    assert t_max == int(both["t_max"]) == int(jpc.get_t_max(both["activities"]))
    want = jpc.compute_infer_energies((model, None), both["activities"], t_max, y, x=x)
    np.testing.assert_allclose(
        rec["energies"][:, : t_max + 1], want[:, : t_max + 1], rtol=1e-10
    )
    np.testing.assert_allclose(both["energies"], want[:, : both["energies"].shape[1]])
    np.testing.assert_array_equal(rec["energies"][:, t_max + 1 :], 0.0)


# ------------------------------------------------------------------ §14.3 hybrid


def test_hpc_energy_takes_amortiser_order():
    """Amortiser g1: obs -> z_1, g2: z_1 -> prior; equilib = [z_1] (amortiser order)
    with the label, [z_1, z_0] without; no ½, divided by B."""
    amortiser = [linear([[1.0, 2.0]]), linear([[3.0]])]
    obs = jnp.array([[1.0, 1.0], [0.0, 2.0]])  # g1(obs) = 3, 4
    amort = [jnp.array([[9.0], [12.0]]), jnp.array([[3.0], [4.0]]), obs]
    z1 = jnp.array([[2.0], [5.0]])
    label = jnp.array([[10.0], [10.0]])  # g2(ẑ_1) = 9, 12
    terms = [((2 - 3) ** 2 + (5 - 4) ** 2) / 2, ((10 - 9) ** 2 + (10 - 12) ** 2) / 2]
    got = jpc.hpc_energy_fn(amortiser, [z1], amort, obs, label, record_layers=True)
    np.testing.assert_allclose(got, terms)
    z0 = jnp.array([[7.0], [12.0]])
    got = jpc.hpc_energy_fn(amortiser, [z1, z0], amort, obs, record_layers=True)
    np.testing.assert_allclose(got, [terms[0], ((7 - 9) ** 2 + 0) / 2])
    grads = jpc.compute_hpc_param_grads(amortiser, [z1], amort, obs, label)
    # ∂/∂w of Σ_i (t_i − w u_i)² / B = −2 Σ_i (t_i − w u_i) u_i / B
    np.testing.assert_allclose(grads[1].weight, [[-2 * (1 * 3 + (-2) * 4) / 2]])


@pytest.mark.slow
def test_make_hpc_step_losses_activities_energies(key):
    kg, ka, ko, kl = jr.split(key, 4)
    generator = jpc.make_mlp(kg, 2, 4, 2, 3, "tanh")
    amortiser = jpc.make_mlp(ka, 3, 4, 2, 2, "tanh")
    obs = jr.normal(ko, (5, 3))
    labels = jax.nn.one_hot(jr.randint(kl, (5,), 0, 2), 2)
    optims = (optax.sgd(0.1), optax.sgd(0.1))
    states = (
        optims[0].init((eqx.filter(generator, eqx.is_array), None)),
        optims[1].init(eqx.filter(amortiser, eqx.is_array)),
    )
    kw = dict(activity_optim=optax.sgd(0.5), n_inference_steps=3)
    out = jpc.make_hpc_step(
        generator, amortiser, optims, states, obs, input=labels, **kw
    )
    w = [m.layers[1].weight for m in generator]
    gen_pred = jnp.tanh(labels @ w[0].T) @ w[1].T
    v = [m.layers[1].weight for m in amortiser]
    amort_top = jnp.tanh(obs @ v[0].T) @ v[1].T
    np.testing.assert_allclose(
        out["losses"][0], np.mean((obs - gen_pred) ** 2), rtol=1e-12
    )
    np.testing.assert_allclose(
        out["losses"][1], np.mean((labels - amort_top) ** 2), rtol=1e-12
    )
    amort_acts, equilib = out["activities"]
    np.testing.assert_allclose(amort_acts[0], amort_top, rtol=1e-12)
    assert [a.shape[0] for a in equilib] == [1, 1]  # leading time axis
    assert out["energies"] == (None, None)
    # without a label: no generator loss; the amortiser's target is the inferred z_0
    uns = jpc.make_hpc_step(generator, amortiser, optims, states, obs, **kw)
    assert uns["losses"][0] is None
    z0 = uns["activities"][1][0][-1]
    np.testing.assert_allclose(uns["losses"][1], np.mean((z0 - amort_top) ** 2))
    rec = jpc.make_hpc_step(
        generator, amortiser, optims, states, obs, input=labels, record_energies=True
    )
    gen_energies, amort_energies = rec["energies"]
    t = int(rec["t_max"])
    final = [a[t] for a in rec["activities"][1]]
    want = jpc.hpc_energy_fn(
        amortiser, final[-2::-1], rec["activities"][0], obs, labels, record_layers=True
    )
    np.testing.assert_allclose(amort_energies, want, rtol=1e-12)
    assert gen_energies.shape[0] == 2


# ------------------------------------------------------------------ §14.4 bidirectional


def bpc_problem():
    """H = 2 hidden layers of width 1, linear layers with hand-chosen weights."""
    td = [linear([[1.0, 1.0]]), linear([[2.0]]), linear([[0.5]])]
    bu = [linear([[1.0], [-1.0]]), linear([[3.0]]), linear([[1.0]])]
    x = jnp.array([[1.0, 2.0]])
    y = jnp.array([[1.0]])
    z = [jnp.array([[2.0]]), jnp.array([[4.0]])]
    return td, bu, x, y, z


def test_bpc_hidden_only_lists_skips_both_ways_and_flat_record_layers():
    td, bu, x, y, z = bpc_problem()
    skip = [None, eqx.nn.Identity(), None]
    (z1,), (z2,) = z[0][0], z[1][0]
    x1, x2 = x[0]
    # top-down: z1 − (x1 + x2), z2 − (2 z1 + z1 skip), y − 0.5 z2
    # bottom-up: x − (z1, −z1), z1 − (3 z2 + z2 skip), z2 − y
    td_terms = [z1 - (x1 + x2), z2 - 3 * z1, 1.0 - 0.5 * z2]
    bu_input = (x1 - z1) ** 2 + (x2 + z1) ** 2
    bu_terms = [z1 - 4 * z2, z2 - 1.0]
    e = lambda t: 0.5 * t**2  # noqa: E731
    flat = [
        e(td_terms[2]),
        0.5 * bu_input,
        e(td_terms[0]),
        e(bu_terms[0]),
        e(td_terms[1]),
        e(bu_terms[1]),
    ]
    for acts in (z, [*z, jnp.array([[99.0]])]):  # hidden only, or with a slot
        got = jpc.bpc_energy_fn(td, bu, acts, y, x=x, skip_model=skip)
        np.testing.assert_allclose(got, sum(flat), rtol=1e-12)
        layers = jpc.bpc_energy_fn(
            td, bu, acts, y, x=x, skip_model=skip, record_layers=True
        )
        np.testing.assert_allclose(layers, flat, rtol=1e-12)
    _, grads = jpc.compute_bpc_activity_grad(td, bu, z, y, x=x, skip_model=skip)
    assert len(grads) == 2
    want = jax.grad(
        lambda a: jpc.bpc_energy_fn(td, bu, [*a, y], y, x=x, skip_model=skip)
    )(z)
    assert_trees_close(grads, want, rtol=1e-12)


def test_bpc_keeps_param_type():
    """mupc: a_1 = 1/√D (D = 2), hidden a = 1/√N (N = 1), a_L = 1/N; the bottom-up
    model's scalings read `y` (D = 1)."""
    td, bu, x, y, z = bpc_problem()
    got = jpc.bpc_energy_fn(td, bu, z, y, x=x, param_type="mupc", record_layers=True)
    (z1,), (z2,) = z[0][0], z[1][0]
    x1, x2 = x[0]
    r2 = 1 / np.sqrt(2)
    want = [
        0.5 * (1 - 0.5 * z2) ** 2,
        0.5 * ((x1 - z1) ** 2 + (x2 + z1) ** 2),  # a = 1/N = 1 for the bu output
        0.5 * (z1 - r2 * (x1 + x2)) ** 2,
        0.5 * (z1 - 3 * z2) ** 2,
        0.5 * (z2 - 2 * z1) ** 2,
        0.5 * (z2 - 1.0) ** 2,
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ------------------------------------------------------------------ §14.5 ePC slot


@pytest.mark.slow
def test_epc_output_slot(key):
    model = jpc.make_mlp(key, 3, 4, 3, 2, "tanh")
    x = jr.normal(jr.PRNGKey(1), (5, 3))
    y = jr.normal(jr.PRNGKey(2), (5, 2))
    errors = jpc.init_epc_errors([3, 4, 4, 2], 5)
    assert [e.shape for e in errors] == [(5, 4), (5, 4), (5, 2)]
    assert not any(np.any(np.asarray(e)) for e in errors)
    hidden = [jr.normal(k, (5, 4)) for k in jr.split(jr.PRNGKey(3), 2)]
    slot = jr.normal(jr.PRNGKey(4), (5, 2))  # never read, whatever it holds
    params = (model, None)
    e_without = jpc.epc_energy_fn(params, hidden, y, x=x)
    e_with = jpc.epc_energy_fn(params, [*hidden, slot], y, x=x)
    np.testing.assert_allclose(e_with, e_without, rtol=1e-14)
    _, g_without = jpc.compute_epc_error_grad(params, hidden, y, x=x)
    _, g_with = jpc.compute_epc_error_grad(params, [*hidden, slot], y, x=x)
    assert_trees_close(g_with[:2], g_without, rtol=1e-14)
    np.testing.assert_array_equal(g_with[2], 0.0)
    optim = optax.adam(0.1)
    out = jpc.update_epc_errors(params, errors, optim, optim.init(errors), y, input=x)
    np.testing.assert_array_equal(out["errors"][2], 0.0)
    assert_trees_close(
        jpc.compute_epc_param_grads(params, [*hidden, slot], y, x=x),
        jpc.compute_epc_param_grads(params, hidden, y, x=x),
        rtol=1e-14,
    )
    # the energy at zero errors is the feedforward loss (the slot is not an error)
    pred = jpc.init_activities_with_ffwd(model, x)[-1]
    np.testing.assert_allclose(
        jpc.epc_energy_fn(params, errors, y, x=x), jpc.mse_loss(pred, y), rtol=1e-12
    )


# ------------------------------------------------------------------ §14.6 PDM


D_X, N, D_Y, B = 3, 4, 2, 3


def pdm_problem(key, act="tanh"):
    kf, kb, kx, ky, kz, kl, kp = jr.split(key, 7)
    td = jpc.make_mlp(kf, D_X, N, 3, D_Y, act, use_bias=True)
    bu = jpc.make_mlp(kb, D_Y, N, 3, D_X, act, use_bias=True)[::-1]
    x = jr.normal(kx, (B, D_X))
    y = jr.normal(ky, (B, D_Y))
    z = [jr.normal(k, (B, N)) for k in jr.split(kz, 2)]
    lateral = [linear(0.3 * jr.normal(k, (N, N))) for k in jr.split(kl, 2)]
    kp1, kp2 = jr.split(kp)
    prev = [linear(jr.normal(kp1, (N, D_X))), eqx.nn.Identity()]
    nxt = [eqx.nn.Identity(), linear(jr.normal(kp2, (N, D_Y)))]
    return td, bu, x, y, z, lateral, prev, nxt


def _parts(layer):
    """`(act, W, b)` of a make_mlp block."""
    act = layer.layers[0].fn
    lin = layer.layers[1]
    return act, lin.weight, lin.bias


def ref_local_energies(
    td,
    bu,
    z,
    y,
    x,
    *,
    skip=False,
    lateral=None,
    gamma=0.0,
    prev=None,
    nxt=None,
    a_f=1.0,
    a_b=1.0,
    stop=True,
):
    """[F_1, F_2] of SPEC §14.6 written out for H = 2 make_mlp networks."""
    zs = [x, *z, y]

    def f(j, v):  # top-down entry j, as given
        act, w, b = _parts(td[j])
        return act(v) @ w.T + b

    def g(j, v):  # bottom-up entry j, as given
        act, w, b = _parts(bu[j])
        return act(v) @ w.T + b

    sg = jax.lax.stop_gradient if stop else (lambda v: v)
    energies = []
    for k in (1, 2):
        e = zs[k] - f(k - 1, zs[k - 1]) - (zs[k - 1] if skip and k == 2 else 0)
        act, v, b = _parts(bu[k])
        inner = zs[k + 1] @ v.T + b + (zs[k + 1] if skip and k == 1 else 0)
        if lateral is not None and gamma == 0:
            inner = inner + zs[k] @ lateral[k - 1].weight.T
        d = zs[k] - act(inner)
        if prev is not None:
            dp = sg(zs[k - 1] - g(k - 1, zs[k]) - (zs[k] if skip and k == 2 else 0))
            ef = 0.5 * jnp.sum((a_f * e + a_b * jax.vmap(prev[k - 1])(dp)) ** 2)
        else:
            ef = a_f * 0.5 * jnp.sum(e**2)
        if nxt is not None:
            en = sg(zs[k + 1] - f(k, zs[k]) - (zs[k] if skip and k == 1 else 0))
            eb = 0.5 * jnp.sum((a_b * d + a_f * jax.vmap(nxt[k - 1])(en)) ** 2)
        else:
            eb = a_b * 0.5 * jnp.sum(d**2)
        energies.append((ef + eb) / B)
    return energies


def ref_lateral(lateral, z, gamma):
    return [
        jnp.sum((zl @ m.weight.T) * zl) / (2 * B * N)
        - gamma * jnp.trace(m.weight) / (2 * N)
        for m, zl in zip(lateral, z)
    ]


PDM_CASES = [
    dict(),
    dict(skip=True, a_f=0.7, a_b=1.3),
    dict(cross=True),
    dict(cross=True, skip=True, stop=False),
    dict(lateral=True, gamma=0.0),
    dict(lateral=True, gamma=0.4, cross=True),
]


def _pdm_kwargs(case, lateral, prev, nxt):
    kw = dict(
        skip_model=jpc.make_skip_model(3) if case.get("skip") else None,
        forward_energy_weight=case.get("a_f", 1.0),
        backward_energy_weight=case.get("a_b", 1.0),
        stop_gradient_on_extra_errors=case.get("stop", True),
    )
    ref = dict(
        skip=case.get("skip", False),
        a_f=kw["forward_energy_weight"],
        a_b=kw["backward_energy_weight"],
        stop=kw["stop_gradient_on_extra_errors"],
    )
    if case.get("cross"):
        kw.update(
            include_previous_backward_error=True,
            include_next_forward_error=True,
            projection_matrix_prev=prev,
            projection_matrix_next=nxt,
        )
        ref.update(prev=prev, nxt=nxt)
    if case.get("lateral"):
        kw.update(lateral_model=lateral, lateral_gamma=case["gamma"])
        ref.update(lateral=lateral, gamma=case["gamma"])
    return kw, ref


@pytest.mark.parametrize("case", PDM_CASES)
@pytest.mark.slow
def test_pdm_energy_and_local_activity_grads(key, case):
    """Energy = Σ F_l (+ lateral terms); the gradient for z_l is ∂F_l/∂z_l of its
    own local energy alone (jax.grad of the hand-written F_l), plus the lateral
    term's gradient when γ ≠ 0; a trailing slot gets zeros."""
    td, bu, x, y, z, lateral, prev, nxt = pdm_problem(key)
    kw, ref = _pdm_kwargs(case, lateral, prev, nxt)
    gamma = ref.get("gamma", 0.0)
    want = sum(ref_local_energies(td, bu, z, y, x, **ref))
    if case.get("lateral"):
        want = want + sum(ref_lateral(lateral, z, gamma))
    got = jpc.pdm_energy_fn(td, bu, z, y, x, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    energy, grads = jpc.compute_pdm_activity_grad(td, bu, [*z, y], y, x, **kw)
    np.testing.assert_allclose(energy, want, rtol=1e-12)
    for k in (0, 1):

        def own(zk, k=k):
            acts = [zk if i == k else z[i] for i in range(2)]
            value = ref_local_energies(td, bu, acts, y, x, **ref)[k]
            if case.get("lateral") and gamma != 0:
                value = value + ref_lateral(lateral, acts, gamma)[k]
            return value

        np.testing.assert_allclose(
            grads[k], jax.grad(own)(z[k]), rtol=1e-10, atol=1e-14
        )
    np.testing.assert_array_equal(grads[2], 0.0)


def test_pdm_reduces_to_bpc_sums_without_cross_terms(key):
    """Linear activations (nothing to move), no cross terms, no laterals: Σ F_l is
    the bPC energy without its output and input terms, also with skips and mupc."""
    td, bu, x, y, z, *_ = pdm_problem(key, act="linear")
    for kw in (dict(), dict(skip_model=jpc.make_skip_model(3), param_type="mupc")):
        flat = jpc.bpc_energy_fn(td, bu, z, y, x=x, record_layers=True, **kw)
        got = jpc.pdm_energy_fn(td, bu, z, y, x, **kw)
        np.testing.assert_allclose(got, jnp.sum(flat[2:]), rtol=1e-12)


def test_pdm_bpc_terms_factor_mixes_gradients(key):
    td, bu, x, y, z, *_ = pdm_problem(key)
    _, local = jpc.compute_pdm_activity_grad(td, bu, z, y, x)
    _, bpc = jpc.compute_bpc_activity_grad(td, bu, z, y, x=x)
    _, mixed = jpc.compute_pdm_activity_grad(td, bu, z, y, x, bpc_terms_factor=0.25)
    for m, a, b in zip(mixed, local, bpc):
        np.testing.assert_allclose(m, 0.75 * a + 0.25 * b, rtol=1e-12)
    # and the local gradient is not the gradient of the total energy
    total = jax.grad(lambda a: jpc.pdm_energy_fn(td, bu, a, y, x))(z)
    assert not np.allclose(local[0], total[0])


@pytest.mark.slow
def test_pdm_param_grads_against_fd_and_spectral_penalty(key):
    td, bu, x, y, z, lateral, prev, nxt = pdm_problem(key)
    kw = dict(
        lateral_model=lateral,
        lateral_gamma=0.2,
        spectral_penalty=0.3,
        include_previous_backward_error=True,
        projection_matrix_prev=prev,
        stop_gradient_on_extra_errors=False,
    )
    grads = jpc.compute_pdm_param_grads(td, bu, z, y, x, **kw)
    assert len(grads) == 3
    # with the cross-term errors under stop_gradient (the default), bottom_up[0]
    # (predicting x) enters the energy only through them, so gets no gradient
    stopped = jpc.compute_pdm_param_grads(
        td, bu, z, y, x, **dict(kw, stop_gradient_on_extra_errors=True)
    )
    assert not np.any(np.asarray(stopped[1][0].layers[1].weight))
    assert np.any(np.asarray(grads[1][0].layers[1].weight))

    def energy(trees):
        t, b, lat = trees
        return jpc.pdm_energy_fn(t, b, z, y, x, **dict(kw, lateral_model=lat))

    fd = central_fd_grad(energy, (td, bu, lateral))
    assert_trees_close(eqx.filter(grads, eqx.is_array), fd, rtol=1e-6, atol=1e-9)
    # the spectral term: 0.3 Σ ‖WᵀW − I‖² over the hidden-to-hidden weight (4×4)
    w = td[1].layers[1].weight
    spectral = 0.3 * jnp.sum((w.T @ w - jnp.eye(N)) ** 2)
    without = jpc.pdm_energy_fn(td, bu, z, y, x, **dict(kw, spectral_penalty=0.0))
    np.testing.assert_allclose(
        jpc.pdm_energy_fn(td, bu, z, y, x, **kw), without + spectral, rtol=1e-12
    )


def test_pdm_updates_are_optax_steps(key):
    td, bu, x, y, z, lateral, prev, _ = pdm_problem(key)
    optim = optax.sgd(0.1)
    out = jpc.update_pdm_activities(td, bu, z, optim, optim.init(z), y, x)
    _, grads = jpc.compute_pdm_activity_grad(td, bu, z, y, x)
    assert_trees_close(out["activities"], [a - 0.1 * g for a, g in zip(z, grads)])
    kw = dict(
        include_previous_backward_error=True,
        projection_matrix_prev=prev,
        lateral_model=lateral,
    )
    states = [optim.init(eqx.filter(t, eqx.is_array)) for t in (td, bu, lateral, prev)]
    out = jpc.update_pdm_params(
        td,
        bu,
        z,
        optim,
        optim,
        states[0],
        states[1],
        y,
        x,
        lateral_optim=optim,
        lateral_opt_state=states[2],
        projection_matrix_prev_optim=optim,
        projection_matrix_prev_opt_state=states[3],
        **kw,
    )
    g_td, g_bu, g_lat = jpc.compute_pdm_param_grads(td, bu, z, y, x, **kw)
    step = lambda t, g: eqx.apply_updates(  # noqa: E731
        t, jax.tree_util.tree_map(lambda v: -0.1 * v, g)
    )
    assert_trees_close(
        out["models"], (step(td, g_td), step(bu, g_bu), step(lateral, g_lat))
    )
    assert "projection_matrix_prev" in out and "projection_matrix_next" not in out
    g_prev = eqx.filter_grad(
        lambda p: jpc.pdm_energy_fn(
            td, bu, z, y, x, **dict(kw, projection_matrix_prev=p)
        )
    )(prev)
    assert_trees_close(out["projection_matrix_prev"], step(prev, g_prev))


def test_pdm_errors_raise(key):
    td, bu, x, y, z, lateral, *_ = pdm_problem(key)
    with pytest.raises(ValueError, match="`x` .* must be given"):
        jpc.pdm_energy_fn(td, bu, z, y, None)
    with pytest.raises(ValueError, match="`lateral_model` must have one entry"):
        jpc.pdm_energy_fn(td, bu, z, y, x, lateral_model=lateral[:1])
    with pytest.raises(ValueError, match="`projection_matrix_prev` must map"):
        jpc.pdm_energy_fn(td, bu, z, y, x, include_previous_backward_error=True)
    with pytest.raises(
        ValueError, match="`projection_matrix_next` must be one callable or a list"
    ):
        jpc.pdm_energy_fn(td, bu, z, y, x, projection_matrix_next=[None])
    with pytest.raises(ValueError, match="`activities` must have 2 entries"):
        jpc.pdm_energy_fn(td, bu, z[:1], y, x)
    optim = optax.sgd(0.1)
    with pytest.raises(TypeError, match="`bottom_up_optim` must be an optax"):
        jpc.update_pdm_params(td, bu, z, optim, None, None, None, y, x)
    with pytest.raises(TypeError, match="`lateral_optim` must be an optax"):
        jpc.update_pdm_params(
            td, bu, z, optim, optim, None, None, y, x, lateral_model=lateral
        )
