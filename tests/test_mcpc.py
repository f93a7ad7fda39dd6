"""Monte Carlo PC: Langevin sampling against closed-form Gaussian posteriors, the
noise-free step against `make_pc_step`, the averaged parameter gradient against a
hand-written energy, and ancestral samples against the model's marginal."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, random_problem, ref_energy, ref_layer_energies

import jpc


N_SIGMA = 5.0  # Monte Carlo tolerance: 5 standard errors (a false alarm ~1e-6)


def linear_weights(model):
    """`(W, b)` of each layer of a `make_mlp(..., act_fn="linear")` model."""
    return [(blk.layers[1].weight, blk.layers[1].bias) for blk in model]


def assert_gaussian_moments(samples, mean, cov):
    """Sample mean and covariance of `n` independent draws against `(mean, cov)`.

    Standard errors: `sqrt(Σ_ii / n)` for the mean; for the covariance entries,
    `sqrt((Σ_ii Σ_jj + Σ_ij²) / n)` (the variance of a product of two jointly
    Gaussian variables); each estimate must be within `N_SIGMA` of them.
    """
    n = samples.shape[0]
    diag = np.diag(cov)
    mean_se = np.sqrt(diag / n)
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), N_SIGMA * mean_se)
    cov_se = np.sqrt((np.outer(diag, diag) + cov**2) / n)
    sample_cov = np.cov(samples, rowvar=False)
    np.testing.assert_array_less(np.abs(sample_cov - cov), N_SIGMA * cov_se)


def mcpc_step(model, y, x=None, **kw):
    optim = optax.sgd(1.0)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    return jpc.make_mcpc_step(model, optim, state, y, input=x, **kw)


# ------------------------------------------------------------- posterior sampling


@pytest.mark.parametrize("supervised", [True, False])
@pytest.mark.slow
def test_langevin_samples_the_gaussian_posterior(supervised):
    r"""Linear model, every chain on the same example; the final states of the
    `n` independent chains are `n` independent draws of the chain's stationary law.

    Supervised (`x` given, one hidden layer): per example
    $F = \frac12\lVert z - W_1x - b_1\rVert^2
    + \frac\lambda2\lVert y - W_2z - b_2\rVert^2$.
    Unsupervised (one layer, `activity_decay=1` as the prior of $z_0$):
    $F = \frac12\lVert z\rVert^2 + \frac\lambda2\lVert y - Wz - b\rVert^2$.
    Both are Gaussian in z with precision $P = I + \lambda W^\top W$ (W the output
    weight) and mean $P^{-1}h$, $h = W_1x + b_1 + \lambda W_2^\top(y - b_2)$ or
    $\lambda W^\top (y - b)$. The Langevin chain $z \leftarrow z - \eta P(z - m)
    + \sqrt{2\eta}\xi$ has stationary mean $m$ and covariance
    $(P - \eta P^2/2)^{-1}$, exactly (it tends to $P^{-1}$ as $\eta \to 0$).
    """
    n, eta, lam, steps = 4000, 0.05, 2.0, 300
    key = jr.key(3)
    k_model, k_x, k_y = jr.split(key, 3)
    depth, d_in = (2, 2) if supervised else (1, 3)
    model = jpc.make_mlp(k_model, d_in, 3, depth, 4, "linear", use_bias=True)
    x = jnp.tile(jr.normal(k_x, (1, d_in)), (n, 1))
    y = jnp.tile(jr.normal(k_y, (1, 4)), (n, 1))
    weights = linear_weights(model)
    w_out, b_out = weights[-1]
    precision = jnp.eye(w_out.shape[1]) + lam * w_out.T @ w_out
    h = lam * w_out.T @ (y[0] - b_out)
    if supervised:
        w_in, b_in = weights[0]
        h = h + w_in @ x[0] + b_in
        options = dict(x=x)
    else:
        options = dict(activity_decay=1.0, layer_sizes=[3, 4], batch_size=n)
    result = mcpc_step(
        model,
        y,
        key=jr.key(4),
        n_inference_steps=steps,
        activity_lr=eta,
        n_burn_in=steps - 1,
        output_energy_scaling=lam,
        **options,
    )
    samples = np.asarray(result["activities"][0][0])
    mean = np.linalg.solve(precision, h)
    cov = np.linalg.inv(precision - eta * precision @ precision / 2)
    # The initial error decays like (1 - η p_min)^T with p_min ≥ 1: burnt in.
    assert (1 - eta) ** steps < 1e-6
    assert_gaussian_moments(samples, mean, cov)


@pytest.mark.slow
def test_noise_scale_tempers_the_posterior():
    """With noise scale `s` the chain samples exp(-B F / s²): covariance × s²."""
    n, eta, s = 4000, 0.02, 0.5
    model = jpc.make_mlp(jr.key(5), 2, 3, 2, 3, "linear", use_bias=True)
    x = jnp.ones((n, 2))
    y = jnp.ones((n, 3))
    (w_in, b_in), (w_out, b_out) = linear_weights(model)
    precision = jnp.eye(3) + w_out.T @ w_out
    mean = np.linalg.solve(precision, w_in @ x[0] + b_in + w_out.T @ (y[0] - b_out))
    cov = s**2 * np.linalg.inv(precision - eta * precision @ precision / 2)
    result = mcpc_step(
        model,
        y,
        x,
        key=jr.key(6),
        n_inference_steps=800,
        activity_lr=eta,
        n_burn_in=799,
        noise_scale=s,
    )
    assert_gaussian_moments(np.asarray(result["activities"][0][0]), mean, cov)


@pytest.mark.slow
def test_langevin_increments_are_gradient_plus_gaussian_noise():
    """Along a recorded chain, `(z_{t+1} - z_t + η B ∂F/∂z(z_t)) / (s √(2η))`,
    with the gradient of the hand-written energy, is standard normal noise."""
    p = random_problem(jr.key(7), [3, 6, 6, 2], batch=200)
    eta, s, steps = 0.03, 0.7, 8
    result = mcpc_step(
        p.model,
        p.y,
        p.x,
        key=jr.key(8),
        n_inference_steps=steps,
        activity_lr=eta,
        noise_scale=s,
        record_activities=True,
    )
    chain = result["activities"]
    start = jpc.init_activities_with_ffwd(p.model, p.x)
    states = [jnp.concatenate([z0[None], z]) for z0, z in zip(start, chain)]

    def grad_at(t):
        acts = [z[t] for z in states]
        return jax.grad(lambda a: ref_energy(p.model, a, p.y, x=p.x))(acts)

    noise = []
    for t in range(steps):
        grads = grad_at(t)
        for z, g in zip(states[:-1], grads[:-1]):
            noise.append((z[t + 1] - z[t] + eta * 200 * g) / (s * np.sqrt(2 * eta)))
        np.testing.assert_array_equal(states[-1][t + 1], states[-1][0])  # clamped
    noise = np.concatenate([np.ravel(v) for v in noise])[:, None]
    assert_gaussian_moments(noise, np.zeros(1), np.eye(1))


# ------------------------------------------------------------- parameter update


@pytest.mark.slow
def test_parameter_gradient_is_averaged_over_sampled_states():
    """SGD(1) update = minus the mean of ∂F/∂θ (hand-written energy, jax.grad) over
    the states after steps n_burn_in + 1 ... T; energies are the mean per layer."""
    p = random_problem(jr.key(9), [3, 5, 5, 2], batch=6, use_bias=True)
    steps, burn = 7, 3
    result = mcpc_step(
        p.model,
        p.y,
        p.x,
        key=jr.key(10),
        n_inference_steps=steps,
        activity_lr=0.05,
        n_burn_in=burn,
        record_activities=True,
    )
    sampled = [[z[t] for z in result["activities"]] for t in range(burn, steps)]
    params = eqx.filter(p.model, eqx.is_array)

    def ref_grad(acts):
        def energy(arrays):
            model = eqx.combine(arrays, p.model)
            return ref_energy(model, acts, p.y, x=p.x)

        return jax.grad(energy)(params)

    grads = [ref_grad(a) for a in sampled]
    mean_grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    expected = jax.tree.map(lambda w, g: w - g, params, mean_grad)
    assert_trees_close(eqx.filter(result["model"], eqx.is_array), expected)
    layers = [ref_layer_energies(p.model, a, p.y, x=p.x) for a in sampled]
    mean_layers = np.mean(np.asarray(layers), axis=0)  # layer order E_1 ... E_L
    order = [mean_layers[-1], *mean_layers[1:-1], mean_layers[0]]
    np.testing.assert_allclose(result["energies"], order, rtol=1e-10)


@pytest.mark.parametrize(
    "supervised, traced_lr",
    [
        (True, False),
        pytest.param(True, True, marks=pytest.mark.slow),
        pytest.param(False, False, marks=pytest.mark.slow),
        pytest.param(False, True, marks=pytest.mark.slow),
    ],
)
def test_noise_free_step_is_make_pc_step(supervised, traced_lr):
    """`noise_scale=0`, `n_burn_in = T - 1`: gradient descent with step η·B on the
    batch-mean energy, the gradient at the final state, as `make_pc_step` with
    `activity_optim=optax.sgd(η·B)` (or `sgd(1.0)` and `activity_lr=η·B`)."""
    p = random_problem(jr.key(11), [3, 5, 5, 2], batch=4, supervised=supervised)
    eta, steps, batch = 0.04, 6, 4
    optim = optax.adam(1e-2)
    state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    key = jr.key(12)
    common = dict(input=p.x, n_inference_steps=steps, output_energy_scaling=1.5)
    unsupervised = dict(layer_sizes=p.widths, batch_size=batch, sigma=0.3)
    if not supervised:
        common.update(unsupervised)
    lr = eta * batch
    activity = (
        dict(activity_optim=optax.sgd(1.0), activity_lr=lr)
        if traced_lr
        else dict(activity_optim=optax.sgd(lr))
    )
    init_key = None if supervised else jr.split(key)[0]
    pc = jpc.make_pc_step(
        p.model, optim, state, p.y, key=init_key, **common, **activity
    )
    mc = jpc.make_mcpc_step(
        p.model,
        optim,
        state,
        p.y,
        key=key,
        activity_lr=eta,
        noise_scale=0.0,
        n_burn_in=steps - 1,
        **common,
    )
    for name in ("model", "opt_state", "activities", "energies"):
        assert_trees_close(
            eqx.filter(mc[name], eqx.is_array), eqx.filter(pc[name], eqx.is_array)
        )
    if supervised:
        np.testing.assert_allclose(mc["loss"], pc["loss"], rtol=1e-12)
    else:
        assert mc["loss"] is None


@pytest.mark.slow
def test_new_hyperparameter_values_reuse_the_compiled_step():
    """`activity_lr` and `noise_scale` are traced: new values do not recompile."""
    p = random_problem(jr.key(13), [3, 4, 2], batch=3)
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    counter = jpc.make_mcpc_step.jitted.compilations

    def step(lr, noise):
        return jpc.make_mcpc_step(
            p.model,
            optim,
            state,
            p.y,
            input=p.x,
            key=jr.key(0),
            n_inference_steps=3,
            activity_lr=lr,
            noise_scale=noise,
        )

    step(0.1, 0.5)
    before = counter.count
    step(0.2, 0.7)
    step(jnp.asarray(0.3), 1.0)
    assert counter.count == before


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(key=None), "needs a PRNG `key`"),
        (dict(activity_lr=None), "needs the Langevin step size `activity_lr`"),
        (dict(activity_lr=-0.1), "`activity_lr` must be positive, got -0.1"),
        (dict(activity_lr=0.0), "`activity_lr` must be positive, got 0.0"),
        (dict(noise_scale=-1.0), "`noise_scale` must be non-negative, got -1.0"),
        (dict(n_inference_steps=None), "needs `n_inference_steps`"),
        (dict(n_inference_steps=0), "positive integer, got n_inference_steps=0"),
        (dict(n_inference_steps=2.0), "positive integer, got n_inference_steps=2.0"),
        (dict(n_burn_in=5), r"n_burn_in=5 with n_inference_steps=5"),
        (dict(n_burn_in=-1), r"in \[0, n_inference_steps - 1\].*n_burn_in=-1"),
        (dict(n_burn_in=True), "n_burn_in=True"),
    ],
)
def test_bad_arguments_raise(kw, match):
    p = random_problem(jr.key(14), [3, 4, 2], batch=3)
    args = {**dict(key=jr.key(0), n_inference_steps=5, activity_lr=0.1), **kw}
    with pytest.raises(ValueError, match=match):
        mcpc_step(p.model, p.y, p.x, **args)


def test_unsupervised_needs_layer_sizes():
    p = random_problem(jr.key(15), [3, 4, 2], batch=3, supervised=False)
    with pytest.raises(ValueError, match="missing: layer_sizes, batch_size"):
        mcpc_step(p.model, p.y, key=jr.key(0), n_inference_steps=3, activity_lr=0.1)


# ---------------------------------------------------------------------- sampling


@pytest.mark.slow
def test_ancestral_samples_follow_the_linear_gaussian_marginal():
    r"""$z_1 \sim \mathcal{N}(W_1x + b_1, I)$, $y \sim \mathcal{N}(W_2z_1 + b_2,
    \lambda^{-1}I)$, so $y \sim \mathcal{N}(W_2(W_1x + b_1) + b_2, W_2W_2^\top +
    \lambda^{-1}I)$; `output_noise=False` gives $W_2 z_1 + b_2$ exactly."""
    n, lam = 20000, 4.0
    model = jpc.make_mlp(jr.key(16), 2, 3, 2, 4, "linear", use_bias=True)
    (w1, b1), (w2, b2) = linear_weights(model)
    x0 = jnp.array([0.5, -1.0])
    x = jnp.tile(x0, (n, 1))
    z1, y = jpc.sample_generative_pc(jr.key(17), model, x, output_energy_scaling=lam)
    mean_z1 = w1 @ x0 + b1
    assert_gaussian_moments(np.asarray(z1), mean_z1, np.eye(3))
    cov_y = w2 @ w2.T + np.eye(4) / lam
    assert_gaussian_moments(np.asarray(y), w2 @ mean_z1 + b2, cov_y)
    z1_mean, y_mean = jpc.sample_generative_pc(
        jr.key(17), model, x, output_energy_scaling=lam, output_noise=False
    )
    np.testing.assert_allclose(z1_mean, z1, rtol=1e-12)
    np.testing.assert_allclose(y_mean, z1 @ w2.T + b2, rtol=1e-10)


def test_samples_use_the_parameterisation():
    """With `param_type="mupc"` the means carry the scalings `a_l` of the energy."""
    model = jpc.make_mlp(jr.key(18), 4, 5, 2, 3, "linear", param_type="mupc")
    x = jr.normal(jr.key(19), (6, 4))
    _, y = jpc.sample_generative_pc(
        jr.key(0), model, x, param_type="mupc", output_noise=False
    )
    z1, _ = jpc.sample_generative_pc(jr.key(0), model, x, param_type="mupc")
    w2 = model[1].layers[1].weight
    np.testing.assert_allclose(y, z1 @ w2.T / 5, rtol=1e-10)  # a_L = 1/N


@pytest.mark.slow
def test_ancestral_samples_with_hidden_precisions():
    r"""With $\kappa_1$ the hidden noise has variance $1/\kappa_1$: $z_1 \sim
    \mathcal{N}(W_1x + b_1, \kappa_1^{-1}I)$ and $y \sim \mathcal{N}(W_2(W_1x +
    b_1) + b_2, W_2W_2^\top/\kappa_1 + \lambda^{-1}I)$."""
    n, lam, kappa = 20000, 4.0, 0.25
    model = jpc.make_mlp(jr.key(16), 2, 3, 2, 4, "linear", use_bias=True)
    (w1, b1), (w2, b2) = linear_weights(model)
    x0 = jnp.array([0.5, -1.0])
    x = jnp.tile(x0, (n, 1))
    z1, y = jpc.sample_generative_pc(
        jr.key(17),
        model,
        x,
        output_energy_scaling=lam,
        hidden_energy_scaling=[kappa],
    )
    mean_z1 = w1 @ x0 + b1
    assert_gaussian_moments(np.asarray(z1), mean_z1, np.eye(3) / kappa)
    cov_y = w2 @ w2.T / kappa + np.eye(4) / lam
    assert_gaussian_moments(np.asarray(y), w2 @ mean_z1 + b2, cov_y)
