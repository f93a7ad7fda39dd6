"""Run by `test_epoch.py` and `test_multiprocess.py` in subprocesses.

    python tests/multiprocess_worker.py devices
    python tests/multiprocess_worker.py process PROCESS_ID PORT OUT.npz

`devices` (one process, 4 host CPU devices): `jpc.run_steps` with the data placed
by `jpc.shard_batch` and the state by `jpc.replicate` equals the unsharded run;
prints `run_steps sharded<TAB>ok`.

`process` (one of two processes, 2 host CPU devices each, joined by
`jax.distributed.initialize` on the loopback address, collectives over gloo):
each process passes its half of the batch to `jpc.shard_batch` over the global
4-device mesh, then runs `STEPS` data-parallel `jpc.make_pc_step` calls and one
`jpc.run_steps` epoch; process 0 saves the parameters to `OUT.npz` for the test
to compare with one process's run on the full batch. Exits with code 3 and a
line `unavailable<TAB>error` if the processes cannot be joined. Not collected by
pytest (no `test_` prefix).
"""

import sys


B, N, WIDTHS, STEPS = 8, 16, (6, 8, 3), 3


def problem():
    """Model, optimisers and data, identical in every process."""
    import equinox as eqx
    import jax
    import jax.random as jr
    import optax

    import jpc

    kmodel, kx, ky = jr.split(jr.PRNGKey(0), 3)
    d_in, width, d_out = WIDTHS
    model = jpc.make_mlp(kmodel, d_in, width, 3, d_out, "tanh", use_bias=True)
    x = jr.normal(kx, (N, d_in))
    y = jax.nn.one_hot(jr.randint(ky, (N,), 0, d_out), d_out)
    optim = optax.adam(1e-2)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    kwargs = dict(optim=optim, activity_optim=optax.sgd(0.2), n_inference_steps=4)
    return {"model": model, "skip_model": None, "opt_state": opt_state}, x, y, kwargs


def train(state, x, y, kwargs, place=lambda tree: tree):
    """`STEPS` `make_pc_step` calls on the first `B` examples, then one
    `run_steps` epoch over all `N` (shuffled, batches of `B`); `place` puts the
    data (its local part) on the devices. Returns both final models."""
    import jax.random as jr

    import jpc

    steps_state = dict(state)
    xb, yb = place(x[:B]), place(y[:B])
    for _ in range(STEPS):
        out = jpc.make_pc_step(**steps_state, output=yb, input=xb, **kwargs)
        steps_state = {name: out[name] for name in state}
    epoch_state, _ = jpc.run_steps(
        jpc.make_pc_step,
        state,
        place(x),
        place(y),
        batch_size=B,
        key=jr.PRNGKey(1),
        **kwargs,
    )
    return steps_state["model"], epoch_state["model"]


def arrays(model) -> list:
    """The parameters of `model` as NumPy arrays (a local copy of each)."""
    import equinox as eqx
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    return [np.asarray(leaf.addressable_shards[0].data) for leaf in leaves]


def devices() -> int:
    import jax
    import numpy as np

    import jpc

    assert jax.device_count() == 4, jax.devices()
    state, x, y, kwargs = problem()
    mesh = jpc.make_data_mesh()
    single = train(state, x, y, kwargs)
    sharded = train(
        jpc.replicate(state, mesh), x, y, kwargs, lambda t: jpc.shard_batch(t, mesh)
    )
    worst = max(
        float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
        for s, m in zip(single, sharded)
        for a, b in zip(arrays(s), arrays(m))
    )
    leaves = jax.tree_util.tree_leaves(sharded[1])
    replicated = all(
        leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
        for leaf in leaves
        if hasattr(leaf, "sharding")
    )
    try:  # a batch that cannot be split over the 4 devices
        jpc.run_steps(
            jpc.make_pc_step,
            state,
            *jpc.shard_batch((x, y), mesh),
            batch_size=6,
            **kwargs,
        )
        error = False
    except ValueError as err:
        error = "multiple of 4, got 6" in str(err)
    ok = worst < 1e-10 and replicated and error
    verdict = "ok" if ok else "FAIL"
    print(f"run_steps sharded\t{worst:.2e}\t{replicated}\t{error}\t{verdict}")
    return 0 if ok else 1


def process(process_id: int, port: int, out: str) -> int:
    import jax
    import numpy as np

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=2,
            process_id=process_id,
            initialization_timeout=300,
        )
    except Exception as err:  # reported by the test as a skip reason
        print(f"unavailable\t{type(err).__name__}: {err}")
        return 3
    import jpc

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    state, x, y, kwargs = problem()
    mesh = jpc.make_data_mesh()

    def local_half(tree):  # this process's contiguous half of each batch
        half = tree.shape[0] // 2
        return jpc.shard_batch(tree[process_id * half : (process_id + 1) * half], mesh)

    steps_model, epoch_model = train(
        jpc.replicate(state, mesh), x, y, kwargs, local_half
    )
    result = {f"steps_{i}": a for i, a in enumerate(arrays(steps_model))}
    result.update({f"epoch_{i}": a for i, a in enumerate(arrays(epoch_model))})
    if process_id == 0:
        np.savez(out, **result)
    print(f"process {process_id}\tok")
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "devices":
        sys.exit(devices())
    sys.exit(process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
