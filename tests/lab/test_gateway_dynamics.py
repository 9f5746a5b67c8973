"""The Proton-like schedule of port moves and reconnects: pure, seeded, replayable."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doublenat.lab.dynamics import DEFAULT_ADDRESS_POOL, HappeningKind, ProtonDynamics

START = 1000.0
HOME = IPv4Address("11.22.33.44")
MOVE, RECONNECT = HappeningKind.MOVE, HappeningKind.RECONNECT


def test_fixed_intervals_without_jitter() -> None:
    dynamics = ProtonDynamics(move_every=100, reconnect_every=250)
    timeline = dynamics.timeline(START, START + 600, HOME)
    assert [(h.time - START, h.kind) for h in timeline] == [
        (100, MOVE),
        (200, MOVE),
        (250, RECONNECT),
        (300, MOVE),
        (400, MOVE),
        (500, RECONNECT),  # a reconnect before a move due at the same instant
        (500, MOVE),
        (600, MOVE),
    ]


def test_the_same_seed_gives_the_same_story_and_another_seed_another() -> None:
    def story(seed: int) -> list[object]:
        dynamics = ProtonDynamics(move_every=60, reconnect_every=300, jitter=0.5, seed=seed,
                                  reconnect_epochs=(0, 5_000_000))
        return dynamics.timeline(START, START + 3600, HOME)

    assert story(7) == story(7)
    assert story(7) != story(8)


def test_moves_keep_their_times_when_only_reconnects_change() -> None:
    def move_times(reconnect_every: float | None) -> list[float]:
        dynamics = ProtonDynamics(move_every=60, reconnect_every=reconnect_every, jitter=0.3,
                                  seed=1)
        return [h.time for h in dynamics.timeline(START, START + 3600, HOME) if h.kind is MOVE]

    assert move_times(None) == move_times(200) == move_times(900)


def test_reconnects_bring_a_new_address_every_time_and_an_epoch_from_the_range() -> None:
    dynamics = ProtonDynamics(reconnect_every=10, seed=5, reconnect_epochs=(100, 200),
                              reconnect_downtime=3)
    timeline = dynamics.timeline(START, START + 2000, HOME)
    assert len(timeline) == 200 and {h.kind for h in timeline} == {RECONNECT}
    previous = HOME
    for happening in timeline:
        assert happening.address is not None and happening.address != previous
        assert any(happening.address in network for network in DEFAULT_ADDRESS_POOL)
        assert 100 <= happening.epoch <= 200
        assert happening.downtime == 3
        previous = happening.address


def test_reconnects_cycle_through_given_addresses() -> None:
    pool = (IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"))
    dynamics = ProtonDynamics(reconnect_every=1, addresses=pool)
    addresses = [h.address for h in dynamics.timeline(START, START + 4, pool[0])]
    assert addresses == [pool[1], pool[0], pool[1], pool[0]]


def test_nothing_switched_on_is_an_empty_schedule() -> None:
    assert ProtonDynamics().timeline(START, START + 10**6, HOME) == []


@settings(max_examples=50, deadline=None)
@given(
    every=st.floats(1, 1000),
    jitter=st.floats(0, 0.99),
    seed=st.integers(0, 2**32),
)
def test_jittered_intervals_stay_within_their_bounds(every: float, jitter: float,
                                                     seed: int) -> None:
    dynamics = ProtonDynamics(move_every=every, jitter=jitter, seed=seed)
    times = [h.time for h in dynamics.timeline(START, START + 50 * every, HOME)]
    assert times, f"seed {seed}"
    gaps = [b - a for a, b in zip([START, *times], times, strict=False)]
    for gap in gaps:
        assert every * (1 - jitter) - 1e-6 <= gap <= every * (1 + jitter) + 1e-6, f"seed {seed}"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"move_every": 0},
        {"reconnect_every": -1},
        {"jitter": 1},
        {"jitter": -0.1},
        {"reconnect_downtime": -1},
        {"reconnect_epochs": (5, 4)},
        {"reconnect_epochs": (0, 2**32)},
        {"addresses": (IPv4Address("192.0.2.1"),)},
    ],
)
def test_bad_dynamics_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProtonDynamics(**kwargs)  # type: ignore[arg-type]


def test_moves_may_come_with_a_new_address() -> None:
    dynamics = ProtonDynamics(move_every=10, reconnect_every=25, moves_change_address=True)
    timeline = dynamics.timeline(START, START + 50, HOME)
    addresses = [h.address for h in timeline]
    assert [h.kind for h in timeline] == [MOVE, MOVE, RECONNECT, MOVE, MOVE, RECONNECT, MOVE]
    assert None not in addresses
    assert all(a != b for a, b in zip([HOME, *addresses], addresses, strict=False))
