"""Checkpoints: exact round trips, resuming in a fresh process, mismatch errors."""

import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from checkpoint_worker import fresh_state, train

import jpc


WORKER = Path(__file__).with_name("checkpoint_worker.py")


def assert_bitwise_equal(a, b):
    """Same structure, same dtypes, same bits (typed keys compared by key data)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        if isinstance(u, jax.Array) and jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
            assert v.dtype == u.dtype
            u, v = jr.key_data(u), jr.key_data(v)
        if eqx.is_array_like(u):
            assert type(u) is type(v) or (eqx.is_array(u) and eqx.is_array(v))
            u, v = np.asarray(u), np.asarray(v)
            assert u.dtype == v.dtype and u.shape == v.shape
            np.testing.assert_array_equal(u, v)
        else:
            assert u is v or u == v


def mlp_state(key, depth=3):
    """An MLP with a *learnt* skip model, Adam state, both kinds of key, a step."""
    k1, k2 = jr.split(key)
    model = jpc.make_mlp(k1, 3, 5, depth, 2, "tanh", use_bias=True)
    skip_model = [None] + [eqx.nn.Linear(5, 5, key=k2)] * (depth - 2) + [None]
    optim = optax.adam(1e-3)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), skip_model))
    return dict(
        model=model,
        skip_model=skip_model,
        opt_state=opt_state,
        key=jr.key(7),
        legacy_key=jr.PRNGKey(8),
        step=12,
        lr=np.float32(0.5),
        mask=np.array([True, False]),
    )


def test_round_trip_is_exact(tmp_path, key):
    state = mlp_state(key)
    path = tmp_path / "sub" / "state.eqx"
    jpc.save_checkpoint(path, state)
    like = mlp_state(jr.PRNGKey(99))
    like.update(key=jr.key(0), legacy_key=jr.PRNGKey(0), step=0)
    loaded = jpc.load_checkpoint(path, like)
    assert_bitwise_equal(loaded, state)
    assert type(loaded["step"]) is int and loaded["step"] == 12
    assert jr.key_impl(loaded["key"]) == jr.key_impl(state["key"])
    # the loaded keys draw the same numbers as the saved ones
    np.testing.assert_array_equal(
        jr.normal(loaded["key"], (3,)), jr.normal(state["key"], (3,))
    )
    np.testing.assert_array_equal(
        jr.normal(loaded["legacy_key"], (3,)), jr.normal(state["legacy_key"], (3,))
    )


def test_file_is_a_header_line_then_equinox_bytes(tmp_path, key):
    """Skipping the first line leaves a file `eqx.tree_deserialise_leaves` reads."""
    state = dict(w=jr.normal(key, (3, 2)), step=4)
    path = tmp_path / "state.eqx"
    jpc.save_checkpoint(path, state)
    with open(path, "rb") as f:
        f.readline()
        plain = eqx.tree_deserialise_leaves(f, dict(w=jnp.zeros((3, 2)), step=0))
    assert_bitwise_equal(plain, state)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.eqx"
    jpc.save_checkpoint(path, dict(w=jnp.ones(3)))

    def interrupted(f, tree):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(eqx, "tree_serialise_leaves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jpc.save_checkpoint(path, dict(w=jnp.zeros(3)))
    monkeypatch.undo()
    loaded = jpc.load_checkpoint(path, dict(w=jnp.zeros(3)))
    np.testing.assert_array_equal(loaded["w"], 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["state.eqx"]


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """k steps, save, load in a new process, k more == 2k steps without stopping."""
    k = 3
    halfway = train(fresh_state(), k)
    jpc.save_checkpoint(tmp_path / "halfway.eqx", halfway)
    # the fresh process imports the same `jpc` as this one
    root = str(Path(jpc.__file__).resolve().parent.parent)
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    proc = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            str(tmp_path / "halfway.eqx"),
            str(k),
            str(tmp_path / "resumed.eqx"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = jpc.load_checkpoint(tmp_path / "resumed.eqx", fresh_state(seed=5))
    uninterrupted = train(fresh_state(), 2 * k)
    assert resumed["step"] == 2 * k
    assert_bitwise_equal(resumed, uninterrupted)
    # and the run really moved: the parameters differ from the halfway state
    w_half = halfway["model"][-1].linear.weight
    assert not np.array_equal(w_half, resumed["model"][-1].linear.weight)


def test_mismatched_shape_names_the_leaf(tmp_path, key):
    jpc.save_checkpoint(tmp_path / "s.eqx", mlp_state(key))
    like = mlp_state(key)
    like["model"] = jpc.make_mlp(key, 3, 6, 3, 2, "tanh", use_bias=True)
    with pytest.raises(
        ValueError,
        match=r"at leaf `\['model'\]\[0\]\.layers\[1\]\.weight`: expected shape "
        r"\(6, 3\) and dtype float64, found shape \(5, 3\) and dtype float64",
    ):
        jpc.load_checkpoint(tmp_path / "s.eqx", like)


def test_mismatched_dtype_names_the_leaf(tmp_path, key):
    jpc.save_checkpoint(tmp_path / "s.eqx", dict(w=jnp.ones(3, jnp.float32)))
    with pytest.raises(
        ValueError, match=r"leaf `\['w'\]`: expected shape \(3,\) and dtype float64"
    ):
        jpc.load_checkpoint(tmp_path / "s.eqx", dict(w=jnp.ones(3)))


def test_typed_and_legacy_keys_are_not_interchangeable(tmp_path):
    jpc.save_checkpoint(tmp_path / "s.eqx", dict(key=jr.key(0)))
    with pytest.raises(
        ValueError,
        match=r"leaf `\['key'\]`: expected shape \(2,\) and dtype uint32, found "
        r"shape \(\) and dtype key<fry>",
    ):
        jpc.load_checkpoint(tmp_path / "s.eqx", dict(key=jr.PRNGKey(0)))


def test_mismatched_structure_names_the_leaf(tmp_path):
    jpc.save_checkpoint(tmp_path / "s.eqx", dict(a=jnp.ones(2), c=[jnp.ones(2)]))
    with pytest.raises(
        ValueError,
        match=r"structure of `like`: saved leaf 1 is `\['c'\]\[0\]` but `like` has "
        r"`\['b'\]\[0\]` there",
    ):
        jpc.load_checkpoint(tmp_path / "s.eqx", dict(a=jnp.ones(2), b=[jnp.ones(2)]))


def test_missing_and_extra_leaves_are_named(tmp_path):
    jpc.save_checkpoint(tmp_path / "s.eqx", dict(a=jnp.ones(2), b=jnp.ones(2)))
    with pytest.raises(
        ValueError,
        match=r"it holds 2 saved leaves and `like` 1; the first extra one, "
        r"in the checkpoint, is `\['b'\]`",
    ):
        jpc.load_checkpoint(tmp_path / "s.eqx", dict(a=jnp.ones(2)))
    with pytest.raises(
        ValueError,
        match=r"it holds 2 saved leaves and `like` 3; the first extra one, "
        r"in `like`, is `\['c'\]`",
    ):
        like = dict(a=jnp.ones(2), b=jnp.ones(2), c=jnp.ones(2))
        jpc.load_checkpoint(tmp_path / "s.eqx", like)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.eqx"
    eqx.tree_serialise_leaves(path, dict(a=jnp.ones(2)))
    with pytest.raises(ValueError, match="is not a checkpoint written by"):
        jpc.load_checkpoint(path, dict(a=jnp.ones(2)))
    path.write_text('{"format": "jpc.checkpoint", "version": 99}\n')
    with pytest.raises(ValueError, match="has format version 99"):
        jpc.load_checkpoint(path, dict(a=jnp.ones(2)))


# ------------------------------------------------- nothing silent, nothing lost


def nan_input_step(key, input_value=np.nan, output_value=0.0, discrete=True):
    """One `make_pc_step` whose `input` (or `output`) holds a non-finite value."""
    model = jpc.make_mlp(key, 3, 4, 2, 2, "tanh")
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    x = jnp.ones((2, 3)).at[1, 0].set(input_value)
    y = jnp.zeros((2, 2)).at[0, 1].set(output_value)
    kwargs = dict(activity_optim=optax.sgd(0.1), n_inference_steps=2)
    if not discrete:
        kwargs = {}
    return jpc.make_pc_step(model, optim, state, y, input=x, **kwargs)


def test_save_refuses_non_finite_leaves_and_names_them(tmp_path):
    path = tmp_path / "s.eqx"
    state = dict(model=dict(w=[jnp.ones(2), jnp.array([1.0, jnp.nan])]), step=3)
    with pytest.raises(
        ValueError, match=r"leaf `\['model'\]\['w'\]\[1\]` holds NaN or inf"
    ):
        jpc.save_checkpoint(path, state)
    with pytest.raises(ValueError, match=r"leaf `\['lr'\]` holds NaN or inf"):
        jpc.save_checkpoint(path, dict(w=jnp.ones(2), lr=float("inf")))
    with pytest.raises(ValueError, match=r"leaf `\['m'\]` holds NaN or inf"):
        jpc.save_checkpoint(path, dict(m=np.array([np.inf], np.float32)))
    assert list(tmp_path.iterdir()) == []  # nothing written
    # integer leaves and typed keys are never "non-finite"
    jpc.save_checkpoint(path, dict(n=jnp.arange(3), key=jr.key(0)))
    # told otherwise, the NaN is saved and loaded back as it was
    jpc.save_checkpoint(path, state, allow_non_finite=True)
    like = dict(model=dict(w=[jnp.zeros(2), jnp.zeros(2)]), step=0)
    assert_bitwise_equal(jpc.load_checkpoint(path, like), state)


def test_save_reports_a_pending_failed_step_first(tmp_path, key):
    path = tmp_path / "s.eqx"
    out = nan_input_step(key)  # returns at once; its check is pending
    state = dict(model=out["model"], step=1)
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=r"^make_pc_step: `input` contains NaN or inf"
    ):
        jpc.save_checkpoint(path, state, allow_non_finite=True)
    assert not path.exists()
    jpc.save_checkpoint(path, dict(w=jnp.ones(2)))  # reported once


@pytest.mark.parametrize(
    "discrete", [True, pytest.param(False, marks=pytest.mark.slow)]
)
def test_runtime_errors_name_the_non_finite_argument(key, raise_at_call, discrete):
    """Both inference paths of `make_pc_step` say which clamp held the NaN."""
    with pytest.raises(
        eqx.EquinoxRuntimeError,
        match=r"^make_pc_step: `input` contains NaN or inf; inference needs finite",
    ):
        nan_input_step(key, discrete=discrete)
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=r"^make_pc_step: `output` contains NaN or inf"
    ):
        nan_input_step(key, input_value=1.0, output_value=np.inf, discrete=discrete)
    nan_input_step(key, input_value=1.0, discrete=discrete)  # finite: no error


def test_bp_step_names_the_non_finite_argument(key, raise_at_call):
    model = jpc.make_mlp(key, 3, 4, 2, 2, "tanh")
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    x, y = jnp.ones((2, 3)), jnp.zeros((2, 2))
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=r"^make_bp_step: `input` contains NaN or inf"
    ):
        jpc.make_bp_step(model, optim, state, y, input=x.at[0, 0].set(np.nan))
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=r"^make_bp_step: `output` contains NaN or inf"
    ):
        jpc.make_bp_step(model, optim, state, y.at[0, 0].set(-np.inf), input=x)
    broken = eqx.tree_at(
        lambda m: m[0].layers[1].weight, model, model[0].layers[1].weight * np.nan
    )
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=r"^make_bp_step: the loss is not finite"
    ):
        jpc.make_bp_step(broken, optim, state, y, input=x)


def test_bp_step_check_is_deferred_by_default(key):
    model = jpc.make_mlp(key, 3, 4, 2, 2, "tanh")
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    x, y = jnp.ones((2, 3)), jnp.zeros((2, 2))
    jpc.make_bp_step(model, optim, state, y, input=x.at[0, 0].set(np.nan))
    with pytest.raises(eqx.EquinoxRuntimeError, match="call of `make_bp_step`"):
        jpc.raise_pending_step_errors()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_permissions_follow_the_umask(tmp_path, umask):
    path = tmp_path / "s.eqx"
    previous = os.umask(umask)
    try:
        jpc.save_checkpoint(path, dict(w=jnp.ones(2)))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


AT_EXIT = """
import jax, jax.numpy as jnp, numpy as np, equinox as eqx, optax
import jpc
model = jpc.make_mlp(jax.random.PRNGKey(0), 3, 4, 2, 2, "tanh")
optim = optax.sgd(0.1)
state = optim.init((eqx.filter(model, eqx.is_array), None))
x = jnp.ones((2, 3)).at[1, 0].set(np.nan)
jpc.make_pc_step(model, optim, state, jnp.zeros((2, 2)), input=x,
                 activity_optim=optax.sgd(0.1), n_inference_steps=2)
print("done")
"""


@pytest.mark.slow
def test_failed_check_pending_at_exit_is_printed():
    root = str(Path(jpc.__file__).resolve().parent.parent)
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-c", AT_EXIT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "done"
    assert (
        "jpc: the last call of `make_pc_step` failed its runtime check, which was "
        "still pending at exit (its results are not valid): make_pc_step: `input` "
        "contains NaN or inf" in proc.stderr
    ), proc.stderr[-3000:]
    # and a successful last step prints nothing
    ok = AT_EXIT.replace(".set(np.nan)", ".set(2.0)")
    proc = subprocess.run(
        [sys.executable, "-c", ok], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "jpc:" not in proc.stderr, proc.stderr[-3000:]
