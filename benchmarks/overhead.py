"""Where the time of one small `make_pc_step` call goes (workload W0).

    python -m benchmarks.overhead [--calls 5000]

Times, on W0 (8-8-8-2 tanh, batch 4, T = 20, fused discrete inference), each piece
of a call of `jpc.make_pc_step` in isolation — flattening the arguments, looking up
the compiled program, running it on its flat list of arrays, rebuilding the outputs
(with and without remembering the returned Equinox modules), reading a check flag —
next to the whole call and to the pure-JAX yardstick's call ("waited for": until one
output is ready). Medians of 5 repeats of `--calls` calls, in µs. These are `jpc`'s
internals (`jpc._jit`), read for diagnosis only.
"""

import argparse
import time

import jax
import numpy as np

import jpc
from benchmarks import yardstick as ys
from benchmarks.run import (
    ACTIVITY_LR,
    PARAM_LR,
    WORKLOADS,
    adam_state,
    flat_program,
    make_problem,
)
from jpc import _jit
from jpc._compat import jax_versions


def _median_us(fn, calls: int, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times) * 1e6)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead")
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args(argv)

    w = WORKLOADS["W0"]
    p = make_problem(w)
    kwargs = dict(
        input=p.x, activity_optim=p.activity_optim, n_inference_steps=w.n_steps
    )
    out = jpc.make_pc_step(p.model, p.optim, adam_state(p, p.model), p.y, **kwargs)
    out = jpc.make_pc_step(out["model"], p.optim, out["opt_state"], p.y, **kwargs)
    jax.block_until_ready(out)
    call_args = (out["model"], p.optim, out["opt_state"], p.y)  # remembered modules

    compiled, arrays = flat_program(jpc.make_pc_step, *call_args, **kwargs)
    flat_out, static = compiled(arrays)
    rebuild, messages = static.value
    flat_out = list(flat_out)
    code = flat_out.pop() if messages else None

    act = jpc.get_act_fn(w.act)
    ys_step = ys.make_pc_step(act, w.n_steps, ACTIVITY_LR, PARAM_LR)
    ys_out = ys_step(p.params, ys.adam_init(p.params), p.x, p.y)
    ys_args = (ys_out[0], ys_out[1], p.x, p.y)

    n = args.calls
    rows = {
        "flatten the arguments": _median_us(
            lambda: _jit.flatten((call_args, kwargs)), n
        ),
        "compiled program, dispatch only": _median_us(lambda: compiled(arrays), n),
        "compiled program, waited for": _median_us(
            lambda: compiled(arrays)[0][0].block_until_ready(), n
        ),
        "rebuild the outputs, remembering modules": _median_us(
            lambda: rebuild(flat_out, True), n
        ),
        "rebuild the outputs, without remembering": _median_us(
            lambda: rebuild(flat_out, False), n
        ),
        "read a ready check flag (np.asarray)": _median_us(
            lambda: int(np.asarray(code)), n
        ),
        "whole make_pc_step call": _median_us(
            lambda: jpc.make_pc_step(*call_args, **kwargs), n
        ),
        "whole make_pc_step call, waited for": _median_us(
            lambda: jpc.make_pc_step(*call_args, **kwargs)["loss"].block_until_ready(),
            n,
        ),
        "yardstick call": _median_us(lambda: ys_step(*ys_args), n),
        "yardstick call, waited for": _median_us(
            lambda: ys_step(*ys_args)[2].block_until_ready(), n
        ),
    }
    print(f"W0 ({w.note}), {jax_versions()}, {jax.default_backend()} backend")
    for name, value in rows.items():
        print(f"  {name:45s} {value:8.1f} µs")
    return rows


if __name__ == "__main__":
    main()
