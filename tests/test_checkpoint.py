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
