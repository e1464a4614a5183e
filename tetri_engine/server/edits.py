"""`POST /v1/images/edits`: OpenAI's image-edit request (multipart/form-data, as the official `openai`
client's `images.edit` sends it) read within bounds and checked, so that the handler (app.py) runs it like
a generation with an input image.

Fields: `image` (one file: this server edits one image per request, img2img), optional `mask` (a PNG whose
fully transparent pixels mark where to edit), and the text fields of /v1/images/generations (`prompt`, `n`,
`size`, `response_format`, `stream`, ... and our extensions), plus `strength` (how far the input is noised,
0 < s <= 1, default request.DEFAULT_EDIT_STRENGTH) and OpenAI's `input_fidelity` (accepted, changes
nothing). Multipart sends every field as text: numbers and booleans are read back from it, and the
protocol's checks (protocol.parse_generation_request) then apply as to JSON. `size` absent or "auto": the
input image's size, when the model can make it (else a 400 naming the size rule).

Bounds: the whole body at most `max_edit_body_bytes` (413; Content-Length is checked before reading),
within `body_timeout_s` (408), at most MAX_PARTS parts; images in PNG, JPEG or WEBP, at most
edit_input.MAX_INPUT_PIXELS pixels (checked from the header, before decoding). Whatever is wrong with an
upload (not an image, a format or mode not served, too large, undecodable, a mask of another size) is a
400 naming `image` or `mask`: never a 5xx.
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import warnings
from collections import defaultdict
from dataclasses import replace
from typing import Any

from aiohttp import BodyPartReader, web

from tetri_engine.engine.edit_input import EditInput, check_image, check_mask, check_strength
from tetri_engine.request import DEFAULT_EDIT_STRENGTH, GenerationRequest, SizeRule, edit_steps
from tetri_engine.server import protocol
from tetri_engine.server.protocol import APIError, bad_request, shown

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what OpenAI's edits take
FILE_FIELDS = ("image", "image[]", "mask")  # the openai client sends a list of images as image[]
MAX_PARTS = 64
CHUNK_BYTES = 1 << 16
# Multipart carries text: the fields read back as numbers or booleans (a value that does not parse stays
# text, and the protocol's check names the field).
INT_FIELDS = frozenset({"n", "num_inference_steps", "seed", "partial_images", "preview_every", "output_compression"})
FLOAT_FIELDS = frozenset({"guidance_scale", "deadline_ms", "slo_scale", "strength"})
BOOL_FIELDS = frozenset({"stream", "progress_events"})
JSON_FIELDS = frozenset({"lora"})  # a list of objects: sent as JSON text
IGNORED_EDIT_CHOICES = {"input_fidelity": ("high", "low")}  # OpenAI's, changes nothing here


async def read_edit_request(request: web.Request, config: Any, limits: protocol.Limits,
                            default_steps: int) -> tuple[protocol.ImageGenerationParams, EditInput]:
    """The request's parameters (stream events named image_edit.*) and its checked edit, or APIError."""
    fields, files = await read_form(request, config.max_edit_body_bytes, config.body_timeout_s)
    images = files.get("image", []) + files.get("image[]", [])
    if not images:
        raise bad_request("Missing required parameter: 'image' (the image to edit, as a file).", "image",
                          code="missing_required_parameter")
    if len(images) > 1:
        raise bad_request(f"This server edits one image per request (img2img); got {len(images)} images. Send "
                          f"one 'image' (and optionally a 'mask').", "image")
    masks = files.get("mask", [])
    if len(masks) > 1:
        raise bad_request(f"Send at most one 'mask'; got {len(masks)}.", "mask")
    rgb, edit = await asyncio.to_thread(decode_uploads, images[0], masks[0] if masks else None)

    body = {name: typed(name, text) for name, text in fields.items()}
    strength = body.pop("strength", None)
    for name, choices in IGNORED_EDIT_CHOICES.items():
        value = body.pop(name, None)
        if value is not None and value not in choices:
            raise bad_request(f"'{name}' must be one of {', '.join(choices)} (it changes nothing here), got "
                              f"{shown(value)}.", name)
    width, height = rgb.shape[1], rgb.shape[0]
    if body.get("size") in (None, "auto"):
        check_input_size(width, height, limits.size_rule)
    params = protocol.parse_generation_request(body, replace(limits, default_size=f"{width}x{height}"))
    try:
        strength = check_strength(DEFAULT_EDIT_STRENGTH if strength is None else strength,
                                  params.num_inference_steps or default_steps)
    except ValueError as exc:
        raise bad_request(f"'strength': {exc}.", "strength") from None
    return replace(params, event_prefix="image_edit"), EditInput(rgb, edit, strength)


def with_edit(gen_request: GenerationRequest, edit: EditInput, params: protocol.ImageGenerationParams,
              default_steps: int) -> GenerationRequest:
    """The engine request of one image of the edit; its previews spread over the steps that run."""
    steps = edit_steps(params.num_inference_steps or default_steps, edit.strength)
    return replace(gen_request, image=edit.rgb, mask=edit.edit, strength=edit.strength,
                   preview_every=params.preview_interval(steps))


def typed(name: str, text: str) -> Any:
    """A multipart text field as the JSON value it stands for, where it parses."""
    stripped = text.strip()
    try:
        if name in JSON_FIELDS:
            return json.loads(stripped)
        if name in INT_FIELDS:  # "4.0" stays a float: the protocol takes integral floats, refuses 4.5
            return float(stripped) if any(c in stripped for c in ".eE") else int(stripped)
        if name in FLOAT_FIELDS:
            return float(stripped)
    except (ValueError, OverflowError, RecursionError):  # (json's errors are ValueErrors)
        return text
    if name in BOOL_FIELDS and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return text


def check_input_size(width: int, height: int, rule: SizeRule) -> None:
    """With no `size`, the output is the input's size: a 400 naming the rule when the model cannot make it."""
    try:
        rule.check(width, height)
    except ValueError as exc:
        step = rule.multiple_px
        fit = [max(rule.min_px, min(v - v % step, limit or v)) for v, limit in ((width, rule.max_width),
                                                                                (height, rule.max_height))]
        raise bad_request(f"The input image is {width}x{height}, a size this model cannot make ({exc}). Send "
                          f"'size', e.g. '{fit[0]}x{fit[1]}': the image is resized to it.", "size") from None


# --- the body ---------------------------------------------------------------------------------------


async def read_form(request: web.Request, max_bytes: int,
                    timeout_s: float) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """(text fields, files by field name) of a multipart body of at most max_bytes, read within timeout_s."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    try:
        return await asyncio.wait_for(_read_parts(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} s.", code="body_timeout") from None
    except (ValueError, AssertionError, RuntimeError, LookupError, web.RequestPayloadError) as exc:
        reason = str(exc).strip().split("\n")[-1].strip()[:120]
        raise APIError(400, f"The multipart body could not be read: {shown(reason)[1:-1]}.",
                       code="invalid_body") from None


async def _read_parts(request: web.Request, max_bytes: int) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = defaultdict(list)
    reader = await request.multipart()
    total, parts = 0, 0
    while (part := await reader.next()) is not None:
        parts += 1
        if parts > MAX_PARTS:
            raise bad_request(f"The body has more than {MAX_PARTS} parts.", code="invalid_body")
        if not isinstance(part, BodyPartReader) or not part.name:
            raise bad_request("Every part of the multipart body must be a named field (no nested multipart).",
                              code="invalid_body")
        chunks = []
        while chunk := await part.read_chunk(CHUNK_BYTES):
            total += len(chunk)
            if total > max_bytes:
                raise too_large(max_bytes)
            chunks.append(chunk)
        data = b"".join(chunks)
        if part.filename is not None or part.name in FILE_FIELDS:
            files[part.name].append(data)
        else:
            fields[part.name] = _text(part.name, data, fields)
    return fields, dict(files)


def _text(name: str, data: bytes, fields: dict[str, str]) -> str:
    if name in fields:
        raise bad_request(f"'{shown(name)[1:-1]}' is sent twice.", shown(name)[1:-1])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"'{shown(name)[1:-1]}' is not UTF-8 text (byte {exc.start}).", shown(name)[1:-1]) from None


def too_large(max_bytes: int) -> APIError:
    return APIError(413, f"The request body is too large: an image edit takes at most {max_bytes} bytes "
                    f"(--max-edit-body-bytes).", code="request_too_large")


# --- the uploads --------------------------------------------------------------------------------------


def decode_uploads(image_bytes: bytes, mask_bytes: bytes | None) -> tuple[Any, Any]:
    """(uint8 [H, W, 3], bool [H, W] or None): the image and mask decoded and checked (edit_input.py), or
    a 400 naming the field. Runs on a worker thread (decoding a large PNG takes a while)."""
    image = decode_image(image_bytes, "image")
    try:
        rgb = check_image(image, "image")
    except ValueError as exc:
        raise bad_request(f"'image': {exc}.", "image", code="invalid_image") from None
    if mask_bytes is None:
        return rgb, None
    mask = decode_image(mask_bytes, "mask")
    try:
        return rgb, check_mask(mask, (rgb.shape[1], rgb.shape[0]), "mask")
    except ValueError as exc:
        raise bad_request(f"'mask': {exc}.", "mask", code="invalid_image") from None


def decode_image(data: bytes, name: str):
    """The PIL image in `data`, fully decoded: its size is checked from the header first."""
    from PIL import Image

    from tetri_engine.engine.edit_input import MAX_INPUT_PIXELS

    if not data:
        raise bad_request(f"'{name}' is empty.", name, code="invalid_image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound is far lower
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:
            raise bad_request(f"'{name}' has more than {MAX_INPUT_PIXELS} pixels.", name, code="invalid_image") from None
        except Exception:  # not an image PIL reads in these formats (UnidentifiedImageError, broken header)
            raise bad_request(f"'{name}' is not a PNG, JPEG or WEBP image.", name, code="invalid_image") from None
        if image.width * image.height > MAX_INPUT_PIXELS or math.prod(image.size) == 0:
            raise bad_request(f"'{name}' is {image.width}x{image.height}: images of 1 to {MAX_INPUT_PIXELS} "
                              f"pixels are accepted.", name, code="invalid_image")
        try:
            image.load()
        except Exception as exc:  # truncated or corrupt data: the client's, never a server error
            raise bad_request(f"'{name}' could not be decoded ({type(exc).__name__}): the file is damaged or "
                              f"truncated.", name, code="invalid_image") from None
    return image
