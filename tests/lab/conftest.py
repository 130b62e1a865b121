"""Lab fixtures: network namespaces joined by an emulated WAN link (see netlab.py). Need root."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.netlab import Lab, lab_problem, sweep_stale


@pytest.fixture(scope="session")
def lab_host() -> None:
    """Skips (with the reason) where labs can't be built; sweeps what crashed runs left behind."""
    problem = lab_problem()
    if problem is not None:
        pytest.skip(problem)
    sweep_stale()


@pytest.fixture(scope="module")
def lab(lab_host: None) -> Iterator[Lab]:
    """One lab per test module; tests set the link they need with ``lab.set_link(...)``."""
    with Lab() as made:
        yield made
