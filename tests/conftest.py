"""Shared test configuration: the opt-in ``slow`` marker and data locations."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The project's ``shared/`` folder (beside the repository), if present."""
    env = os.environ.get("PYDRIFTN_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run full-size (slow) checks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def cutouts_dir():
    """Real DECam CP cutouts; the tests using them skip when shared/ is absent."""
    d = shared_dir() / "data" / "decam-cp-cutouts"
    if not d.is_dir():
        pytest.skip(f"real DECam cutouts not found at {d} (shared/ absent)")
    return d


@pytest.fixture(scope="session")
def sim_small(tmp_path_factory):
    """The simulator's ``small`` preset (seed 0), made once per test session.

    Tests must treat it as read-only (input files are never modified).
    """
    from pydriftn.simulate import simulate_dataset

    return simulate_dataset(tmp_path_factory.mktemp("sim_small"), preset="small", seed=0)
