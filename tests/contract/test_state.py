"""The state ports' contract against the SQLite adapters and the in-memory fakes.

Each implementation is a factory of `StatePorts` in `IMPLEMENTATIONS`; the one
`ports` fixture runs the whole suite over each. The assignments in the
factories are what makes mypy check that every adapter and fake implements its
ports. (A PostgreSQL factory goes next to these, its param marked integration.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from connector.adapters.landings import SqlLandings
from connector.adapters.ledger import RunLedger
from connector.adapters.state import StateStore
from connector.fakestate import MemoryLandings, MemoryLedger, MemoryState
from connector.ports import Landings
from tests.contract.state_contract import LandingsContract, StateContract, StatePorts


@contextmanager
def sqlite_ports(tmp_path: Path) -> Iterator[StatePorts]:
    state = StateStore.at_path(tmp_path / "state.db")
    ledger = RunLedger(state)
    try:
        yield StatePorts(
            catalog=state,
            disk_states=state,
            runs=state,
            ledger=ledger,
            controls=ledger,
            journal=ledger,
            blocks=state,
            retention=state,
        )
    finally:
        state.close()


@contextmanager
def memory_ports(tmp_path: Path) -> Iterator[StatePorts]:
    state = MemoryState()
    ledger = MemoryLedger(state)
    yield StatePorts(
        catalog=state,
        disk_states=state,
        runs=state,
        ledger=ledger,
        controls=ledger,
        journal=ledger,
        blocks=state,
        retention=state,
    )


IMPLEMENTATIONS: dict[str, Callable[[Path], AbstractContextManager[StatePorts]]] = {
    "sqlite": sqlite_ports,
    "memory": memory_ports,
}


class TestStatePorts(StateContract):
    @pytest.fixture(params=[pytest.param(name, id=name) for name in IMPLEMENTATIONS])
    def ports(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StatePorts]:
        with IMPLEMENTATIONS[request.param](tmp_path) as ports:
            yield ports


class TestLandings(LandingsContract):
    @pytest.fixture(params=["sqlite", "memory"])
    def landings(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Landings]:
        if request.param == "memory":
            yield MemoryLandings()
            return
        state = StateStore.at_path(tmp_path / "state.db")
        try:
            yield SqlLandings(state.db)
        finally:
            state.close()
