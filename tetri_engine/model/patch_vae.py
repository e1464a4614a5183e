"""Patch-parallel VAE decode (issue 16; the idea of xDiT's DistVAE, done exactly): the devices of a group
decode one image together, each a band of latent rows, and each produces its band's image rows.

The diffusers decoder runs unchanged on each band. Only three kinds of its layers look past a band's
edges; `install(vae)` swaps them when the model is loaded (as the transformer's attention processors
are), and each behaves exactly as diffusers' own when no patch decode runs on the thread:

  - a convolution with vertical padding p (the 3x3 ones: p = 1): p halo rows from each neighbour band
    (zeros above the image's first row and below its last, as the padding would be), then the
    convolution without vertical padding: `PatchConv2d`;
  - GroupNorm: the statistics of the whole image, not of the band: the sum over every band first
    (mean), then the squared deviations about that mean (variance), each one all_gather of a few
    numbers: `PatchGroupNorm`;
  - the mid-block self-attention: each band's queries attend to the keys and values of the whole image
    (gathered): `PatchAttnProcessor`.

Everything else is per row: activations, 1x1 convolutions, nearest-neighbour upsampling (a band of h
rows becomes 2h rows, and the bands stay contiguous). Worked example, a 64 x 48 px image on 2 devices:
latent 8 x 6 rows; rank 0 decodes latent rows 0-3, rank 1 rows 4-7; after three 2x upsamplings rank 0
holds image rows 0-31 and rank 1 rows 32-63; `decode_band` returns each rank's [1, 3, 32, 48].

Exactness: every output pixel sees exactly the inputs it sees in the one-device decode; only the
order of floating-point sums differs (statistics summed per band, convolutions on a band). On the CPU in
float32 the decoded image equals the one-device decode to ~1e-6 (tests/test_patch_vae.py measures it);
in bf16 on GPUs, to bf16 rounding.

The exchanges are all `all_gather`s over the group's communicator, issued in the same order on every
rank. A rank whose decode raises replays the rest of them with zeros (`catch_up`), having learned the
sequence by running the same decode on the meta device (`rehearse`: shapes only, no arithmetic, no
exchange), so the other ranks' collectives complete and the group never hangs.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

_local = threading.local()


def band_rows(latent_rows: int, degree: int) -> tuple[int, ...]:
    """Latent rows of each rank's band: contiguous, as even as possible (the first ones one longer)."""
    base, extra = divmod(latent_rows, degree)
    return tuple(base + (1 if r < extra else 0) for r in range(degree))


def max_degree(latent_rows: int, degree: int) -> int:
    """The widest power-of-two decode degree <= degree that gives every band a row."""
    while degree > 1 and latent_rows < degree:
        degree //= 2
    return degree


@dataclass
class PatchContext:
    """One rank's part of one patch-parallel decode. comm None: a rehearsal (shapes only)."""

    comm: Any
    rank: int
    degree: int
    rows: tuple[int, ...]  # latent rows of each rank's band
    exchange_log: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, concatenated along dim 0 in rank order."""
        if self.comm is None:
            out = x.new_empty((self.degree * x.shape[0], *x.shape[1:]))
        else:
            out = self.comm.all_gather(self.rank, x.contiguous())
        self.exchange_log.append((tuple(x.shape), x.dtype))
        return out

    def bands(self, local_rows: int) -> list[int]:
        """Rows of every rank's band at the resolution where this rank holds `local_rows`."""
        scale = local_rows // self.rows[self.rank]
        return [r * scale for r in self.rows]


def current_patch() -> PatchContext | None:
    return getattr(_local, "context", None)


@contextmanager
def patch_parallel(context: PatchContext | None) -> Iterator[PatchContext | None]:
    """Run the enclosed VAE decode on this thread as `context.rank` of a patch-parallel group."""
    previous = current_patch()
    _local.context = context
    try:
        yield context
    finally:
        _local.context = previous


def with_halo(context: PatchContext, x: torch.Tensor, halo: int) -> torch.Tensor:
    """x [B, C, h, W] (this rank's band) -> [B, C, h + 2*halo, W]: `halo` rows of the band above on top,
    of the band below at the bottom, zeros at the image's edges."""
    edges = torch.cat([x[:, :, :halo], x[:, :, -halo:]], dim=2)  # [B, C, 2*halo, W]
    everyone = context.all_gather(edges).view(context.degree, *edges.shape)
    zeros = x.new_zeros((*x.shape[:2], halo, x.shape[3]))
    top = everyone[context.rank - 1, :, :, halo:] if context.rank > 0 else zeros
    bottom = everyone[context.rank + 1, :, :, :halo] if context.rank < context.degree - 1 else zeros
    return torch.cat([top, x, bottom], dim=2)


class PatchConv2d(torch.nn.Conv2d):
    """nn.Conv2d that, in a patch decode, takes its vertical padding from the neighbour bands."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = current_patch()
        halo = self.padding[0]
        if context is None or context.degree == 1 or halo == 0:
            return super().forward(x)
        return F.conv2d(with_halo(context, x, halo), self.weight, self.bias, self.stride, (0, self.padding[1]),
                        self.dilation, self.groups)


class PatchGroupNorm(torch.nn.GroupNorm):
    """nn.GroupNorm that, in a patch decode, normalises with the whole image's statistics (the biased
    variance about the global mean, as nn.GroupNorm), summed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = current_patch()
        if context is None or context.degree == 1:
            return super().forward(x)
        batch, channels = x.shape[:2]
        grouped = x.reshape(batch, self.num_groups, -1)
        counts = torch.tensor([float(grouped.shape[-1])], device=x.device).expand(batch, 1)
        totals = context.all_gather(torch.cat([counts, grouped.sum(-1, dtype=torch.float32)], dim=1))
        totals = totals.view(context.degree, batch, -1).sum(0)  # [B, 1 + G]: elements, sums
        mean = totals[:, 1:] / totals[:, :1]
        deviation = grouped - mean.to(x.dtype).unsqueeze(-1)
        squares = context.all_gather(deviation.square().sum(-1, dtype=torch.float32))
        var = squares.view(context.degree, batch, -1).sum(0) / totals[:, :1]
        normed = F.batch_norm(grouped.reshape(1, batch * self.num_groups, -1), mean.flatten(), var.flatten(),
                              training=False, eps=self.eps).view_as(x)
        if self.affine:
            shape = (1, channels) + (1,) * (x.dim() - 2)
            normed = torch.addcmul(self.bias.view(shape), normed, self.weight.view(shape))
        return normed


class PatchAttnProcessor:
    """diffusers' AttnProcessor2_0 for the VAE's self-attention; in a patch decode, the band's queries
    attend to the keys and values of every band.

    Copied from diffusers 0.42.1 `diffusers.models.attention_processor.AttnProcessor2_0.__call__`
    (source sha256 f2cf73fdd9f0), for self-attention over a 4-D feature map without mask or spatial
    norm (the VAE mid-block's), the keys and values gathered from every band."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        context = current_patch()
        if context is None or context.degree == 1:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise NotImplementedError("a patch-parallel decode attends only as the VAE's mid block does")
        residual = hidden_states
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        key, value = _gather_rows(context, attn.to_k(hidden_states), attn.to_v(hidden_states), height, width)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _gather_rows(context: PatchContext, key: torch.Tensor, value: torch.Tensor, height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This band's keys and values [B, h*W, C] -> the whole image's, in row order (bands padded to the
    longest for the exchange, the padding dropped after)."""
    bands = context.bands(height)
    longest = max(bands) * width
    both = torch.cat([key, value], dim=-1)
    both = F.pad(both, (0, 0, 0, longest - both.shape[1]))
    everyone = context.all_gather(both).view(context.degree, *both.shape)
    both = torch.cat([everyone[r, :, :rows * width] for r, rows in enumerate(bands)], dim=1)
    return both.split(key.shape[-1], dim=-1)


def install(vae: torch.nn.Module) -> None:
    """Give the VAE's decoder the patch layers (its state dict and parameters are unchanged). A layer
    the patch decode cannot split exactly (a strided or dilated convolution, another padding mode)
    stays as it is and makes `decode_band` refuse."""
    decoder = vae.decoder
    for module in decoder.modules():
        if type(module) is torch.nn.Conv2d and _splittable(module):
            module.__class__ = PatchConv2d  # same layout, a forward that knows the band (no copy)
        elif type(module) is torch.nn.GroupNorm:
            module.__class__ = PatchGroupNorm
    for module in decoder.modules():
        if hasattr(module, "set_processor") and hasattr(module, "to_q"):
            module.set_processor(PatchAttnProcessor())


def _splittable(conv: torch.nn.Conv2d) -> bool:
    return (conv.stride[0] == 1 and conv.dilation[0] == 1 and conv.padding_mode == "zeros"
            and conv.kernel_size[0] == 2 * conv.padding[0] + 1)


def supported(vae: torch.nn.Module) -> bool:
    """Whether every layer of the decoder that mixes rows has its patch version (after `install`)."""
    for module in vae.decoder.modules():
        if type(module) is torch.nn.Conv2d and module.padding[0] > 0:
            return False  # (1x1 convolutions are per pixel)
        if type(module) is torch.nn.GroupNorm or isinstance(module, torch.nn.ConvTranspose2d):
            return False
        if hasattr(module, "to_q") and not isinstance(getattr(module, "processor", None), PatchAttnProcessor):
            return False
    return True


def decode_band(vae: torch.nn.Module, latents: torch.Tensor, comm: Any, rank: int, degree: int) -> torch.Tensor:
    """Rank `rank`'s band of `vae.decode(latents)` (latents [1, C, h, w], the whole VAE input, on this
    rank's device; its band is taken here) -> [1, 3, 8 * band rows, 8 * w], on the group `comm` of
    `degree` ranks. Every rank of the group calls it at once. A rank that raises first replays the
    exchanges it did not reach (the others' complete), then raises."""
    rows = band_rows(latents.shape[2], degree)
    start = sum(rows[:rank])
    band = latents[:, :, start:start + rows[rank]]
    context = PatchContext(comm, rank, degree, rows)
    try:
        if not supported(vae):
            raise ValueError("this VAE's decoder has layers a patch-parallel decode cannot split")
        with patch_parallel(context):
            return vae.decode(band, return_dict=False)[0]
    except Exception:
        catch_up(context, rehearse(vae, band.shape, band.dtype, rows, rank), band.device)
        raise


def catch_up(context: PatchContext, plan: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> None:
    """Issue, with zeros, the exchanges of `plan` this rank has not made yet."""
    for shape, dtype in plan[len(context.exchange_log):]:
        context.all_gather(torch.zeros(shape, dtype=dtype, device=device))


_meta_vaes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a VAE -> its meta-device copy
_meta_lock = threading.Lock()


def rehearse(vae: torch.nn.Module, band_shape: tuple[int, ...], dtype: torch.dtype, rows: tuple[int, ...],
             rank: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The exchanges (shape, dtype) rank `rank` makes in a patch decode of a band of `band_shape`: the
    same decode on a copy of the VAE on the meta device (shapes only)."""
    with _meta_lock:
        meta = _meta_vaes.get(vae)
        if meta is None:
            with torch.device("meta"):
                meta = type(vae).from_config(vae.config)
            # (torch's own Module.to: diffusers' warns about casting a model that was not loaded)
            meta = torch.nn.Module.to(meta, next(vae.parameters()).dtype).eval()
            install(meta)
            _meta_vaes[vae] = meta
    context = PatchContext(None, rank, len(rows), rows)
    with torch.no_grad(), patch_parallel(context):
        meta.decode(torch.empty(band_shape, dtype=dtype, device="meta"), return_dict=False)
    return context.exchange_log
