"""The state ports' contract against the SQLite adapters and the in-memory fakes.

Each implementation is a factory of `StatePorts` in `IMPLEMENTATIONS`; the one
`ports` fixture runs the whole suite over each. The assignments in the
factories are what makes mypy check that every adapter and fake implements its
ports. The PostgreSQL factory runs the same adapters over a database of the test's
own on the machine's PostgreSQL (created for the test, dropped after it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from connector.adapters.landings import SqlLandings
from connector.adapters.ledger import RunLedger
from connector.adapters.sql import Database
from connector.adapters.state import StateStore
from connector.fakestate import MemoryLandings, MemoryLedger, MemoryState
from connector.ports import Landings
from tests.contract.state_contract import LandingsContract, StateContract, StatePorts
from tests.harness.postgres import temp_database


def sql_ports(state: StateStore) -> StatePorts:
    """Every state port over one SQL state store (SQLite or PostgreSQL) and its ledger."""
    ledger = RunLedger(state)
    return StatePorts(
        catalog=state,
        disk_states=state,
        runs=state,
        ledger=ledger,
        controls=ledger,
        journal=ledger,
        blocks=state,
        retention=state,
    )


@contextmanager
def sqlite_ports(tmp_path: Path) -> Iterator[StatePorts]:
    state = StateStore.at_path(tmp_path / "state.db")
    try:
        yield sql_ports(state)
    finally:
        state.close()


@contextmanager
def postgresql_ports(tmp_path: Path) -> Iterator[StatePorts]:
    with temp_database() as url:
        state = StateStore(Database(url))
        try:
            yield sql_ports(state)
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
    "postgresql": postgresql_ports,
    "memory": memory_ports,
}


class TestStatePorts(StateContract):
    @pytest.fixture(
        params=[
            pytest.param(
                name, id=name, marks=[pytest.mark.integration] if name == "postgresql" else []
            )
            for name in IMPLEMENTATIONS
        ]
    )
    def ports(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StatePorts]:
        with IMPLEMENTATIONS[request.param](tmp_path) as ports:
            yield ports


class TestLandings(LandingsContract):
    @pytest.fixture(
        params=[
            "sqlite",
            pytest.param("postgresql", marks=[pytest.mark.integration]),
            "memory",
        ]
    )
    def landings(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Landings]:
        if request.param == "memory":
            yield MemoryLandings()
            return
        if request.param == "postgresql":
            with temp_database() as url:
                pg = StateStore(Database(url))
                try:
                    yield SqlLandings(pg.db)
                finally:
                    pg.close()
            return
        state = StateStore.at_path(tmp_path / "state.db")
        try:
            yield SqlLandings(state.db)
        finally:
            state.close()
