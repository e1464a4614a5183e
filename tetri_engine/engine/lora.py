"""A request's LoRA adapters as admission takes them (issue 19): checked, in one canonical form, and the key
the scheduler batches by.

    refs = normalize_lora([{"name": "style", "scale": 0.8}], check_name)   # -> (LoraRef("style", 0.8),)
    lora_key(refs)                                                         # -> (("style", 0.8),)

Canonical: sorted by name, scale-0 adapters dropped (they change nothing, so such a request is the plain
model's and may batch with plain requests). Two requests with the same key run the same weights.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from tetri_engine.request import MAX_LORA_SCALE, MAX_LORAS_PER_REQUEST, LoraRef

MAX_NAME_CHARS = 255  # a file name's limit on every common file system


def normalize_lora(value: Any, check_name: Callable[[str], Any] | None) -> tuple[LoraRef, ...]:
    """`GenerationRequest.lora` (None, or a list of LoraRef / {"name", "scale"} dicts) -> LoraRefs sorted by
    name without the scale-0 ones. ValueError: not such a list, a name twice, a scale that is not a finite
    number within +-MAX_LORA_SCALE, more than MAX_LORAS_PER_REQUEST adapters, or a name `check_name` refuses
    (an adapter this engine does not have; None: the engine serves no adapters)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"lora must be a list of {{\"name\", \"scale\"}} objects, got {type(value).__name__}")
    if len(value) > MAX_LORAS_PER_REQUEST:
        raise ValueError(f"lora names {len(value)} adapters; at most {MAX_LORAS_PER_REQUEST} are accepted")
    refs = [_ref(item, i) for i, item in enumerate(value)]
    names = [ref.name for ref in refs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"lora names adapter {twice[0]!r} twice: give each adapter once, with its scale")
    if refs and check_name is None:
        raise ValueError("this engine serves no LoRA adapters (it was started without --lora-dir)")
    for ref in refs:
        check_name(ref.name)
    return tuple(sorted((ref for ref in refs if ref.scale != 0.0), key=lambda ref: ref.name))


def _ref(item: Any, index: int) -> LoraRef:
    if isinstance(item, LoraRef):
        name, scale = item.name, item.scale
    elif isinstance(item, dict):
        extra = sorted(set(item) - {"name", "scale"})
        if extra:
            raise ValueError(f"lora[{index}] has an unknown field {extra[0]!r}: an adapter is {{\"name\", \"scale\"}}")
        name, scale = item.get("name"), item.get("scale", 1.0)
    else:
        raise ValueError(f"lora[{index}] must be an object {{\"name\", \"scale\"}}, got {type(item).__name__}")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS:
        shown = repr(name) if not isinstance(name, str) else f"{len(name)} characters"
        raise ValueError(f"lora[{index}].name must be an adapter's name (1 to {MAX_NAME_CHARS} characters), got {shown}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or abs(scale) > MAX_LORA_SCALE:
        raise ValueError(f"lora[{index}].scale={scale!r} must be a number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}")
    return LoraRef(name, float(scale))


def lora_key(refs: tuple[LoraRef, ...] | None) -> tuple[tuple[str, float], ...]:
    """The adapter set as the scheduler and executor key it: ((name, scale), ...)."""
    return tuple((ref.name, ref.scale) for ref in refs or ())
