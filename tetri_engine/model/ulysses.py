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

With `AttentionOptions.chunks` = n > 1 the rank's head slice is split into n chunks, each with its own
two exchanges; on GPUs the exchanges run on a side stream, so that one chunk's exchange overlaps
another chunk's attention (`_overlapped`). The attention kernel is `AttentionOptions.backend`
(model/attention.py).

Worked example, degree 2, FLUX at 48x80 px (15 image tokens) with 4 text tokens and 4 heads:

    rank 0 holds text[0:2] + image[0:8]       rank 1 holds text[2:4] + image[8:15] + 1 pad token
    after the exchange both ranks see text[0:2] image[0:8] text[2:4] image[8:15] pad  (20 tokens),
    rank 0 for heads 0-1, rank 1 for heads 2-3; the pad key is dropped, so no query attends to it.

Attention is invariant to the order of keys, so the interleaved order needs no reordering; the query
rows come back to their owners through the second exchange.

The context (communicator, rank, degree, stream lengths) is thread-local: on CPU the virtual devices
share one model object, and each executor thread sets its own context around its forward.

CFG parallel (issue 16) adds a second axis to the context: in a group that runs a request's two
classifier-free-guidance branches side by side, a rank computes branch `cfg_rank` only, over its
branch's Ulysses group (`comm`, `rank`, `degree` as above); its twins in the other branch hold the same
sequence shard, and at the end of the forward the twins swap their branch's output (`cfg_gather`, one
all_gather over `cfg_comm`), so that every rank guides its own shard with both branches.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from tetri_engine.model.attention import attend

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
    # CFG parallel: this rank runs guidance branch cfg_rank of cfg_degree (1: every branch here);
    # cfg_comm joins it with its twins (the ranks of the other branches holding the same shard).
    cfg_comm: Any = None
    cfg_rank: int = 0
    cfg_degree: int = 1

    @property
    def branch(self) -> int | None:
        """The one guidance branch this rank computes, or None (all of them)."""
        return self.cfg_rank if self.cfg_degree > 1 else None

    def cfg_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every branch's `x` (this rank's output rows of its branch), concatenated along dim 0 in
        branch order, from the twins: the one exchange of a CFG-parallel step. Logged like the others."""
        out = self.cfg_comm.all_gather(self.cfg_rank, x)
        self.exchange_log.append((tuple(x.shape), x.dtype))
        return out

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


def effective_chunks(chunks: int, heads_local: int) -> int:
    """Head chunks an exchange is split into: the largest divisor of `heads_local` not above `chunks`."""
    return max(c for c in range(1, max(1, min(chunks, heads_local)) + 1) if heads_local % c == 0)


@dataclass(frozen=True)
class AttentionOptions:
    """How `sp_attention` runs: the attention kernel (model/attention.py) and, at degree > 1, how many
    head chunks each exchange is split into so that the exchanges of one chunk overlap the attention
    of another (1: one exchange of q, k and v together and one of the output)."""

    backend: str = "sdpa"
    chunks: int = 1


@dataclass(frozen=True)
class AttentionCall:
    """One `sp_attention` call of a forward, as exchange plans list it: the token streams of its
    sequence and the `AttentionOptions.chunks` it runs with (`exchange_shapes`)."""

    streams: tuple[str, ...]
    chunks: int = 1


def sp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, streams: tuple[str, ...],
                 options: AttentionOptions = AttentionOptions()) -> torch.Tensor:
    """Attention of this rank's tokens over the group's whole sequence.

    query/key/value: [B, L_local, H, D], the rank's tokens laid out as the concatenation of its shard of
    each stream in `streams` (e.g. ("text", "image") for FLUX). Returns [B, L_local, H, D] (contiguous).
    One custom op (`tetri::sp_attention`): torch.compile sees it as a single opaque node, so the
    exchanges and the thread-local group context never reach dynamo.
    """
    out = torch.ops.tetri.sp_attention(query, key, value, ",".join(streams), options.backend, options.chunks)
    if not torch.compiler.is_compiling():  # (observers are for eager analysis runs: model/redundancy.py)
        observer = getattr(_local, "observer", None)
        if observer is not None:
            observer(query, key, value, out, streams)
    return out


@torch.library.custom_op("tetri::sp_attention", mutates_args=(), schema=(
    "(Tensor query, Tensor key, Tensor value, str streams, str backend, int chunks) -> Tensor"))
def _sp_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, streams: str, backend: str,
                     chunks: int) -> torch.Tensor:
    ctx = current_context()
    if ctx is None or ctx.degree == 1:
        out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), backend)
        return out.transpose(1, 2).contiguous()  # (a no-op for the fused kernels: their output is [B, S, H, D])
    return _exchanged_attention(ctx, query, key, value, tuple(streams.split(",")), backend, chunks)


@_sp_attention_op.register_fake
def _(query, key, value, streams, backend, chunks):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _exchanged_attention(ctx: SPContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         streams: tuple[str, ...], backend: str, chunks: int) -> torch.Tensor:
    degree, rank = ctx.degree, ctx.rank
    batch, length, heads, head_dim = query.shape
    check_heads(heads, degree)
    expected = sum(ctx.local_length(s) for s in streams)
    if length != expected:
        raise RuntimeError(
            f"rank {rank} holds {length} tokens but the {streams} shards of this group add up to {expected}"
        )
    heads_local = heads // degree
    n = effective_chunks(chunks, heads_local)
    size = heads_local // n

    # 1. Per head chunk c, one exchange of q, k and v. Chunk j of it (head group j, sub-chunk c, of
    #    every token here) goes to rank j; the per-token layout [3, h, D] makes the received buffer
    #    SDPA's input as it is (batch 1: no copy).
    def send(c: int) -> torch.Tensor:
        return torch.stack([t.view(batch, length, degree, heads_local, head_dim)[:, :, :, c * size:(c + 1) * size]
                            .permute(2, 0, 1, 3, 4) for t in (query, key, value)], dim=3)  # [degree, B, L, 3, h, D]

    index = None

    def attend_chunk(received: torch.Tensor) -> torch.Tensor:
        nonlocal index
        received = received.transpose(0, 1).reshape(batch, degree * length, 3, size, head_dim)
        q_all, k_all, v_all = received.unbind(2)  # [B, S, h, D]: the whole sequence, my heads
        # 2. Attend over the whole sequence; padded tokens are dropped from the keys and values.
        index = ctx.key_index(streams, k_all.device) if index is None else index
        if index is not None:
            k_all, v_all = k_all.index_select(1, index), v_all.index_select(1, index)
        out = attend(q_all.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), backend).transpose(1, 2)
        # 3. Every rank gets the rows of its own tokens back: chunk j = rank j's tokens.
        return out.reshape(batch, degree, length, size, head_dim).transpose(0, 1).contiguous()

    if n > 1 and query.device.type == "cuda":
        backs = _overlapped(ctx, n, send, attend_chunk, query.device)
    else:
        received = [ctx.exchange(send(c)) for c in range(n)]
        backs = [ctx.exchange(attend_chunk(r)) for r in received]
    # backs[c]: [degree, B, L, h, D], chunk j = my tokens for head group j, sub-chunk c
    out = backs[0].unsqueeze(1) if n == 1 else torch.stack(backs, dim=1)  # [degree, n, B, L, h, D]
    return out.permute(2, 3, 0, 1, 4, 5).reshape(batch, length, heads, head_dim)


def _overlapped(ctx: SPContext, n: int, send: Callable[[int], torch.Tensor],
                attend_chunk: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The exchanges of `_exchanged_attention` on a side stream, in the same order as without it (all q/k/v
    chunks, then the outputs chunk by chunk), so that chunk c+1's q/k/v exchange runs while chunk c
    attends and chunk c's output exchange while chunk c+1 attends. The extension issues each NCCL call
    on the current stream. Every tensor a stream reads stays referenced until the compute stream has
    waited for the side stream at the end, so the allocator never hands its memory to the other stream
    early (no record_stream). Works under CUDA graph capture (fork and join by stream waits)."""
    compute = torch.cuda.current_stream(device)
    side = _side_stream(device)
    keep: list[torch.Tensor] = []
    sends = [send(c) for c in range(n)]
    side.wait_stream(compute)
    received, ready = [], []
    with torch.cuda.stream(side):
        for x in sends:
            received.append(ctx.exchange(x))
            ready.append(side.record_event())
    backs = []
    for c in range(n):
        compute.wait_event(ready[c])
        out = attend_chunk(received[c])
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            backs.append(ctx.exchange(out))
        keep.append(out)
    compute.wait_stream(side)
    keep.extend(sends + received)
    return backs


_side_streams: dict[str, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The exchange stream of a device (one executor thread per device uses it). High priority, so
    that the GPU schedules the exchange's few blocks ahead of queued attention blocks."""
    key = str(device)
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device, priority=-1)
    return _side_streams[key]


def catch_up(context: SPContext, plan: list[AttentionCall], rows: int, heads: int, head_dim: int,
             dtype: torch.dtype, device: torch.device, guided: tuple[int, ...] | None = None) -> None:
    """After this rank failed mid-forward: issue, with zero buffers, the exchanges of the forward it did
    not reach, so that the other ranks' exchanges complete (NCCL: they are queued on their GPUs and
    would wait for ever; thread backend: they would wait until the timeout).

    plan: every attention call of one forward, in order (`ModelAdapter.exchange_plan`); see
    `exchange_shapes` for the exchanges each makes. rows: this rank's rows of the batch. guided: in a
    CFG-parallel group, the shape of the branch output the forward ends by exchanging (`cfg_gather`).
    """
    calls = [(context.exchange, shape) for shape in
             (exchange_shapes(context, plan, rows, heads, head_dim) if context.degree > 1 else [])]
    if context.cfg_degree > 1:
        calls.append((context.cfg_gather, guided))
    for exchange, shape in calls[len(context.exchange_log):]:
        exchange(torch.zeros(shape, dtype=dtype, device=device))


def exchange_shapes(context: SPContext, plan: list[AttentionCall], rows: int, heads: int,
                    head_dim: int) -> list[tuple[int, ...]]:
    """The shapes of the exchanges that the attention calls `plan` make on a batch of `rows` rows: per
    call with n head chunks of h heads, n exchanges [degree, rows, L, 3, h, D] (q, k, v), then n
    exchanges [degree, rows, L, h, D] (the outputs)."""
    local_heads = heads // context.degree
    shapes = []
    for call in plan:
        length = sum(context.local_length(s) for s in call.streams)
        n = effective_chunks(call.chunks, local_heads)
        shapes += [(context.degree, rows, length, 3, local_heads // n, head_dim)] * n
        shapes += [(context.degree, rows, length, local_heads // n, head_dim)] * n
    return shapes
