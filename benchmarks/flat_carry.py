"""Does a PC step compile in depth-flat time when its activities stay stacked?

    python -m benchmarks.flat_carry [--depths 8 16 32 64 128] [--steps 10] [--rounds 7]

A question about XLA, asked with the PC maths written directly in JAX (no `jpc`):
a residual ReLU MLP with μPC's hidden-layer scaling (width $N$ = 64, batch 32,
input 64, output 10, no biases; hidden layers
$z_l = z_{l-1} + W_l\\,\\phi(z_{l-1}) / \\sqrt{N L}$, standard normal $W_l$;
input and output weights scaled by one over the square root of their fan-in).
One training step: feedforward initialisation, 20 SGD steps on the activities, Adam
on the weights at the final activities. Two programs of the same maths:

- `unrolled`: the activities and weights are lists of per-layer arrays, as the
  list-of-layers interface holds them; every layer is traced.
- `stacked`: the hidden activities are one `(L - 1, batch, width)` array and the
  hidden weights one `(L - 2, width, width)` array for the whole step, inference
  loop included. The feedforward pass is one `jax.lax.scan` over the layers; the
  energy's predictions, which given the activities do not depend on each other,
  are one `jax.vmap` over the layers (batched matrix products). Either body is
  traced once, whatever the depth.

Each (program, depth) runs in a fresh process; reported are `jit(...).lower()`
(tracing and lowering) and `.compile()` (XLA) in seconds, the median step time in
ms, and the largest difference between the two programs' weight gradients at the
final activities (they must compute the same step). A third process per depth
times both steps alternately in rounds and reports the stacked step's time over
the unrolled one's (median of the per-round ratios, wall and CPU): the step times
of separate processes drift with the machine's load.
"""

import argparse
import json
import subprocess
import sys
import time

from benchmarks.versions import per_call


WIDTH, BATCH, D_IN, D_OUT, T, ACTIVITY_LR, PARAM_LR = 64, 32, 64, 10, 20, 0.1, 1e-3


def _problem(depth: int):
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    keys = jr.split(jr.PRNGKey(0), depth + 2)
    w_in = jr.normal(keys[0], (D_IN, WIDTH)) / jnp.sqrt(D_IN)
    hidden = [jr.normal(k, (WIDTH, WIDTH)) for k in keys[1 : depth - 1]]
    w_out = jr.normal(keys[depth - 1], (WIDTH, D_OUT)) / jnp.sqrt(WIDTH)
    x = jr.normal(keys[depth], (BATCH, D_IN))
    y = jax.nn.one_hot(jr.randint(keys[depth + 1], (BATCH,), 0, D_OUT), D_OUT)
    return w_in, hidden, w_out, x, y


def _adam(params, grads, state):
    import jax
    import jax.numpy as jnp

    m, v, t = state
    t = t + 1
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
    v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g**2, v, grads)
    lr = PARAM_LR * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    params = jax.tree.map(
        lambda p, m, v: p - lr * m / (jnp.sqrt(v) + 1e-8), params, m, v
    )
    return params, (m, v, t)


def _train_step(energy, feedforward):
    """Feedforward init, `T` SGD steps on the activities, Adam on the weights."""
    import jax

    def step(params, opt_state, x, y):
        z = feedforward(params, x)

        def infer(z, _):
            g = jax.grad(energy, argnums=1)(params, z, x, y)
            return jax.tree.map(lambda a, b: a - ACTIVITY_LR * b, z, g), None

        z, _ = jax.lax.scan(infer, z, length=T)
        grads = jax.grad(energy)(params, z, x, y)
        return (*_adam(params, grads, opt_state), grads)

    return step


def _hidden(depth: int):
    """One hidden layer, `z + relu(z) @ w / sqrt(width * depth)`."""
    import jax
    import jax.numpy as jnp

    scale = 1 / jnp.sqrt(WIDTH * depth)

    def hidden(w, z):
        return z + scale * jax.nn.relu(z) @ w

    return hidden


def _unrolled(depth: int):
    import jax
    import jax.numpy as jnp

    hidden = _hidden(depth)

    def feedforward(params, x):
        w_in, ws, _ = params
        z = [x @ w_in]
        for w in ws:
            z.append(hidden(w, z[-1]))
        return z

    def energy(params, z, x, y):
        w_in, ws, w_out = params
        e = jnp.sum((z[0] - x @ w_in) ** 2)
        for w, below, above in zip(ws, z[:-1], z[1:]):
            e += jnp.sum((above - hidden(w, below)) ** 2)
        e += jnp.sum((y - jax.nn.relu(z[-1]) @ w_out) ** 2)
        return 0.5 * e / BATCH

    return _train_step(energy, feedforward)


def _stacked(depth: int):
    import jax
    import jax.numpy as jnp

    hidden = _hidden(depth)

    def feedforward(params, x):
        w_in, ws, _ = params
        z0 = x @ w_in

        def layer(z, w):
            z = hidden(w, z)
            return z, z

        _, rest = jax.lax.scan(layer, z0, ws)
        return jnp.concatenate([z0[None], rest])

    def energy(params, z, x, y):
        w_in, ws, w_out = params
        preds = jax.vmap(hidden)(ws, z[:-1])  # given the activities, all at once
        e = jnp.sum((z[0] - x @ w_in) ** 2) + jnp.sum((z[1:] - preds) ** 2)
        e += jnp.sum((y - jax.nn.relu(z[-1]) @ w_out) ** 2)
        return 0.5 * e / BATCH

    return _train_step(energy, feedforward)


def _build(program: str, depth: int):
    """`(jitted step, its arguments)` of one program at one depth."""
    import jax
    import jax.numpy as jnp

    w_in, hidden, w_out, x, y = _problem(depth)
    if program == "stacked":
        params, step = (w_in, jnp.stack(hidden), w_out), _stacked(depth)
    else:
        params, step = (w_in, hidden, w_out), _unrolled(depth)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (zeros, zeros, jnp.zeros((), jnp.int32))
    return jax.jit(step), (params, state, x, y)


def measure(program: str, depth: int, steps: int) -> dict:
    import jax.numpy as jnp
    import numpy as np

    step, args = _build(program, depth)
    t = time.perf_counter()
    lowered = step.lower(*args)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    _, _, grads = compiled(*args)
    step_s = per_call(lambda: compiled(*args), steps)
    g_hidden = grads[1] if program == "stacked" else jnp.stack(grads[1])
    return {
        "lower_s": lower_s,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "grads": [np.asarray(g).tolist() for g in (grads[0], g_hidden, grads[2])],
    }


def paired(depth: int, rounds: int) -> dict:
    """The stacked step's time over the unrolled one's, both in this process.

    `benchmarks.run.time_interleaved`: rounds of about 0.2 s per program, their
    order reversed every other round; the median over rounds of the per-round
    ratio (wall and process CPU time), robust to load that drifts between rounds.
    """
    from benchmarks.run import time_interleaved

    impls = {}
    for program in ("unrolled", "stacked"):
        step, args = _build(program, depth)
        impls[program] = (lambda a, step=step: (a, step(*a)[2]), args)
    out = time_interleaved(impls, rounds, target=0.2)["stacked"]
    return {"wall": out["paired_ratio"], "cpu": out["paired_cpu_ratio"]}


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        program, depth = args.one
        if program == "paired":
            print(json.dumps(paired(int(depth), args.rounds)))
        else:
            print(json.dumps(measure(program, int(depth), args.steps)))
        return
    rows = {}
    print("depth  program   lower s  compile s  step ms")
    for depth in args.depths:
        for program in ("unrolled", "stacked", "paired"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.flat_carry", "--one", program,
                 str(depth), "--steps", str(args.steps), "--rounds", str(args.rounds)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows[program, depth] = json.loads(out.stdout.splitlines()[-1])
            r = rows[program, depth]
            if program == "paired":
                print(
                    f"       stacked / unrolled step, paired: wall {r['wall']:.2f},"
                    f" CPU {r['cpu']:.2f}"
                )
                continue
            print(
                f"{depth:5d}  {program:8s} {r['lower_s']:8.2f} {r['compile_s']:10.2f}"
                f" {r['step_ms']:8.2f}"
            )
        a, b = (
            np.concatenate([np.ravel(g) for g in rows[program, depth]["grads"]])
            for program in ("unrolled", "stacked")
        )
        print(
            f"       weight gradients: largest {np.max(np.abs(a)):.2e}, largest"
            f" difference {np.max(np.abs(a - b)):.2e}"
        )
    for program in ("unrolled", "stacked"):
        first, last = min(args.depths), max(args.depths)
        ratio = (rows[program, last]["lower_s"] + rows[program, last]["compile_s"]) / (
            rows[program, first]["lower_s"] + rows[program, first]["compile_s"]
        )
        print(f"{program}: lower + compile, depth {last} / depth {first}: {ratio:.2f}")


if __name__ == "__main__":
    main()
