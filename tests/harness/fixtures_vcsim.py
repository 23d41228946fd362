"""pytest fixtures: the test CA and one vCenter simulator for the session.

Wire in with `pytest_plugins = ["tests.harness.fixtures_vcsim", ...]` in
tests/conftest.py (listed before plugins that import from it).

Both fixtures keep their value in the session's stash, so that when the same
fixture function is registered twice (another plugin re-exporting `test_ca`, a test
module importing `vcsim`), every registration still yields the one CA and the one
simulator: a second CA with the same name would fail certificate checks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.ca import TestCA, make_ca
from tests.harness.vcsim import Simulator, start_simulator

_CA = pytest.StashKey[TestCA]()
_SIMULATOR = pytest.StashKey[Simulator]()


@pytest.fixture(scope="session")
def test_ca(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A throwaway CA; every test server's certificate is issued by it."""
    stash = request.config.stash
    if _CA not in stash:
        stash[_CA] = make_ca(tmp_path_factory.mktemp("ca"))
    return stash[_CA]


@pytest.fixture(scope="session")
def vcsim(
    request: pytest.FixtureRequest, test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Simulator]:
    """The simulator, shared by the session: tests create their own VMs in it."""
    stash = request.config.stash
    if _SIMULATOR in stash:
        yield stash[_SIMULATOR]
        return
    sim = start_simulator(tmp_path_factory.mktemp("vcsim"), test_ca)
    stash[_SIMULATOR] = sim
    try:
        yield sim
    finally:
        del stash[_SIMULATOR]
        sim.stop()
