"""Run by `test_sharding.py` in a subprocess with 4 host CPU devices (SPEC §9).

    python tests/sharding_worker.py [make_pc_step make_bp_step ...]


Every training step is run twice from the same state: on one device, and with the
batch sharded over a 4-device mesh and the parameters replicated. Prints one
line per step (`name max_rel_diff replicated sharded`) and exits non-zero on the
first failure. Not collected by pytest (no `test_` prefix).
"""

import os
import sys


os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import optax  # noqa: E402

import jpc  # noqa: E402


B, WIDTHS = 8, (6, 8, 8, 3)


def problem():
    kmodel, kgen, kx, ky = jr.split(jr.PRNGKey(0), 4)
    d_in, width, _, d_out = WIDTHS
    model = jpc.make_mlp(kmodel, d_in, width, 3, d_out, "tanh", use_bias=True)
    generator = jpc.make_mlp(kgen, d_out, width, 3, d_in, "tanh", use_bias=True)
    x = jr.normal(kx, (B, d_in))
    y = jax.nn.one_hot(jr.randint(ky, (B,), 0, d_out), d_out)
    return model, generator, x, y


def steps(model, generator):
    """name -> `f(model_state, x, y)` returning the step's output dict."""
    optim, activity_optim = optax.adam(1e-2), optax.sgd(0.5)
    discrete = dict(activity_optim=activity_optim, n_inference_steps=5)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    out = {
        "make_pc_step (ODE)": lambda m, s, x, y: jpc.make_pc_step(
            m, optim, s, y, input=x, max_t1=5.0, record_activities=True
        ),
        "make_pc_step (fused)": lambda m, s, x, y: jpc.make_pc_step(
            m, optim, s, y, input=x, weight_decay=1e-3, **discrete
        ),
        "make_bp_step": lambda m, s, x, y: jpc.make_bp_step(m, optim, s, y, input=x),
        # a deep μPC network whose hidden layers are held stacked (see `main`)
        "make_pc_step (stacked)": lambda m, s, x, y: jpc.make_pc_step(
            m[0], optim, s, y, input=x, skip_model=m[1], param_type="mupc", **discrete
        ),
    }
    if hasattr(jpc, "make_ipc_step"):
        out["make_ipc_step"] = lambda m, s, x, y: jpc.make_ipc_step(
            m, optim, s, y, input=x, **discrete
        )
    if hasattr(jpc, "make_zil_step"):
        out["make_zil_step"] = lambda m, s, x, y: jpc.make_zil_step(
            m, optim, s, y, input=x
        )
    if hasattr(jpc, "make_hpc_step"):
        optims = (optim, optim)
        gen_state = optim.init((eqx.filter(generator, eqx.is_array), None))
        hpc_state = (gen_state, optim.init(eqx.filter(model, eqx.is_array)))

        def hpc(m, s, x, y):
            # Generator: label y -> observation x; amortiser: x -> y (`model`).
            return jpc.make_hpc_step(*m, optims, s, x, input=y, **discrete)

        out["make_hpc_step"] = hpc
        return out, state, hpc_state
    return out, state, None


def max_rel_diff(a, b) -> float:
    leaves_a = [x for x in jtu.tree_leaves(a) if eqx.is_array(x)]
    leaves_b = [x for x in jtu.tree_leaves(b) if eqx.is_array(x)]
    assert len(leaves_a) == len(leaves_b) > 0
    worst = 0.0
    for u, v in zip(leaves_a, leaves_b):
        u, v = jnp.asarray(u), jnp.asarray(v)
        if not jnp.issubdtype(u.dtype, jnp.inexact):  # flags, counters: equal
            assert bool(jnp.all(u == v)), (u, v)
            continue
        finite = jnp.isfinite(u)
        assert bool(jnp.all(finite == jnp.isfinite(v)))
        scale = jnp.maximum(jnp.max(jnp.abs(jnp.where(finite, u, 0))), 1e-30)
        diff = jnp.max(jnp.abs(jnp.where(finite, u - v, 0)))
        worst = max(worst, float(diff / scale))
    return worst


def placement(out) -> tuple[bool, bool]:
    """(all parameter arrays replicated on 4 devices, activities batch-sharded)."""
    keys = ("model", "skip_model", "generator", "amortiser")
    params = [out.get(k) for k in keys]
    leaves = [x for x in jtu.tree_leaves(params) if eqx.is_array(x)]
    replicated = all(
        x.sharding.is_fully_replicated and len(x.sharding.device_set) == 4
        for x in leaves
    )
    acts = out.get("activities")
    if acts is None:
        return replicated, True
    # Activities carry (time, batch, ...): the batch axis is split in four. Hybrid
    # PC returns `(amortiser guesses (batch, ...), solve output (time, batch, ...))`.
    groups = [(acts, 1)]
    if "generator" in out:
        amortised, inferred = acts
        groups = [(amortised, 0), (inferred, 1)]
    sharded = all(
        not z.sharding.is_fully_replicated
        and z.addressable_shards[0].data.shape[axis] == z.shape[axis] // 4
        for group, axis in groups
        for z in jtu.tree_leaves(group)
    )
    return replicated, sharded


def check_batch_error(mesh, x) -> None:
    """A batch of 6 cannot be split over 4 devices: a `ValueError` naming it."""
    try:
        jpc.shard_batch({"x": x[:6]}, mesh)
    except ValueError as err:
        assert "(6, 6)" in str(err) and "['x']" in str(err), err
        print("shard_batch error\tok")
    else:
        raise AssertionError("shard_batch accepted a batch of 6 on 4 devices")


def main(names: list[str]) -> int:
    assert jax.device_count() == 4, jax.devices()
    model, generator, x, y = problem()
    mesh = jpc.make_data_mesh()
    check_batch_error(mesh, x)
    fns, state, hpc_state = steps(model, generator)
    jpc.set_layer_stacking(4)  # the run of 6 hidden layers below is stacked
    d_in, width, _, d_out = WIDTHS
    deep = jpc.make_mlp(jr.PRNGKey(1), d_in, width, 8, d_out, "relu", use_bias=True)
    deep = (deep, jpc.make_skip_model(8))
    deep_state = optax.adam(1e-2).init((eqx.filter(deep[0], eqx.is_array), deep[1]))
    x_sh, y_sh = jpc.shard_batch((x, y), mesh)
    assert not x_sh.sharding.is_fully_replicated
    assert x_sh.addressable_shards[0].data.shape == (B // 4, x.shape[1])
    failures = 0
    for name, fn in fns.items():
        if names and name.split(" ")[0] not in names:
            continue
        m, s = (model, state)
        if name == "make_hpc_step":
            m, s = (generator, model), hpc_state
        if name.endswith("(stacked)"):
            m, s = deep, deep_state
        single = fn(m, s, x, y)
        sharded = fn(jpc.replicate(m, mesh), jpc.replicate(s, mesh), x_sh, y_sh)
        diff = max_rel_diff(single, sharded)
        replicated, batch_sharded = placement(sharded)
        ok = diff < 1e-10 and replicated and batch_sharded
        failures += not ok
        verdict = "ok" if ok else "FAIL"
        print(f"{name}\t{diff:.2e}\t{replicated}\t{batch_sharded}\t{verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
