"""Ulysses sequence-parallel attention: the one place where the ranks of a group talk during a forward.

Every rank of a group holds a contiguous shard of each token stream of the joint sequence (the image
tokens and the text tokens, in the layout of `ops.shard`: `ceil(L / k)` tokens per rank, the last
rank's shard padded). Everything in a DiT block except attention is per token, so the diffusers
blocks run unchanged on the shard; attention is replaced by `sp_attention`:

    q, k, v  [B, L_local, H, D]   (sequence-sharded, all heads)
      ── all_to_all ──►  [B, k * L_local, H / k, D]   (whole sequence, this rank's head slice)
      ── attention (padded keys dropped) ──
      ── all_to_all ──►  [B, L_local, H, D]

The exchange is the communicator's `all_to_all(rank, x)` from `tetri_engine.ops` (thread backend on
CPU, NCCL on GPU). Rotary embeddings are applied before the exchange, by the unchanged diffusers code,
from the position ids of the rank's own tokens, so every token carries its true position.

Worked example, degree 2, FLUX at 48x80 px (15 image tokens) with 4 text tokens and 4 heads:

    rank 0 holds text[0:2] + image[0:8]       rank 1 holds text[2:4] + image[8:15] + 1 pad token
    after the exchange both ranks see text[0:2] image[0:8] text[2:4] image[8:15] pad  (20 tokens),
    rank 0 for heads 0-1, rank 1 for heads 2-3; the pad key is dropped, so no query attends to it.

Attention is invariant to the order of keys, so the interleaved order needs no reordering; the query
rows come back to their owners through the second exchange.

The context (communicator, rank, degree, stream lengths) is thread-local: on CPU the virtual devices
share one model object, and each executor thread sets its own context around its forward.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

_local = threading.local()


def shard_length(length: int, degree: int) -> int:
    """Tokens per shard, padding included (same rule as `ops.shard_length`)."""
    return -(-length // degree)


def valid_tokens(length: int, degree: int, rank: int) -> int:
    """How many of rank `rank`'s `shard_length(length, degree)` tokens are real (not padding)."""
    local = shard_length(length, degree)
    return max(0, min(local, length - rank * local))


def check_heads(num_heads: int, degree: int) -> None:
    if degree < 1:
        raise ValueError(f"sequence-parallel degree must be >= 1, got {degree}")
    if num_heads % degree != 0:
        raise ValueError(
            f"the model has {num_heads} attention heads, which cannot be split evenly over {degree} "
            f"devices: Ulysses sequence parallelism needs heads % degree == 0 "
            f"(use a degree that divides {num_heads})"
        )


@dataclass
class SPContext:
    """What one rank needs to know during one sequence-parallel forward.

    lengths: token stream name ("image", "text") -> full length (padding excluded).
    """

    comm: Any  # an ops communicator; None at degree 1
    rank: int
    degree: int
    lengths: dict[str, int]
    # (shape, dtype) of every exchange this rank completed since the executor last cleared it: lets the
    # ranks check that they stayed in step, and a rank that fell behind replay the missing ones.
    exchange_log: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    _key_index: dict[tuple, torch.Tensor | None] = field(default_factory=dict)

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        out = self.comm.all_to_all(self.rank, x)
        self.exchange_log.append((tuple(x.shape), x.dtype))  # logged once returned: a timed-out call is not
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, concatenated along dim 0 in rank order (the step cache's skip decision).
        Logged like an exchange, so that the ranks' logs stay comparable and a failed rank can catch up."""
        out = self.comm.all_gather(self.rank, x)
        self.exchange_log.append((tuple(x.shape), x.dtype))
        return out

    def local_length(self, stream: str) -> int:
        return shard_length(self.lengths[stream], self.degree)

    def key_index(self, streams: tuple[str, ...], device: torch.device) -> torch.Tensor | None:
        """Positions of the real tokens in the exchanged sequence, or None when nothing is padded."""
        cache_key = (streams, str(device))
        if cache_key not in self._key_index:
            if all(self.lengths[s] % self.degree == 0 for s in streams):
                index = None
            else:
                positions: list[int] = []
                offset = 0
                for rank in range(self.degree):  # the exchanged sequence is rank 0's tokens, rank 1's, ...
                    for s in streams:
                        positions.extend(range(offset, offset + valid_tokens(self.lengths[s], self.degree, rank)))
                        offset += self.local_length(s)
                index = torch.tensor(positions, dtype=torch.long, device=device)
            self._key_index[cache_key] = index
        return self._key_index[cache_key]


def current_context() -> SPContext | None:
    return getattr(_local, "context", None)


@contextmanager
def attention_observer(observer: Callable[..., None] | None) -> Iterator[None]:
    """Call `observer(query, key, value, out, streams)` after every `sp_attention` on this thread
    (the redundancy analysis records K, V and the attention output of every layer this way)."""
    previous = getattr(_local, "observer", None)
    _local.observer = observer
    try:
        yield
    finally:
        _local.observer = previous


@contextmanager
def sequence_parallel(context: SPContext | None) -> Iterator[SPContext | None]:
    """Run the enclosed forward on this thread as `context.rank` of a group of `context.degree`."""
    previous = current_context()
    _local.context = context
    try:
        yield context
    finally:
        _local.context = previous


def local_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] in and out; the same SDPA call as diffusers' native attention backend."""
    out = F.scaled_dot_product_attention(
        query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3)
    )
    return out.permute(0, 2, 1, 3)


def sp_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, streams: tuple[str, ...]
) -> torch.Tensor:
    """Attention of this rank's tokens over the group's whole sequence.

    query/key/value: [B, L_local, H, D], the rank's tokens laid out as the concatenation of its shard of
    each stream in `streams` (e.g. ("text", "image") for FLUX). Returns [B, L_local, H, D].
    """
    out = _sp_attention(query, key, value, streams)
    observer = getattr(_local, "observer", None)
    if observer is not None:
        observer(query, key, value, out, streams)
    return out


def _sp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, streams: tuple[str, ...]) -> torch.Tensor:
    ctx = current_context()
    if ctx is None or ctx.degree == 1:
        return local_attention(query, key, value)

    degree, rank = ctx.degree, ctx.rank
    batch, length, heads, head_dim = query.shape
    check_heads(heads, degree)
    expected = sum(ctx.local_length(s) for s in streams)
    if length != expected:
        raise RuntimeError(
            f"rank {rank} holds {length} tokens but the {streams} shards of this group add up to {expected}"
        )
    heads_local = heads // degree

    # 1. One exchange for q, k and v. Chunk j (head group j of every token here) goes to rank j; the
    #    per-token layout [3, h, D] makes the received buffer SDPA's input as it is (batch 1: no copy).
    send = torch.stack([t.view(batch, length, degree, heads_local, head_dim).permute(2, 0, 1, 3, 4)
                        for t in (query, key, value)], dim=3)  # [degree, B, L, 3, h, D]
    received = ctx.exchange(send)  # chunk j: rank j's tokens, my head group
    received = received.transpose(0, 1).reshape(batch, degree * length, 3, heads_local, head_dim)
    q_all, k_all, v_all = received.unbind(2)  # [B, S, h, D]: the whole sequence, my heads

    # 2. Attend over the whole sequence; padded tokens are dropped from the keys and values.
    index = ctx.key_index(streams, k_all.device)
    if index is not None:
        k_all = k_all.index_select(1, index)
        v_all = v_all.index_select(1, index)
    out = F.scaled_dot_product_attention(q_all.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2))
    out = out.transpose(1, 2)  # [B, S, h, D] (the memory layout of the flash kernels' output)

    # 3. Send every rank the rows of its own tokens back: chunk j = rank j's tokens, my head group.
    send = out.reshape(batch, degree, length, heads_local, head_dim).transpose(0, 1).contiguous()
    received = ctx.exchange(send)  # chunk j: my tokens, head group j: [degree, B, L, h, D]
    return received.permute(1, 2, 0, 3, 4).reshape(batch, length, heads, head_dim)


def catch_up(context: SPContext, plan: list[tuple[str, ...]], rows: int, heads: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> None:
    """After this rank failed mid-forward: issue, with zero buffers, the exchanges of the forward it did
    not reach, so that the other ranks' exchanges complete (NCCL: they are queued on their GPUs and
    would wait for ever; thread backend: they would wait until the timeout).

    plan: the token streams of every attention call of one forward, in order (`ModelAdapter.exchange_plan`);
    each call makes two exchanges, [degree, rows, L, 3, h, D] then [degree, rows, L, h, D].
    """
    for shape in exchange_shapes(context, plan, rows, heads, head_dim)[len(context.exchange_log):]:
        context.exchange(torch.zeros(shape, dtype=dtype, device=device))


def exchange_shapes(context: SPContext, plan: list[tuple[str, ...]], rows: int, heads: int,
                    head_dim: int) -> list[tuple[int, ...]]:
    """The shapes of the exchanges that the attention calls `plan` make on a batch of `rows` rows."""
    local_heads = heads // context.degree
    shapes = []
    for streams in plan:
        length = sum(context.local_length(s) for s in streams)
        shapes.append((context.degree, rows, length, 3, local_heads, head_dim))
        shapes.append((context.degree, rows, length, local_heads, head_dim))
    return shapes
