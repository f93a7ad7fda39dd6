"""Training loop used by `test_checkpoint.py`, in the test process and in a fresh one.

    python tests/checkpoint_worker.py CHECKPOINT N_STEPS OUT

loads the training state saved at CHECKPOINT (in a new Python process, so nothing
is shared with the process that saved it), trains N_STEPS more steps and saves the
result to OUT. Not collected by pytest (no `test_` prefix).
"""

import sys

import jax  # noqa: E402


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.random as jr  # noqa: E402
import optax  # noqa: E402

import jpc  # noqa: E402


BATCH, N_CLASSES = 4, 3
OPTIM = optax.adam(1e-2)
ACTIVITY_OPTIM = optax.sgd(0.5)


def fresh_state(seed: int = 0) -> dict:
    """Model, skip model, optimiser state, a typed and a legacy key, step 0."""
    model = jpc.make_vit(
        jr.PRNGKey(seed),
        image_size=4,
        patch_size=2,
        channels=1,
        width=4,
        depth=1,
        n_heads=2,
        n_classes=N_CLASSES,
    )
    opt_state = OPTIM.init((eqx.filter(model, eqx.is_array), None))
    return dict(
        model=model,
        skip_model=None,
        opt_state=opt_state,
        key=jr.key(seed + 1),
        noise_key=jr.PRNGKey(seed + 2),
        step=0,
    )


def train(state: dict, n_steps: int) -> dict:
    """`n_steps` PC steps on batches drawn from the state's keys."""
    state = dict(state)
    for _ in range(n_steps):
        key, data_key = jr.split(state["key"])
        noise_key, sub = jr.split(state["noise_key"])
        x = jr.normal(data_key, (BATCH, 16)) + 0.1 * jr.normal(sub, (BATCH, 16))
        y = jax.nn.one_hot(jr.randint(data_key, (BATCH,), 0, N_CLASSES), N_CLASSES)
        out = jpc.make_pc_step(
            state["model"],
            OPTIM,
            state["opt_state"],
            y,
            input=x,
            loss_id="ce",
            skip_model=state["skip_model"],
            activity_optim=ACTIVITY_OPTIM,
            n_inference_steps=3,
        )
        state.update(
            model=out["model"],
            skip_model=out["skip_model"],
            opt_state=out["opt_state"],
            key=key,
            noise_key=noise_key,
            step=state["step"] + 1,
        )
    return state


def main(checkpoint: str, n_steps: str, out: str) -> None:
    state = jpc.load_checkpoint(checkpoint, fresh_state(seed=1))
    jpc.save_checkpoint(out, train(state, int(n_steps)))


if __name__ == "__main__":
    main(*sys.argv[1:])
