"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

# Set before Ray is imported anywhere: no usage-stats prompt or network call in tests.
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray instance for one test module (these machines have 2 cores).

    Yields:
        The ``ray`` module, initialised; shut down after the module's tests.
    """
    import ray
    import ray.data

    if ray.is_initialized():  # a leftover from a test that did not clean up
        ray.shutdown()
    # "local": a new instance even when another Ray (a `ray start --head`) runs on the machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # keeps pytest output readable
    yield ray
    ray.shutdown()
