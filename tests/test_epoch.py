"""`jpc.run_steps`: many training steps in one compiled program.

Every run is checked against the Python loop over the same batches (the same
step called once per batch, float64, rtol 1e-10), whose batch order is rebuilt
here from the documented permutation `permutation(fold_in(key, epoch), n)`.
"""

import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from helpers import assert_trees_close

import jpc


N, BATCH = 22, 5  # 4 batches per epoch, 2 examples dropped
WORKER = Path(__file__).with_name("multiprocess_worker.py")


def problem(d_in=4, width=6, d_out=2):
    kmodel, kx, ky = jr.split(jr.PRNGKey(0), 3)
    model = jpc.make_mlp(kmodel, d_in, width, 3, d_out, "tanh", use_bias=True)
    x = jr.normal(kx, (N, d_in))
    y = jax.nn.one_hot(jr.randint(ky, (N,), 0, d_out), d_out)
    optim = optax.adam(1e-2)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    return {"model": model, "skip_model": None, "opt_state": opt_state}, x, y, optim


def batch_order(key, n_epochs, n=N, batch_size=BATCH):
    """Index arrays of the documented batches, one per step."""
    out = []
    for epoch in range(n_epochs):
        order = (
            jnp.arange(n) if key is None else jr.permutation(jr.fold_in(key, epoch), n)
        )
        out += [
            order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)
        ]
    return out


def python_loop(step, state, x, y, batches, **kwargs):
    """The reference: one call of `step` per batch; metrics stacked by hand."""
    rows = []
    for idx in batches:
        out = step(**state, output=y[idx], input=x[idx], **kwargs)
        state = {name: out[name] for name in state}
        rows.append({k: v for k, v in out.items() if k not in state})
    stacked = {
        k: None
        if rows[0][k] is None
        else jax.tree.map(lambda *r: jnp.stack(r), *[r[k] for r in rows])
        for k in rows[0]
    }
    return state, stacked


def assert_run_equals_loop(step, key, n_epochs, **kwargs):
    state, x, y, optim = problem()
    got_state, got = jpc.run_steps(
        step,
        state,
        x,
        y,
        batch_size=BATCH,
        key=key,
        n_epochs=n_epochs,
        optim=optim,
        **kwargs,
    )
    batches = batch_order(key, n_epochs)
    want_state, want = python_loop(step, state, x, y, batches, optim=optim, **kwargs)
    assert_trees_close(
        eqx.filter(got_state, eqx.is_array), eqx.filter(want_state, eqx.is_array)
    )
    assert set(got) == set(want)
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            assert_trees_close(got[name], want[name])
    return got


@pytest.mark.slow
def test_pc_step_discrete_equals_python_loop_with_shuffling():
    got = assert_run_equals_loop(
        jpc.make_pc_step,
        jr.PRNGKey(3),
        2,
        activity_optim=optax.sgd(0.2),
        n_inference_steps=5,
        calculate_accuracy=True,
    )
    assert got["loss"].shape == (2 * (N // BATCH),)
    assert got["activity_norms"] is None


@pytest.mark.slow
def test_pc_step_ode_equals_python_loop_in_order():
    assert_run_equals_loop(
        jpc.make_pc_step, None, 1, max_t1=5.0, record_activities=True
    )


@pytest.mark.slow
def test_bp_step_equals_python_loop():
    got = assert_run_equals_loop(jpc.make_bp_step, jr.PRNGKey(4), 3)
    assert got["loss"].shape == (3 * (N // BATCH),)


@pytest.mark.slow
def test_ipc_step_equals_python_loop():
    assert_run_equals_loop(
        jpc.make_ipc_step,
        jr.PRNGKey(5),
        1,
        activity_optim=optax.sgd(0.2),
        n_inference_steps=3,
    )


@pytest.mark.slow
def test_zil_step_equals_python_loop():
    assert_run_equals_loop(jpc.make_zil_step, None, 1)


@pytest.mark.slow
def test_hpc_step_equals_python_loop():
    # Hybrid PC: the generator predicts the observation (`output=`, from `y`) from
    # the label (`input=`, from `x`); the state has the step's own names.
    kgen, kamort, kx, ky = jr.split(jr.PRNGKey(2), 4)
    generator = jpc.make_mlp(kgen, 3, 8, 3, 6, "tanh", use_bias=True)
    amortiser = jpc.make_mlp(kamort, 6, 8, 3, 3, "tanh", use_bias=True)
    optim = optax.adam(1e-2)
    opt_states = (
        optim.init((eqx.filter(generator, eqx.is_array), None)),
        optim.init(eqx.filter(amortiser, eqx.is_array)),
    )
    labels = jax.nn.one_hot(jr.randint(ky, (N,), 0, 3), 3)
    observations = jr.normal(kx, (N, 6))
    state = {"generator": generator, "amortiser": amortiser, "opt_states": opt_states}
    kw = dict(optims=(optim, optim), activity_optim=optax.sgd(0.5), n_inference_steps=4)
    key = jr.PRNGKey(6)
    got_state, got = jpc.run_steps(
        jpc.make_hpc_step, state, labels, observations, batch_size=BATCH, key=key, **kw
    )
    batches = batch_order(key, 1)
    want_state, want = python_loop(
        jpc.make_hpc_step, state, labels, observations, batches, **kw
    )
    assert_trees_close(
        eqx.filter(got_state, eqx.is_array), eqx.filter(want_state, eqx.is_array)
    )
    assert_trees_close(got["losses"], want["losses"])


@pytest.mark.slow
def test_pc_training_lowers_the_loss_over_epochs():
    state, x, y, optim = problem()
    kw = dict(optim=optim, activity_optim=optax.sgd(0.2), n_inference_steps=5)
    _, metrics = jpc.run_steps(
        jpc.make_pc_step,
        state,
        x,
        y,
        batch_size=BATCH,
        key=jr.PRNGKey(1),
        n_epochs=30,
        **kw,
    )
    per_epoch = metrics["loss"].reshape(30, -1).mean(axis=1)
    assert per_epoch[-1] < 0.7 * per_epoch[0]


def counting_step(count, output, input, key=None):
    """A user step: counts calls and returns the batch and key it was given."""
    return {
        "count": count + 1,
        "seen_y": output,
        "seen_x": input,
        "key": key,
        "none": None,
    }


@pytest.mark.parametrize("key", [None, jr.PRNGKey(7)])
def test_batches_follow_the_documented_order_and_drop_the_rest(key):
    x = jnp.arange(N, dtype=jnp.float64)[:, None] * jnp.ones((1, 3))
    y = -jnp.arange(N, dtype=jnp.float64)
    state, metrics = jpc.run_steps(
        counting_step,
        {"count": jnp.asarray(0)},
        x,
        y,
        batch_size=BATCH,
        key=key,
        n_epochs=2,
    )
    batches = batch_order(key, 2)
    assert int(state["count"]) == len(batches) == 2 * (N // BATCH)
    assert jnp.array_equal(metrics["seen_y"], -jnp.stack(batches).astype(jnp.float64))
    assert jnp.array_equal(
        metrics["seen_x"][..., 0], jnp.stack(batches).astype(jnp.float64)
    )
    assert metrics["key"] is None and metrics["none"] is None
    if key is not None:  # a fresh permutation per epoch
        assert not jnp.array_equal(metrics["seen_y"][:4], metrics["seen_y"][4:])


def test_step_key_gives_one_split_key_per_step():
    y = jnp.arange(N, dtype=jnp.float64)
    _, metrics = jpc.run_steps(
        counting_step,
        {"count": jnp.asarray(0)},
        y,
        y,
        batch_size=BATCH,
        step_key=jr.PRNGKey(9),
    )
    assert jnp.array_equal(metrics["key"], jr.split(jr.PRNGKey(9), N // BATCH))


def test_unsupervised_step_gets_no_input():
    def step(count, output, **kwargs):
        return {"count": count + 1, "has_input": jnp.asarray("input" in kwargs)}

    state, metrics = jpc.run_steps(
        step, {"count": jnp.asarray(0)}, None, jnp.ones((N, 2)), batch_size=BATCH
    )
    assert int(state["count"]) == N // BATCH and not bool(metrics["has_input"].any())


def nan_data():
    state, x, y, optim = problem()
    return state, x, y.at[13].set(jnp.nan), optim  # example 13: the third batch


@pytest.mark.slow
def test_failed_check_inside_the_scan_is_raised(raise_at_call):
    state, x, y, optim = nan_data()
    kw = dict(optim=optim, activity_optim=optax.sgd(0.2), n_inference_steps=2)
    with pytest.raises(
        eqx.EquinoxRuntimeError,
        match="make_pc_step: .*In one of the steps run by `run_steps`",
    ):
        jpc.run_steps(jpc.make_pc_step, state, x, y, batch_size=BATCH, **kw)


@pytest.mark.slow
def test_failed_check_is_reported_at_the_next_call_by_default():
    state, x, y, optim = nan_data()
    kw = dict(optim=optim, activity_optim=optax.sgd(0.2), n_inference_steps=2)
    _, metrics = jpc.run_steps(jpc.make_pc_step, state, x, y, batch_size=BATCH, **kw)
    assert bool(
        jnp.isfinite(metrics["loss"][:2]).all()
    )  # the steps before it are valid
    with pytest.raises(eqx.EquinoxRuntimeError, match="previous call of `run_steps`"):
        jpc.raise_pending_step_errors()


def simple():
    return {"count": jnp.asarray(0)}, jnp.ones((N, 2)), jnp.ones((N, 1))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(batch_size=0), "`batch_size` must be a positive integer, got 0"),
        (dict(batch_size=2.0), "`batch_size` must be a positive integer, got 2.0"),
        (dict(n_epochs=True), "`n_epochs` must be a positive integer, got True"),
        (dict(batch_size=N + 1), "at most the number of examples \\(22\\), got 23"),
        (dict(y=jnp.ones((N - 1, 1))), "one common leading .* 'y': 21"),
        (dict(y=jnp.ones(())), "one common leading"),
        (dict(state=[1]), "`state` must be a non-empty dict.*list"),
        (dict(state={}), "`state` must be a non-empty dict"),
        (dict(output=1), "do not also pass \\['output'\\]"),
        (dict(count=1), "do not also pass \\['count'\\]"),
        (dict(state={"input": 1}), "do not also pass \\['input'\\]"),
    ],
)
def test_bad_arguments_raise(change, match):
    state, x, y = simple()
    args = dict(state=state, x=x, y=y, batch_size=BATCH)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        jpc.run_steps(
            counting_step, args.pop("state"), args.pop("x"), args.pop("y"), **args
        )


def test_step_results_are_checked():
    state, x, y = simple()
    with pytest.raises(ValueError, match="must return a dict.*tuple"):
        jpc.run_steps(lambda count, **_: (count,), state, x, y, batch_size=BATCH)
    with pytest.raises(ValueError, match="has no \\['count'\\].*'total'"):
        jpc.run_steps(
            lambda count, **_: {"total": count}, state, x, y, batch_size=BATCH
        )
    with pytest.raises(ValueError, match="structure they came in"):
        jpc.run_steps(
            lambda count, **_: {"count": (count, count)}, state, x, y, batch_size=BATCH
        )


def run_worker(
    *args: str, devices: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_ENABLE_X64="1",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.run(
        [sys.executable, str(WORKER), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_run_steps_with_sharded_data_equals_one_device():
    # 4 host devices in a subprocess: data placed with `shard_batch`, state with
    # `replicate`; the result equals the unsharded run (rtol 1e-10, float64) and
    # the returned parameters are replicated over the 4 devices.
    proc = run_worker("devices", devices=4)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    verdicts = {cells[0]: cells[-1] for cells in lines}
    assert verdicts.get("run_steps sharded") == "ok", proc.stdout


def test_metrics_keeps_only_the_named_results():
    state, x, y, optim = problem()
    options = dict(batch_size=BATCH, optim=optim)
    _, every = jpc.run_steps(jpc.make_bp_step, state, x, y, **options)
    _, kept = jpc.run_steps(jpc.make_bp_step, state, x, y, metrics=("loss",), **options)
    assert set(kept) == {"loss"}
    assert_trees_close(kept["loss"], every["loss"])
    with pytest.raises(ValueError, match="`metrics` names results the step"):
        jpc.run_steps(jpc.make_bp_step, state, x, y, metrics=("acc",), **options)
