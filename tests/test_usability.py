"""What a newcomer meets first: exact accuracies, errors that say how to fix the
call, and jitted functions that present themselves like the functions they wrap.

References: exact rational arithmetic (`fractions.Fraction`) for the accuracy; for
the errors, the message text (each hint is asserted) and, where a call is
corrected as the hint says, the corrected call's result.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

import jpc


def _labels(n, correct):
    """One-hot truths and predictions agreeing on the first `correct` of `n` rows."""
    truths = np.eye(3, dtype=np.float32)[np.zeros(n, dtype=int)]
    preds = np.eye(3, dtype=np.float32)[(np.arange(n) >= correct).astype(int)]
    return truths, preds


def test_compute_accuracy_is_exact_for_exact_fractions():
    """9 of 9 gives exactly 100.0 in float32 (also under jit, where XLA turns a mean
    into a product with 1/n); every percentage is the float nearest the exact one
    within one rounding."""
    with jax.enable_x64(False):
        for fn in (jpc.compute_accuracy, jax.jit(jpc.compute_accuracy)):
            assert fn(*_labels(9, 9)).item() == 100.0
            assert fn(*_labels(8, 3)).item() == 37.5
        # Every count k = 0..n at once (vmap over the predictions), under jit.
        fn = jax.jit(jax.vmap(jpc.compute_accuracy, in_axes=(None, 0)))
        for n in (3, 6, 7, 9, 12, 30, 64):
            truths = _labels(n, 0)[0]
            preds = np.stack([_labels(n, k)[1] for k in range(n + 1)])
            out = fn(truths, preds)
            assert out.dtype == jnp.float32
            for k, value in enumerate(out.tolist()):
                exact = Fraction(100 * k, n)
                if Fraction(float(np.float32(exact))) == exact:
                    assert Fraction(value) == exact, (k, n, value)
                else:
                    assert abs(Fraction(value) - exact) <= exact / 2**23
