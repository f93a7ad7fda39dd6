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
