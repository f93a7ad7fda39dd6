"""Shared pytest configuration: float64 for the numeric-identity tests, key fixtures."""

import jax


jax.config.update("jax_enable_x64", True)

import jax.random as jr  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jr.PRNGKey(0)


@pytest.fixture
def keys():
    """Ten independent keys, for tests that need several random draws."""
    return list(jr.split(jr.PRNGKey(1), 10))


@pytest.fixture(params=[0, 1, 2])
def seed(request):
    return request.param


@pytest.fixture(autouse=True)
def _no_pending_step_errors():
    """A failed check left pending by one test (reported at the next call of a
    training step) must not be raised in another test; the timing is reset."""
    yield
    from jpc import _jit

    _jit._pending.clear()
    _jit._timing["when"] = "next_call"


@pytest.fixture
def raise_at_call():
    """Training steps raise a failed runtime check at the failing call (the
    `"call"` timing), for tests of the error messages themselves; the default
    timing, which reports at the next call, is tested in test_step_errors.py."""
    import jpc

    jpc.set_step_error_timing("call")
    yield
