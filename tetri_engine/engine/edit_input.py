"""The input of an image edit, checked once: the image, the mask and the strength of a GenerationRequest
become plain arrays (`check_edit`), or a ValueError says what is wrong.

    image    a PIL image or a uint8 array [H, W, 3] (RGB) or [H, W, 4] (RGBA: alpha is dropped)
    mask     a PIL image with an alpha channel (OpenAI's rule: fully transparent pixels, alpha 0, mark
             where to edit; the colour is ignored), a uint8 array [H, W, 4] read the same way, or a bool
             array [H, W] (True: edit). Its size must be the image's.
    strength 0 < strength <= 1: how far the input is noised (request.DEFAULT_EDIT_STRENGTH when None)

Checked: `check_edit` -> EditInput(rgb uint8 [H, W, 3], edit bool [H, W] or None, strength). The model
(model/image_input.py) resizes both to the request's size, encodes the image and downsamples the mask.
PIL and numpy only: the server uses the same checks on decoded uploads (server/edits.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tetri_engine.request import DEFAULT_EDIT_STRENGTH, edit_steps

# Pixel modes an input image may have (PIL names): colour, grey, palette, bilevel, with or without alpha.
# Others (CMYK, 16/32-bit integer, float, YCbCr, LAB, HSV) are refused rather than guessed at.
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "RGBa", "La")
MAX_INPUT_PIXELS = 4096 * 4096  # an input image (or mask) larger than this is refused before it is decoded


@dataclass(frozen=True)
class EditInput:
    """A checked edit: what model/image_input.py takes."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    edit: np.ndarray | None  # bool [H, W]: True where the image may change; None: img2img, everything may
    strength: float

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the input."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def check_edit(image: Any, mask: Any, strength: Any, num_steps: int | None = None) -> EditInput:
    """The request's edit fields as an EditInput, or ValueError. num_steps: the request's schedule length,
    to refuse a strength that leaves no step to run."""
    if image is None:
        if mask is not None or strength is not None:
            raise ValueError(f"{'mask' if mask is not None else 'strength'} is for image edits: send an image too")
        raise ValueError("an image edit needs an image")
    rgb = check_image(image)
    edit = None if mask is None else check_mask(mask, (rgb.shape[1], rgb.shape[0]))
    strength = check_strength(DEFAULT_EDIT_STRENGTH if strength is None else strength, num_steps)
    return EditInput(rgb, edit, strength)


def check_image(image: Any, name: str = "image") -> np.ndarray:
    """A PIL image or uint8 array -> uint8 [H, W, 3] RGB (alpha dropped, palette and grey expanded)."""
    if _is_pil(image):
        _check_mode(image, name)
        _check_pixels(image.width, image.height, name)
        image = np.asarray(image.convert("RGBA" if _has_alpha(image) else "RGB"))
    array = _uint8_array(image, name)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"{name} must be an image of height x width x 3 (RGB) or x 4 (RGBA) values, got an "
                         f"array of shape {tuple(array.shape)}")
    _check_pixels(array.shape[1], array.shape[0], name)
    return np.ascontiguousarray(array[:, :, :3])


def check_mask(mask: Any, size: tuple[int, int], name: str = "mask") -> np.ndarray:
    """A mask -> bool [H, W], True where the image may change. size: the image's (width, height)."""
    if _is_pil(mask):
        _check_mode(mask, name)
        _check_pixels(mask.width, mask.height, name)
        if not _has_alpha(mask):
            raise ValueError(f"{name} must have an alpha channel (a PNG with transparency): its fully transparent "
                             f"pixels mark where to edit; this one is {mask.mode} without transparency")
        mask = np.asarray(mask.convert("RGBA"))
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        edit = mask
        if edit.ndim != 2:
            raise ValueError(f"a bool {name} must be height x width, got shape {tuple(edit.shape)}")
    else:
        array = _uint8_array(mask, name)
        if array.ndim != 3 or array.shape[2] != 4:
            raise ValueError(f"{name} must be an RGBA image (height x width x 4, alpha 0 = edit) or a bool array "
                             f"(True = edit), got shape {tuple(array.shape)}")
        edit = array[:, :, 3] == 0
    _check_pixels(edit.shape[1], edit.shape[0], name)
    if (edit.shape[1], edit.shape[0]) != tuple(size):
        raise ValueError(f"{name} is {edit.shape[1]}x{edit.shape[0]} but the image is {size[0]}x{size[1]}: "
                         f"they must be the same size")
    return np.ascontiguousarray(edit)


def check_strength(strength: Any, num_steps: int | None = None) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r} must be a number greater than 0 and at most 1")
    if num_steps is not None and edit_steps(num_steps, float(strength)) < 1:
        raise ValueError(f"strength={strength!r} of {num_steps} steps leaves no step to run: send a larger "
                         f"strength or more num_inference_steps")
    return float(strength)


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with diffusers
        return False
    return isinstance(value, Image.Image)


def _check_mode(image: Any, name: str) -> None:
    if image.mode not in IMAGE_MODES:
        raise ValueError(f"{name} has pixel mode {image.mode!r}; accepted: RGB, RGBA, grey (L, LA), palette (P, "
                         f"PA) or bilevel (1) images")


def _has_alpha(image: Any) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _check_pixels(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"{name} is empty ({width}x{height})")
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {width}x{height}: more than the {MAX_INPUT_PIXELS} pixels accepted")


def _uint8_array(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a PIL image or a numpy uint8 array, got {type(value).__name__}")
    if value.dtype != np.uint8:
        raise ValueError(f"{name} must hold uint8 values (0..255), got {value.dtype}")
    return value
