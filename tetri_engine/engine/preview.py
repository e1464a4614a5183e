"""Low-cost preview images of a request in progress (GenerationRequest.preview_every > 0).

No VAE: the current latent x_t (packed tokens [1, L, 64] = 16 latent channels x 2x2 patches) is
unpacked to [16, H/8, W/8] and projected to RGB with a fixed linear map, the FLUX latent->RGB factors
that ComfyUI uses for its live previews (also a fair approximation for SD3's 16-channel latents).
A 2048x2048 request gives a 256x256 preview for one [L, 16] x [16, 3] product: well under a
millisecond of work next to a step. Early previews are mostly noise; that is what x_t is.
"""
from __future__ import annotations

import torch

# ComfyUI latent_formats.Flux: rows are latent channels, columns R, G, B.
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def latent_preview(latent: torch.Tensor, width: int, height: int):
    """Packed latent tokens [1, L, C*4] of a width x height image -> a PIL image of (width/8, height/8)."""
    from PIL import Image

    from tetri_engine.model import unpack_latents

    latents = unpack_latents(latent.detach().float().cpu(), 2 * (height // 16), 2 * (width // 16))[0]  # [C, h, w]
    channels = latents.shape[0]
    if channels == len(FLUX_LATENT_RGB):
        factors = torch.tensor(FLUX_LATENT_RGB)
        bias = torch.tensor(FLUX_LATENT_RGB_BIAS)
    else:  # another latent space: the mean of three bands of channels, one per colour
        factors = torch.zeros(channels, 3)
        for colour, band in enumerate(torch.arange(channels).chunk(3)):
            factors[band, colour] = 1.0 / max(1, len(band))
        bias = torch.zeros(3)
    rgb = torch.einsum("chw,cr->hwr", latents, factors) + bias  # about [-1, 1]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="RGB")
