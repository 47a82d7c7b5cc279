"""PrefixRouter: prefix affinity, load balance, dead replicas, bounded memory (no Ray needed)."""

import pytest

from genlm_bytes.lm.routing import PrefixRouter, prefix_hashes


def test_prefix_hashes_are_chained():
    a, b = prefix_hashes([1, 2, 3]), prefix_hashes([1, 2, 4])
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert prefix_hashes([2, 1])[1] != prefix_hashes([1, 2])[1]  # order matters
    assert prefix_hashes([]) == []


def test_a_context_follows_its_longest_served_prefix():
    router = PrefixRouter(3, slack=4)
    loads, alive = [0, 0, 0], [True] * 3
    first = router.choose([7, 1, 2], loads, alive)
    other = router.choose([7, 5], loads, alive)  # a prefix of it ([7]) was never served itself
    assert other != first  # a new prefix goes to the least loaded in turn, not to replica 0 again
    for ext in ([7, 1, 2, 9], [7, 1, 2, 9, 4], [7, 1, 2, 8]):
        assert router.choose(ext, loads, alive) == first
    assert router.choose([7, 5, 6], loads, alive) == other
    rates = router.hit_rates()
    assert router.n_routed == 6 and router.n_affine == 4
    assert rates["requests"] == pytest.approx(4 / 6)
    assert rates["tokens"] == pytest.approx((3 + 4 + 3 + 2) / (3 + 2 + 4 + 5 + 4 + 3))


def test_new_prefixes_go_to_the_least_loaded_replica():
    router = PrefixRouter(3)
    assert router.choose([1], [5, 0, 3], [True] * 3) == 1
    assert router.choose([2], [5, 4, 3], [True] * 3) == 2
    assert router.hit_rates() == {"requests": 0.0, "tokens": 0.0}


def test_a_busy_replica_sheds_contexts_beyond_the_slack():
    router = PrefixRouter(2, slack=2)
    r = router.choose([1, 2], [0, 0], [True, True])
    loads = [0, 0]
    loads[r] = 2
    assert router.choose([1, 2, 3], loads, [True, True]) == r  # within the slack: stays
    loads[r] = 3
    moved = router.choose([1, 2, 3, 4], loads, [True, True])
    assert moved != r
    loads[r] = 0
    assert router.choose([1, 2, 3, 4, 5], loads, [True, True]) == moved  # it now lives there


def test_dead_replicas_are_skipped_and_none_alive_raises():
    router = PrefixRouter(2)
    r = router.choose([4, 4], [0, 0], [True, True])
    alive = [True, True]
    alive[r] = False
    assert router.choose([4, 4, 1], [0, 0], alive) == 1 - r
    assert router.choose([4, 4, 1, 2], [0, 0], [True, True]) == 1 - r  # re-homed on the survivor
    with pytest.raises(RuntimeError, match="no replica is alive"):
        router.choose([4], [0, 0], [False, False])


def test_the_map_is_bounded():
    router = PrefixRouter(2, max_entries=8)
    for i in range(100):
        router.choose([i, i + 1], [0, 0], [True, True])
    assert len(router) == 8


@pytest.mark.parametrize("kwargs, err", [
    ({"n_replicas": 0}, ValueError), ({"n_replicas": True}, ValueError),
    ({"n_replicas": 2, "slack": -1}, ValueError), ({"n_replicas": 2, "max_entries": 0}, ValueError),
])
def test_bad_router_arguments(kwargs, err):
    with pytest.raises(err):
        PrefixRouter(**kwargs)
