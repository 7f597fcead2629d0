"""Every backend the registry can open is held to its contract (the way httpx pins its public exports).

Adding a scheme to ``sdasync.backends.registry.REGISTRY`` without a factory in ``backends.py`` fails here.
Aliases (two schemes, one class) need one factory between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdasync.backends.registry import REGISTRY

from .backends import BLOB_FACTORIES, QUEUE_FACTORIES, STORE_FACTORIES

TABLES: dict[str, dict[str, Any]] = {"queue": QUEUE_FACTORIES, "store": STORE_FACTORIES, "blobs": BLOB_FACTORIES}
ENGINE_CONTRACT = Path(__file__).with_name("test_engine_contract.py")
FLEET_TESTS = Path(__file__).parents[1] / "integration" / "test_actuators.py"


def test_every_registry_role_has_a_contract() -> None:
    assert set(REGISTRY) == {*TABLES, "engine", "fleet"}


def test_every_registered_fleet_is_exercised_by_the_actuator_tests() -> None:
    """Fleets change real capacity (moto_server, local processes), so their suite is written by hand: it must
    open each scheme by URL (``"<scheme>://``)."""
    assert FLEET_TESTS.exists(), f"{FLEET_TESTS} is missing"
    text = FLEET_TESTS.read_text()
    missing = sorted(scheme for scheme in REGISTRY["fleet"] if f'"{scheme}://' not in text)
    assert not missing, f"{FLEET_TESTS.name} never opens {missing} (as \"<scheme>://...\")"


@pytest.mark.parametrize("role", sorted(TABLES))
def test_every_registered_backend_has_a_contract_factory(role: str) -> None:
    registered = REGISTRY[role]
    factories = TABLES[role]

    stale = sorted(set(factories) - set(registered))
    assert not stale, f"contract factories for schemes the registry does not know: {stale}"
    covered = {registered[scheme][0] for scheme in factories}
    missing = sorted({f"{scheme}:// ({target})" for scheme, (target, _) in registered.items() if target not in covered})
    assert not missing, f"no {role} contract factory in tests/contract/backends.py for {missing}"


def test_every_registered_engine_is_in_the_engine_contract() -> None:
    """Kept simple: the engine suite is written by hand, so it must name each engine, by class or by a quoted
    scheme of that class."""
    assert ENGINE_CONTRACT.exists(), f"{ENGINE_CONTRACT.name} is missing"
    text = ENGINE_CONTRACT.read_text()
    names: dict[str, set[str]] = {}
    for scheme, (target, _) in REGISTRY["engine"].items():
        names.setdefault(target, {target.partition(":")[2]}).add(f'"{scheme}"')
    missing = sorted(target for target, spellings in names.items() if not any(n in text for n in spellings))
    assert not missing, f"{ENGINE_CONTRACT.name} never mentions {missing} (by class name or quoted scheme)"
