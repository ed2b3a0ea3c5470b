"""The balancing strategies and the pool, with plain objects (no sockets)."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass

import pytest

from stickylb.config import build_config
from stickylb.core.pool import Pool
from stickylb.core.strategies import (
    STRATEGIES,
    LeastConnections,
    SmoothWeightedRoundRobin,
    WeightedRandom,
)


@dataclass
class B:
    key: str
    weight: float = 1.0
    active: int = 0
    elsewhere: int = 0  # other workers' or instances' connections


def test_smooth_round_robin_interleaves_like_nginx():
    a, b, c = B("a", 5), B("b", 1), B("c", 1)
    rr = SmoothWeightedRoundRobin()
    picks = "".join(rr.pick([a, b, c]).key for _ in range(14))
    assert picks == "aabacaa" * 2


def test_round_robin_equal_weights_rotate():
    backends = [B("a"), B("b"), B("c")]
    rr = SmoothWeightedRoundRobin()
    assert [rr.pick(backends).key for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_distribution_matches_weights_when_set_changes():
    a, b, c = B("a", 3), B("b", 2), B("c", 1)
    rr = SmoothWeightedRoundRobin()
    counts = collections.Counter(rr.pick([a, b, c]).key for _ in range(600))
    assert counts == {"a": 300, "b": 200, "c": 100}
    counts = collections.Counter(rr.pick([a, c]).key for _ in range(400))
    assert counts == {"a": 300, "c": 100}


def test_least_connections_prefers_fewest_relative_to_weight():
    a, b = B("a", weight=2, active=3), B("b", weight=1, active=2)
    lc = LeastConnections()
    assert lc.pick([a, b]).key == "a"  # 1.5 per weight against 2.0
    b.active = 1
    assert lc.pick([a, b]).key == "b"
    b.elsewhere = 3  # connections through other workers or instances count too
    assert lc.pick([a, b]).key == "a"


def test_least_connections_breaks_ties_in_rotation():
    backends = [B("a"), B("b"), B("c")]
    lc = LeastConnections()
    picks = collections.Counter(lc.pick(backends).key for _ in range(30))
    assert picks == {"a": 10, "b": 10, "c": 10}


def test_weighted_random_follows_weights():
    rng = random.Random(7)
    wr = WeightedRandom(rng)
    backends = [B("a", 3), B("b", 1)]
    counts = collections.Counter(wr.pick(backends).key for _ in range(8000))
    assert 0.72 < counts["a"] / 8000 < 0.78


def test_registry_names():
    assert set(STRATEGIES) == {"round-robin", "least-connections", "random"}


def make_pool(**extra):
    return Pool.from_config(
        build_config(
            port=0,
            backends=[
                {"id": "a", "url": "http://127.0.0.1:1"},
                {"id": "b", "url": "http://127.0.0.1:2"},
                {"id": "z", "url": "http://127.0.0.1:3", "weight": 0},
            ],
            **extra,
        )
    )


def test_pool_pins_rebalances_and_never_picks_weight_zero_for_new_clients():
    pool = make_pool()
    a, b, z = pool.backends
    assert {pool.choose(None).backend.id for _ in range(20)} == {"a", "b"}
    assert pool.choose(z.token) == (z, False, True)  # weight 0 keeps its pinned clients
    assert pool.choose("garbage").repinned
    pool.record_check(a, False, "down")
    assert all(pool.choose(a.token).backend is b for _ in range(5))
    assert pool.choose(a.token).repinned


def test_pool_full_backend_is_skipped():
    pool = Pool.from_config(
        build_config(
            port=0,
            backends=[
                {"id": "a", "url": "http://127.0.0.1:1", "maxConnections": 1},
                {"id": "b", "url": "http://127.0.0.1:2"},
            ],
        )
    )
    a, b = pool.backends
    pool.acquire(a)
    assert all(pool.choose(None).backend is b for _ in range(4))
    pool.release(a)
    assert {pool.choose(None).backend.id for _ in range(4)} == {"a", "b"}


def test_rise_and_fall_thresholds():
    pool = make_pool(health={"rise": 2, "fall": 3})
    a = pool.backends[0]
    changes = []
    pool.subscribe(changes.append)
    pool.record_check(a, True)  # first verdict sets the state: already up, no change
    pool.record_check(a, False, "x")
    pool.record_check(a, False, "x")
    assert a.healthy and not changes
    pool.record_check(a, False, "status 503")
    assert not a.healthy and changes[-1].reason == "status 503"
    pool.record_check(a, True)
    assert not a.healthy
    pool.record_check(a, True)
    assert a.healthy and len(changes) == 2


def test_passive_failures_mark_down_within_the_window():
    pool = make_pool(health={"maxFails": 2, "failWindow": "10s"})
    a = pool.backends[0]
    pool.record_passive_failure(a, "connect refused")
    assert a.healthy
    pool.record_passive_failure(a, "connect refused")
    assert not a.healthy
    assert "connect refused" in a.tracker.last_reason


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_active_counts_return_to_zero(strategy):
    pool = make_pool(strategy=strategy)
    taken = []
    for _ in range(50):
        backend = pool.choose(None).backend
        pool.acquire(backend)
        taken.append(backend)
    for backend in taken:
        pool.release(backend)
    assert all(b.active == 0 for b in pool.backends)
    assert sum(b.requests for b in pool.backends) == 50


def test_asking_whether_a_backend_is_free_moves_no_strategy():
    # The admission queue asks this on every release; asking must not use up a turn.
    for strategy in ("round-robin", "least-connections"):
        config = build_config(
            port=0,
            strategy=strategy,
            backends=[{"id": i, "url": f"http://127.0.0.1:{i + 1}"} for i in range(3)],
        )
        asked, plain = Pool.from_config(config), Pool.from_config(config)
        picks = []
        for _ in range(9):
            for _ in range(5):
                assert asked.can_choose(None)
            picks.append((asked.choose(None).backend.id, plain.choose(None).backend.id))
        assert all(a == b for a, b in picks)
