"""One thread per rank, as the executor runs collectives: a helper for the communicator tests."""
from __future__ import annotations

import threading
from typing import Callable, Iterable


def run_ranks(fn: Callable[[int], object], ranks: Iterable[int], join_s: float = 30.0) -> list:
    """Call fn(rank) on one thread per rank; return the results in rank order, or re-raise the first
    rank's error. Fails (instead of hanging the suite) if a rank is still stuck after join_s."""
    ranks = list(ranks)
    results: dict[int, object] = {}
    errors: dict[int, BaseException] = {}

    def body(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors[rank] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    assert not any(t.is_alive() for t in threads), "a rank is stuck: deadlock in a collective?"
    if errors:
        raise errors[min(errors)]
    return [results[r] for r in ranks]
