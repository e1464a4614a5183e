"""Thread communicators (one thread per virtual CPU device) and the communicator cache."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from tetri_engine import ops

import rank_threads

DEVICES = ("cpu:0", "cpu:1", "cpu:2", "cpu:3")


def run_ranks(comm, fn, ranks=None, join_s: float = 30.0) -> list:
    """fn(rank) on one thread per rank of `comm` (or of `ranks`), results in rank order."""
    return rank_threads.run_ranks(fn, range(comm.size) if ranks is None else ranks, join_s)


def rank_tensor(rank: int, rows: int, cols: int = 3) -> torch.Tensor:
    # Value = 1000 * rank + row index: says where every row came from.
    return (torch.arange(rows, dtype=torch.float32)[:, None] + 1000 * rank).expand(rows, cols).contiguous()


@pytest.fixture
def cache():
    return ops.CommCache(capacity=16, timeout_s=10.0)


@pytest.mark.parametrize("size", (1, 2, 4))
def test_all_to_all_from_threads(cache, size):
    comm = cache.get(DEVICES[:size])
    rows_per_chunk = 3
    outs = run_ranks(comm, lambda r: comm.all_to_all(r, rank_tensor(r, size * rows_per_chunk)))
    for r, out in enumerate(outs):
        # Chunk j of rank r's output is chunk r of rank j's input.
        want = torch.cat([rank_tensor(j, size * rows_per_chunk).split(rows_per_chunk)[r] for j in range(size)])
        assert torch.equal(out, want)


def test_all_to_all_ulysses_shapes(cache):
    # [heads, tokens/k, head_dim] -> [heads/k, tokens, head_dim] layout exchange, bf16.
    comm = cache.get(DEVICES)
    heads, tokens, head_dim = 8, 12, 4
    full = torch.randn(heads, tokens, head_dim).to(torch.bfloat16)
    local = full.chunk(4, dim=1)  # rank r holds tokens chunk r for all heads
    outs = run_ranks(comm, lambda r: comm.all_to_all(r, local[r]))
    for r, out in enumerate(outs):
        # Rank r now has heads chunk r, all tokens, as 4 token chunks in rank order.
        got = torch.cat(out.chunk(4, dim=0), dim=1)
        assert torch.equal(got, full.chunk(4, dim=0)[r])


@pytest.mark.parametrize("size", (1, 2, 4))
def test_all_gather_and_broadcast_from_threads(cache, size):
    comm = cache.get(DEVICES[:size])
    outs = run_ranks(comm, lambda r: comm.all_gather(r, rank_tensor(r, 2)))
    want = torch.cat([rank_tensor(j, 2) for j in range(size)])
    assert all(torch.equal(o, want) for o in outs)
    root = size - 1
    inputs = [rank_tensor(r, 5) for r in range(size)]
    outs = run_ranks(comm, lambda r: comm.broadcast(r, inputs[r], root))
    assert all(torch.equal(o, inputs[root]) for o in outs)
    assert outs[root] is inputs[root] or outs[root].data_ptr() == inputs[root].data_ptr()
    assert size == 1 or outs[0].data_ptr() != inputs[root].data_ptr()


def test_barrier_holds_every_rank_until_all_arrive(cache):
    comm = cache.get(DEVICES)
    log: list[tuple[str, int]] = []
    lock = threading.Lock()

    def body(rank):
        time.sleep(0.02 * rank)  # arrive in turn
        with lock:
            log.append(("before", rank))
        comm.barrier(rank)
        with lock:
            log.append(("after", rank))

    run_ranks(comm, body)
    first_after = next(i for i, (what, _) in enumerate(log) if what == "after")
    assert sorted(r for what, r in log[:first_after] if what == "before") == [0, 1, 2, 3]


def test_many_back_to_back_collectives_stay_in_step(cache):
    comm = cache.get(DEVICES[:2])

    def body(rank):
        total = 0.0
        for step in range(200):
            x = torch.full((2, 2), float(rank + step))
            out = comm.all_to_all(rank, x) if step % 2 else comm.all_gather(rank, x)
            total += float(out.sum())
            x.fill_(-1.0)  # reusing the input right away must not corrupt the other rank's result
        comm.barrier(rank)
        return total

    # all_gather (even steps): 4 values of each rank; all_to_all (odd): 2 values of each rank.
    want = sum((4 if s % 2 == 0 else 2) * ((0 + s) + (1 + s)) for s in range(200))
    assert run_ranks(comm, body) == [want, want]


def test_timeout_raises_and_the_communicator_recovers():
    cache = ops.CommCache(timeout_s=0.2)
    comm = cache.get(DEVICES[:2])
    start = time.monotonic()
    with pytest.raises(ops.CommTimeoutError, match=r"rank\(s\) 1 \(cpu:1\) that never arrived"):
        comm.barrier(0)  # rank 1 never comes
    assert 0.15 < time.monotonic() - start < 5.0
    assert isinstance(ops.CommTimeoutError("x"), RuntimeError)
    # The timed-out rank withdrew: a later, complete exchange works.
    outs = run_ranks(comm, lambda r: comm.all_gather(r, rank_tensor(r, 1)))
    assert torch.equal(outs[0], torch.cat([rank_tensor(0, 1), rank_tensor(1, 1)]))


def test_mismatched_inputs_raise_on_every_rank(cache):
    comm = cache.get(DEVICES[:2])
    shapes = [(4, 3), (2, 3)]
    errors = []

    def body(rank):
        try:
            comm.all_gather(rank, torch.zeros(shapes[rank]))
        except ValueError as exc:
            errors.append(str(exc))

    run_ranks(comm, body)
    assert len(errors) == 2
    assert all("same shape and dtype" in e and "rank 1" in e for e in errors)
    # Still usable afterwards.
    run_ranks(comm, lambda r: comm.barrier(r))


def test_different_collectives_on_ranks_are_reported():
    comm = ops.CommCache(timeout_s=0.5).get(DEVICES[:2])
    errors: dict[int, BaseException] = {}

    def body(rank):
        try:
            if rank == 0:
                comm.all_gather(0, torch.zeros(2))
            else:
                time.sleep(0.1)
                comm.all_to_all(1, torch.zeros(2))
        except RuntimeError as exc:  # CommTimeoutError for rank 0
            errors[rank] = exc
        except ValueError as exc:
            errors[rank] = exc

    run_ranks(comm, body, join_s=10)
    assert isinstance(errors[1], ValueError) and "same collectives in the same order" in str(errors[1])
    assert isinstance(errors[0], ops.CommTimeoutError)


def test_collective_argument_errors(cache):
    comm = cache.get(DEVICES[:2])
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        comm.barrier(2)
    with pytest.raises(ValueError, match="rank -1 is out of range"):
        comm.all_gather(-1, torch.zeros(2))
    with pytest.raises(ValueError, match=r"dim 0 of x \(3\) is not divisible by the group size 2.*heads"):
        comm.all_to_all(0, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="root 5 is out of range"):
        comm.broadcast(0, torch.zeros(2), root=5)
    with pytest.raises(ValueError, match="0-dim"):
        comm.all_gather(0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="device cpu:3 is not in this communicator's group"):
        comm.rank_of("cpu:3")


def test_communicator_properties(cache):
    comm = cache.get(["cpu:2", "cpu:0"])
    assert comm.size == 2
    assert comm.devices == ("cpu:2", "cpu:0")
    assert comm.rank_of("cpu:0") == 1 and comm.rank_of(torch.device("cpu", 2).__str__()) == 0
    assert comm.backend == "thread"
    assert "cpu:2, cpu:0" in repr(comm)


def test_cache_reuses_one_communicator_per_ordered_tuple(cache):
    a = cache.get(("cpu:0", "cpu:1"))
    b = cache.get(["cpu:0", "cpu:1"])
    assert a is b
    c = cache.get(("cpu:1", "cpu:0"))  # another order is another rank assignment
    assert c is not a
    assert cache.get(("cpu", "cpu:1")) is a  # "cpu" is "cpu:0"
    s = cache.stats()
    assert (s["created"], s["misses"], s["hits"], s["size"], s["evicted"]) == (2, 2, 2, 2, 0)
    assert s["creation_s"] >= 0.0 and s["capacity"] == 16
    assert ("cpu:0", "cpu:1") in cache and ("cpu:2",) not in cache and len(cache) == 2


def test_concurrent_gets_create_once(cache):
    barrier = threading.Barrier(8)
    got = []

    def body():
        barrier.wait()
        got.append(cache.get(DEVICES))

    threads = [threading.Thread(target=body) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 8 and all(c is got[0] for c in got)
    assert cache.stats()["created"] == 1 and cache.stats()["hits"] == 7


def test_warmup_then_hits(cache):
    groups = [DEVICES[:1], DEVICES[:2], DEVICES[2:], DEVICES]
    cache.warmup(groups)
    assert cache.stats()["created"] == 4
    for g in groups:
        cache.get(g)
    s = cache.stats()
    assert s["created"] == 4 and s["hits"] == 4


def test_lru_eviction():
    cache = ops.CommCache(capacity=2, timeout_s=5.0)
    a = cache.get(("cpu:0",))
    cache.get(("cpu:1",))
    cache.get(("cpu:0",))  # a is now the most recently used
    cache.get(("cpu:2",))  # evicts cpu:1
    assert ("cpu:1",) not in cache and ("cpu:0",) in cache and ("cpu:2",) in cache
    assert cache.stats()["evicted"] == 1 and len(cache) == 2
    assert cache.get(("cpu:0",)) is a
    # An evicted communicator still works for whoever holds it, and a new get creates a fresh one.
    cache.get(("cpu:1",))
    assert cache.stats()["created"] == 4
    cache.clear()
    assert len(cache) == 0
    assert run_ranks(a, lambda r: a.all_gather(r, torch.ones(1)))[0].shape == (1,)


def test_eviction_skips_a_communicator_inside_a_collective():
    cache = ops.CommCache(capacity=1, timeout_s=5.0)
    busy = cache.get(DEVICES[:2])
    entered = threading.Event()

    def rank0():
        entered.set()
        busy.barrier(0)  # waits for rank 1

    t = threading.Thread(target=rank0)
    t.start()
    entered.wait()
    deadline = time.monotonic() + 5
    while busy.active_calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert busy.active_calls == 1
    cache.get(DEVICES[2:])  # over capacity, but the only other entry is in use
    assert DEVICES[:2] in cache and len(cache) == 2
    busy.barrier(1)
    t.join(5)
    assert not t.is_alive()
    cache.get(("cpu:3",))  # now the idle LRU entries go
    assert DEVICES[:2] not in cache and len(cache) == 1


def test_cache_argument_errors():
    cache = ops.CommCache()
    with pytest.raises(ValueError, match="mixes CPU and CUDA"):
        cache.get(("cpu:0", "cuda:1"))
    with pytest.raises(ValueError, match="appears twice"):
        cache.get(("cpu:0", "cpu:0"))
    with pytest.raises(ValueError, match="empty group"):
        cache.get(())
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ops.CommCache(capacity=0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        ops.CommCache(timeout_s=0)
    if ops.backend_info()["build"] == "cpu":
        with pytest.raises(RuntimeError, match="no CUDA/NCCL"):
            cache.get(("cuda:0", "cuda:1"))
    assert cache.stats()["size"] == 0


def test_collectives_release_the_gil(cache):
    """While ranks wait in a collective, other Python threads keep running."""
    comm = cache.get(DEVICES[:2])
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        run_ranks(comm, lambda r: (time.sleep(0.3) if r == 1 else None, comm.barrier(r)))
    finally:
        stop.set()
        t.join()
    assert len(ticks) > 20
