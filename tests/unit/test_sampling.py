"""Which samples each rank reads: the global stream, rank blocks, test shards, defaults."""
import numpy as np
import pytest

from distmulti.sampling import (TrainOrder, cores_per_rank, default_eval_batchsize,
                                default_loader_workers, rank_positions, shard_bounds)


def rank_indices(order, samples_seen, world_size, rank, batch):
    return order.indices(*rank_positions(samples_seen, world_size, rank, batch))


def test_every_epoch_is_a_seeded_permutation_of_its_own():
    order = TrainOrder(50, seed=3)
    epochs = [order.epoch(e) for e in range(3)]
    for perm in epochs:
        assert sorted(perm) == list(range(50))
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(TrainOrder(50, seed=3).epoch(2), epochs[2])
    assert not np.array_equal(TrainOrder(50, seed=4).epoch(0), epochs[0])


def test_stream_positions_run_on_across_epoch_boundaries():
    order = TrainOrder(10, seed=0)
    np.testing.assert_array_equal(order.indices(7, 14),
                                  np.concatenate([order.epoch(0)[7:], order.epoch(1)[:4]]))
    np.testing.assert_array_equal(order.indices(25, 31), order.epoch(2)[5:10].tolist()
                                  + order.epoch(3)[:1].tolist())
    assert len(order.indices(3, 3)) == 0


@pytest.mark.parametrize('world_size,batch', [(1, 4), (2, 3), (3, 2), (4, 5)])
def test_in_each_epoch_the_ranks_samples_are_disjoint_and_cover_the_set(world_size, batch):
    n = world_size * batch * 7
    order = TrainOrder(n, seed=1)
    for epoch in range(2):
        per_rank = [np.concatenate([rank_indices(order, epoch * n + i * world_size * batch,
                                                 world_size, r, batch) for i in range(7)])
                    for r in range(world_size)]
        everything = np.concatenate(per_rank)
        assert len(set(everything.tolist())) == n == len(everything)
        for r in range(world_size):
            assert len(per_rank[r]) == n // world_size


def test_w_ranks_with_batch_b_draw_the_global_batches_of_one_rank_with_batch_wb():
    order = TrainOrder(37, seed=5)  # not a multiple of anything: batches cross epochs
    for step in range(20):
        seen = step * 6
        two = np.concatenate([rank_indices(order, seen, 2, r, 3) for r in range(2)])
        three = np.concatenate([rank_indices(order, seen, 3, r, 2) for r in range(3)])
        np.testing.assert_array_equal(two, rank_indices(order, seen, 1, 0, 6))
        np.testing.assert_array_equal(three, two)


@pytest.mark.parametrize('n,world_size', [(10, 1), (10, 3), (7, 2), (2, 4), (0, 2)])
def test_test_shards_are_contiguous_disjoint_cover_and_differ_by_at_most_one(n, world_size):
    bounds = [shard_bounds(n, world_size, r) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, end), (begin, _) in zip(bounds, bounds[1:]):
        assert end == begin
    sizes = [end - begin for begin, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


@pytest.mark.parametrize('sample_bytes,batch,expected', [
    (1 * 8 * 24 * 4, 64, 500),          # the embedded strips: the old fixed 500
    (3 * 64 * 64 * 4, 64, 85),          # 48 KiB images: 4 MiB of inputs
    (3 * 64 * 64 * 4, 128, 128),        # never below the training batch
    (3 * 512 * 512 * 4, 16, 16),
    (100, 1000, 500),                   # never above 500
])
def test_the_default_evaluation_batch_keeps_its_inputs_under_4_mib(sample_bytes, batch,
                                                                   expected):
    assert default_eval_batchsize(sample_bytes, batch) == expected


@pytest.mark.parametrize('local_ranks,affinity,cpus,cores', [
    (2, 2, 2, 1),     # this machine: 2 ranks share 2 cores
    (8, 64, 64, 8),   # 8 GPUs' ranks on a 64-core node, not bound
    (8, 4, 64, 4),    # bound by the launcher to 4 cores each
    (1, 16, 16, 16),
])
def test_cores_per_rank_follow_the_binding_or_share_the_node(local_ranks, affinity, cpus,
                                                             cores):
    assert cores_per_rank(local_ranks, affinity=affinity, cpu_count=cpus) == cores


@pytest.mark.parametrize('cores,workers', [(1, 1), (2, 1), (4, 3), (8, 7), (64, 8)])
def test_default_workers_leave_a_core_to_training(cores, workers):
    assert default_loader_workers(cores) == workers
