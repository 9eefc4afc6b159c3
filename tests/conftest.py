import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def zygote():
    """One fault-injection zygote for the session (torch imported once; every worker it forks
    is its own process): tests/test_faults.py and tests/test_kill_resume.py."""
    import os

    from influencekit.testing.faults import Zygote

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    with Zygote(env=env) as z:
        yield z
