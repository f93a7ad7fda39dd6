"""Vision transformer as PC layers: `jpc.make_vit` against hand-written maths.

The reference below writes the patch embedding, layer norm, multi-head attention,
GELU and pooling head as explicit array formulas that read the weights out of the
Equinox modules; it never calls the modules themselves, so the library's energies
and gradients are compared with an independent implementation (through `jax.grad`).
"""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import jpc


IMAGE, PATCH, CHANNELS, WIDTH, HEADS, N_CLASSES, BATCH = 4, 2, 2, 4, 2, 3, 2
TOKENS = (IMAGE // PATCH) ** 2


# ----------------------------------------------------------------- hand-written


def ref_layer_norm(norm, z):
    mean = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean((z - mean) ** 2, axis=-1, keepdims=True)
    return (z - mean) / jnp.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_gelu(z):
    return 0.5 * z * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def ref_linear(linear, z):
    return z @ linear.weight.T + linear.bias


def ref_patch_embedding(embed, x):
    """`x`: (B, C*H*W) -> (B, T, width), patches in row-major grid order."""
    n = IMAGE // PATCH
    images = x.reshape(x.shape[0], CHANNELS, n, PATCH, n, PATCH)
    patches = images.transpose(0, 2, 4, 1, 3, 5).reshape(x.shape[0], n * n, -1)
    weight = embed.conv.weight.reshape(embed.conv.weight.shape[0], -1)
    return patches @ weight.T + embed.conv.bias.reshape(-1) + embed.position


def ref_attention(attn, h):
    """Softmax self-attention with `HEADS` heads on (B, T, width)."""
    B, T, _ = h.shape
    q, k, v = (
        ref_linear(proj, h).reshape(B, T, HEADS, -1)
        for proj in (attn.query_proj, attn.key_proj, attn.value_proj)
    )
    logits = jnp.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1])
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    out = jnp.einsum("bhst,bthd->bshd", weights, v).reshape(B, T, -1)
    return ref_linear(attn.output_proj, out)


def ref_block(block, z):
    z = z + ref_attention(block.attention, ref_layer_norm(block.norm1, z))
    h = ref_layer_norm(block.norm2, z)
    return z + ref_linear(block.mlp_out, ref_gelu(ref_linear(block.mlp_in, h)))


def ref_head(head, z):
    return ref_linear(head.linear, jnp.mean(ref_layer_norm(head.norm, z), axis=1))


def ref_layer(model, i, z):
    if i == 0:
        return ref_patch_embedding(model[0], z)
    if i == len(model) - 1:
        return ref_head(model[-1], z)
    return ref_block(model[i], z)


def ref_forward(model, x):
    zs, z = [], x
    for i in range(len(model)):
        z = ref_layer(model, i, z)
        zs.append(z)
    return zs


def ref_output_term(logits, y, loss):
    if loss == "mse":
        return 0.5 * jnp.sum((y - logits) ** 2)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - jnp.log(jnp.sum(jnp.exp(shifted), -1, keepdims=True))
    return -jnp.sum(y * log_probs)


def ref_energy(model, activities, x, y, loss="mse", lam=1.0):
    """F = (1/B)[sum_l 1/2 ||z_l - f_l(z_{l-1})||^2 + lam * output term]."""
    inputs = [x, *activities[:-1]]
    total = 0.0
    for i in range(len(model) - 1):
        total = total + 0.5 * jnp.sum(
            (activities[i] - ref_layer(model, i, inputs[i])) ** 2
        )
    logits = ref_layer(model, len(model) - 1, inputs[-1])
    total = total + lam * ref_output_term(logits, y, loss)
    return total / x.shape[0]


def ref_bp_loss(model, x, y, loss="mse"):
    return ref_output_term(ref_forward(model, x)[-1], y, loss) / x.shape[0]


# ----------------------------------------------------------------- problem


def tiny_vit(key, depth=2):
    return jpc.make_vit(
        key,
        image_size=IMAGE,
        patch_size=PATCH,
        channels=CHANNELS,
        width=WIDTH,
        depth=depth,
        n_heads=HEADS,
        mlp_ratio=2,
        n_classes=N_CLASSES,
    )


def problem(key, loss="mse", depth=2):
    km, kx, ky, ka = jr.split(key, 4)
    model = tiny_vit(km, depth)
    x = jr.normal(kx, (BATCH, CHANNELS * IMAGE * IMAGE))
    if loss == "mse":
        y = jr.normal(ky, (BATCH, N_CLASSES))
    else:
        y = jax.nn.one_hot(jr.randint(ky, (BATCH,), 0, N_CLASSES), N_CLASSES)
    shapes = [(TOKENS, WIDTH)] * (depth + 1) + [(N_CLASSES,)]
    akeys = jr.split(ka, len(shapes))
    activities = [jr.normal(k, (BATCH, *s)) for k, s in zip(akeys, shapes)]
    return model, x, y, activities


jit = eqx.filter_jit


def max_rel_err(a, b):
    la = jax.tree_util.tree_leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree_util.tree_leaves(eqx.filter(b, eqx.is_array))
    num = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(la, lb, strict=True))
    den = max(float(jnp.max(jnp.abs(v))) for v in lb)
    return num / den


# ----------------------------------------------------------------- tests


def test_layout_and_shapes(key):
    model = tiny_vit(key, depth=3)
    assert len(model) == 5
    assert isinstance(model[0], jpc.PatchEmbedding)
    assert all(isinstance(m, jpc.TransformerBlock) for m in model[1:4])
    assert isinstance(model[4], jpc.ClassificationHead)
    assert model[1].attention.num_heads == HEADS
    assert model[1].mlp_in.weight.shape == (2 * WIDTH, WIDTH)
    assert model[0].position.shape == (TOKENS, WIDTH)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.slow
def test_feedforward_matches_hand_written_layers(key, loss):
    model, x, _, _ = problem(key, loss)
    activities = jit(jpc.init_activities_with_ffwd)(model, x)
    assert_trees_close(activities, jit(ref_forward)(model, x))
    # the 4-D image layout gives the same tokens as the flattened one
    images = x.reshape(BATCH, CHANNELS, IMAGE, IMAGE)
    assert_trees_close(jit(jpc.init_activities_with_ffwd)(model, images), activities)


@pytest.mark.parametrize("loss, lam", [("mse", 1.0), ("ce", 0.3)])
@pytest.mark.slow
def test_energy_and_gradients_match_hand_written_energy(key, loss, lam):
    model, x, y, activities = problem(key, loss)
    params = (model, None)
    kw = dict(x=x, output_energy_scaling=lam)
    energy = jit(jpc.pc_energy_fn)(params, activities, y, loss=loss, **kw)
    expected = jit(ref_energy)(model, activities, x, y, loss, lam)
    np.testing.assert_allclose(energy, expected, rtol=1e-10)

    _, grads = jit(jpc.compute_pc_activity_grad)(
        params, activities, y, loss_id=loss, **kw
    )
    ref_grads = jit(jax.grad(lambda a: ref_energy(model, a, x, y, loss, lam)))(
        activities
    )
    assert_trees_close(grads[:-1], ref_grads[:-1], atol=1e-14)
    np.testing.assert_array_equal(grads[-1], 0.0)

    model_grads, skip_grads = jit(jpc.compute_pc_param_grads)(
        params, activities, y, loss_id=loss, **kw
    )
    ref_param_grads = jit(
        eqx.filter_grad(lambda m: ref_energy(m, activities, x, y, loss, lam))
    )(model)
    # atol: a key bias cannot change a softmax, so its gradient is rounding noise
    assert_trees_close(model_grads, ref_param_grads, atol=1e-14)
    assert skip_grads is None


@pytest.mark.slow
def test_per_layer_energies_in_compatible_order(key):
    model, x, y, activities = problem(key, depth=2)
    layers = jit(jpc.pc_energy_fn)(
        (model, None), activities, y, x=x, record_layers=True
    )
    inputs = [x, *activities[:-1]]
    hidden = [
        0.5 * jnp.sum((activities[i] - ref_layer(model, i, inputs[i])) ** 2) / BATCH
        for i in range(3)
    ]
    output = 0.5 * jnp.sum((y - ref_layer(model, 3, activities[2])) ** 2) / BATCH
    np.testing.assert_allclose(
        layers, [output, hidden[1], hidden[2], hidden[0]], rtol=1e-10
    )


@pytest.mark.slow
def test_epc_energy_equals_pc_energy_at_the_matching_activities(key):
    """ePC errors e_l give activities z_l = f_l(z_{l-1}) + e_l with the same energy."""
    model, x, y, activities = problem(key)
    errors = [0.3 * z for z in activities[:-1]]
    z, zs = x, []
    for i, e in enumerate(errors):
        z = ref_layer(model, i, z) + e
        zs.append(z)
    zs.append(jnp.zeros((BATCH, N_CLASSES)))
    energy = jit(jpc.epc_energy_fn)((model, None), errors, y, x=x)
    np.testing.assert_allclose(energy, jit(ref_energy)(model, zs, x, y), rtol=1e-10)
    np.testing.assert_allclose(
        energy, jit(jpc.pc_energy_fn)((model, None), zs, y, x=x), rtol=1e-10
    )


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.slow
def test_feedforward_init_zero_hidden_errors_and_output_grads_equal_backprop(key, loss):
    model, x, y, _ = problem(key, loss)
    activities = jit(jpc.init_activities_with_ffwd)(model, x)
    layers = jit(jpc.pc_energy_fn)(
        (model, None), activities, y, x=x, loss=loss, record_layers=True
    )
    np.testing.assert_array_equal(layers[1:], 0.0)
    np.testing.assert_allclose(
        layers[0], jit(ref_bp_loss)(model, x, y, loss), rtol=1e-10
    )
    model_grads, _ = jit(jpc.compute_pc_param_grads)(
        (model, None), activities, y, x=x, loss_id=loss
    )
    bp_grads = jit(eqx.filter_grad(lambda m: ref_bp_loss(m, x, y, loss)))(model)
    assert_trees_close(model_grads[-1], bp_grads[-1], atol=1e-14)
    for g in jax.tree_util.tree_leaves(model_grads[:-1]):
        np.testing.assert_array_equal(g, 0.0)


def equilibrium(model, x, y, lam):
    """Inference by the library's ODE path, solved to a tight tolerance."""
    activities = jit(jpc.init_activities_with_ffwd)(model, x)
    out = jit(jpc.solve_inference)(
        (model, None),
        activities,
        y,
        input=x,
        output_energy_scaling=lam,
        solver=dfx.Tsit5(),
        max_t1=300,
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
    )
    return [z[-1] for z in out]


@pytest.mark.slow
def test_pc_param_grads_over_lambda_converge_to_backprop(key):
    """(1/lambda) dF/dtheta at equilibrium -> backprop gradient as lambda -> 0."""
    model, x, y, _ = problem(key, depth=1)
    bp_grads = jit(eqx.filter_grad(lambda m: ref_bp_loss(m, x, y)))(model)
    errors = []
    for lam in [1e-1, 1e-2, 1e-3]:
        final = equilibrium(model, x, y, lam)
        _, activity_grads = jit(jpc.compute_pc_activity_grad)(
            (model, None), final, y, x=x, output_energy_scaling=lam
        )
        assert max(float(jnp.max(jnp.abs(g))) for g in activity_grads) < 1e-8
        pc_grads, _ = jit(jpc.compute_pc_param_grads)(
            (model, None), final, y, x=x, output_energy_scaling=lam
        )
        errors.append(
            max_rel_err(
                jax.tree_util.tree_map(lambda g, c=lam: g / c, pc_grads), bp_grads
            )
        )
    # the error is O(lambda): it shrinks with lambda and is small at 1e-3
    assert errors[1] < 0.3 * errors[0] and errors[2] < 0.3 * errors[1], errors
    assert errors[2] < 1e-2, errors


@pytest.mark.slow
def test_discrete_and_ode_inference_reach_the_same_equilibrium(key):
    model, x, y, _ = problem(key, depth=1)
    ode = equilibrium(model, x, y, 1.0)
    sgd = optax.sgd(0.1)
    opt_state = sgd.init((eqx.filter(model, eqx.is_array), None))
    out = jpc.make_pc_step(
        model,
        sgd,
        opt_state,
        y,
        input=x,
        activity_optim=optax.sgd(0.2 * BATCH),  # 0.2 per example
        n_inference_steps=1500,
    )
    discrete = [z[-1] for z in out["activities"]]
    assert_trees_close(discrete[:-1], ode[:-1], rtol=1e-6, atol=1e-9)
    # the parameter update is SGD on jax.grad of the hand-written energy there
    grads = jit(eqx.filter_grad(lambda m: ref_energy(m, discrete, x, y)))(model)
    expected = jax.tree_util.tree_map(
        lambda p, g: p - 0.1 * g, eqx.filter(model, eqx.is_array), grads
    )
    assert_trees_close(eqx.filter(out["model"], eqx.is_array), expected, rtol=1e-8)


@pytest.mark.slow
def test_make_bp_step_matches_hand_gradient_and_trains(key):
    model, x, y, _ = problem(key, "ce")
    sgd = optax.sgd(0.1)
    state = sgd.init((eqx.filter(model, eqx.is_array), None))
    out = jpc.make_bp_step(model, sgd, state, y, input=x, loss_id="ce")
    grads = jit(eqx.filter_grad(lambda m: ref_bp_loss(m, x, y, "ce")))(model)
    expected = jax.tree_util.tree_map(
        lambda p, g: p - 0.1 * g, eqx.filter(model, eqx.is_array), grads
    )
    assert_trees_close(eqx.filter(out["model"], eqx.is_array), expected)
    np.testing.assert_allclose(out["loss"], ref_bp_loss(model, x, y, "ce"), rtol=1e-10)

    adam = optax.adam(1e-2)
    state = adam.init((eqx.filter(model, eqx.is_array), None))
    first = None
    for _ in range(40):
        out = jpc.make_bp_step(model, adam, state, y, input=x, loss_id="ce")
        model, state = out["model"], out["opt_state"]
        first = out["loss"] if first is None else first
    assert ref_bp_loss(model, x, y, "ce") < 0.3 * first


@pytest.mark.slow
def test_make_pc_step_trains_with_discrete_inference(key):
    model, x, y, _ = problem(key, "ce")
    adam = optax.adam(1e-2)
    state = adam.init((eqx.filter(model, eqx.is_array), None))
    first = ref_bp_loss(model, x, y, "ce")
    activity_optim = optax.sgd(0.5)  # one object: a new one would recompile
    for _ in range(40):
        out = jpc.make_pc_step(
            model,
            adam,
            state,
            y,
            input=x,
            loss_id="ce",
            activity_optim=activity_optim,
            n_inference_steps=5,
        )
        model, state = out["model"], out["opt_state"]
    assert ref_bp_loss(model, x, y, "ce") < 0.3 * first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(param_type="mupc"), "`param_type` must be 'sp' for `make_vit`"),
        (dict(param_type="ntp"), "`param_type` must be 'sp' for `make_vit`"),
        (dict(param_type="bad"), "`param_type` must be one of"),
        (dict(patch_size=3), r"`patch_size` \(3\) must divide the image height"),
        (dict(image_size=(4, 6), patch_size=4), "must divide the image width"),
        (dict(n_heads=3), r"`n_heads` \(3\) must divide `width` \(4\)"),
        (dict(image_size=(4, 4, 4)), "`image_size` must be an int or a"),
        (dict(width=0), "`width` must be a positive integer, got 0"),
        (dict(depth=-1), "`depth` must be a positive integer, got -1"),
        (dict(act_fn="swish"), "`act_fn` must be one of"),
    ],
)
def test_make_vit_errors(key, kwargs, match):
    options = dict(image_size=IMAGE, patch_size=PATCH, width=WIDTH, n_heads=2)
    with pytest.raises(ValueError, match=match):
        jpc.make_vit(key, **{**options, **kwargs})


def test_wrong_image_size_is_named(key):
    model = tiny_vit(key)
    x = jnp.zeros((BATCH, CHANNELS * IMAGE * IMAGE + 1))
    with pytest.raises(ValueError, match=r"PatchEmbedding expects one image of shape"):
        jit(jpc.init_activities_with_ffwd)(model, x)
