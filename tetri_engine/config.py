"""EngineConfig: everything the engine is started with, as one plain dataclass, checked once here.

Each field's `metadata["help"]` is its documentation and its `tetri-engine serve --help` text (the
server builds one flag per field: server/config.py), so an engine option is one field here and
nothing else. The policy name is the scheduler's fact: AsyncEngine checks it against `sched`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from tetri_engine.request import MIN_SIZE_PX, PATCH_PX, SizeRule, StrEnum


LORA_SUFFIX = ".safetensors"
LORA_DIR_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def lora_files(directory: str) -> dict[str, str]:
    """The LoRA adapters in `directory`: name -> safetensors file, by name. The one place the layout is
    written: `NAME.safetensors`, or `NAME/pytorch_lora_weights.safetensors` (diffusers' save_lora_weights).
    Read anew at each call, so adapters added while serving are found."""
    found = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.name.endswith(LORA_SUFFIX):
                found[entry.name[:-len(LORA_SUFFIX)]] = entry.path
            elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, LORA_DIR_FILE)):
                found.setdefault(entry.name, os.path.join(entry.path, LORA_DIR_FILE))
    return dict(sorted(found.items()))


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "tetri-engine")


class AdmissionMode(StrEnum):
    """What admission does with a deadline the policy says cannot be met: not even alone at full width,
    or not alongside the requests already accepted (policy.admission_check)."""

    REJECT = "reject"  # RequestRejected("deadline_impossible": HTTP 400 / "busy" with the policy's retry estimate: 429)
    BEST_EFFORT = "best_effort"  # accept it; the policy gives up whom it must (a "late" output says so)


def option(default, help_text: str, *, factory=None, **extra):
    metadata = {"help": help_text, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EngineConfig:
    model: str = option("tiny", "model: tiny (embedded random-weight default), tiny-sd3, flux-dev, flux-schnell, "
                       "sd3-medium, or a local diffusers directory")
    devices: list[str] | None = option(None, "devices, comma-separated, e.g. cuda:0,cuda:1 or cpu:0,cpu:1 "
                                      "(default: every visible GPU, else --num-cpu-devices virtual CPU "
                                      "devices)", metavar="LIST")
    num_cpu_devices: int = option(4, "number of virtual CPU devices when there is no GPU")
    dtype: str = option("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32, or fp8: float8 "
                       "(e4m3, row-wise scaled) GEMMs in the transformer blocks, activations as auto "
                       "(quality cost: bench/RESULTS.md)", choices=("auto", "bf16", "fp16", "fp32", "fp8"))
    policy: str = option("tetri", "scheduling policy: a name tetri_engine.sched.make_policy knows, e.g. "
                        "tetri, fixedK (xDiT-style fixed degree K), rssp, edfK")
    profile: str | None = option(None, "step-time profile JSON (bench/profiles/*.json); default: measured "
                                "at start-up and cached under --cache-dir", metavar="PATH")
    cache_dir: str = option(None, "directory for cached profiles (default: ~/.cache/tetri-engine)",
                           factory=default_cache_dir, metavar="DIR")
    round_steps: int = option(5, "round length in steps of a typical request (TetriServe: 5)")
    round_s: float | None = option(None, "fixed round length in seconds (overrides --round-steps)")
    max_queue: int = option(64, "at most this many requests waiting or running; more are refused "
                           "(queue_full, HTTP 429)")
    admission: AdmissionMode = option(AdmissionMode.REJECT, "a deadline that cannot be met (even alone, "
                                     "or alongside the accepted requests): reject (refused at once: HTTP 400, "
                                     "or 429 while busy) or best_effort (accepted; the scheduler gives up "
                                     "whom it must)",
                                     choices=tuple(m.value for m in AdmissionMode))
    slo_scale: float = option(1.0, "default deadline = the SLO table's target for the resolution x this "
                             "scale (requests may send their own deadline or scale)")
    max_width: int = option(2048, "largest image width accepted, in pixels")
    max_height: int = option(2048, "largest image height accepted, in pixels")
    max_steps: int = option(100, "largest num_inference_steps accepted")
    comm_cache_size: int = option(64, "communicator cache size (device groups kept warm; least recently "
                                 "used beyond it are destroyed)")
    cuda_graphs: bool = option(True, "replay each batch's denoising forward as a CUDA graph, captured once "
                              "per shape, group and rank (GPU only; off: every step launches eagerly)")
    compile: bool = option(True, "torch.compile the transformer blocks (GPU only; ignored on CPU devices): every "
                          "shape the engine plans compiles at start-up (inductor cache under --cache-dir), a "
                          "shape outside that set runs eagerly, never compiling in a request")
    warmup_sizes: list[str] | None = option(None, "image sizes WxH compiled at start-up besides the profile's, "
                                           "e.g. 1024x768,768x1024 (with --compile on GPUs)", metavar="LIST")
    attention: str = option("auto", "attention kernel: auto (GPU: the fastest of cudnn, flash, efficient that "
                           "agrees with the reference on a probe; CPU: sdpa), sdpa (PyTorch picks per call), "
                           "cudnn, flash, efficient, math", choices=("auto", "sdpa", "cudnn", "flash",
                                                                     "efficient", "math"))
    ulysses_chunks: int = option(1, "sequence-parallel attention: split each exchange into this many head chunks "
                                "so that one chunk's exchange overlaps another's attention (GPU; 1: one "
                                "exchange of q, k and v, one of the output)")
    lora_dir: str | None = option(None, "directory of LoRA adapters requests may name (issue 19): NAME.safetensors, or "
                                 "NAME/pytorch_lora_weights.safetensors as diffusers saves them; local files only "
                                 "(default: none, requests cannot name adapters)", metavar="DIR")
    lora_cache_mb: int = option(2048, "LoRA adapter weights kept loaded per device, in MiB (least recently used "
                               "beyond it are dropped and read again on next use)")

    def __post_init__(self) -> None:
        self.admission = AdmissionMode.parse(self.admission, "admission")
        for name in ("num_cpu_devices", "round_steps", "max_queue", "max_steps", "comm_cache_size", "ulysses_chunks",
                     "lora_cache_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.round_s is not None and not self.round_s > 0:
            raise ValueError(f"round_s={self.round_s!r} must be > 0 seconds")
        if not self.slo_scale > 0:
            raise ValueError(f"slo_scale={self.slo_scale!r} must be > 0")
        for name in ("max_width", "max_height"):
            if getattr(self, name) < MIN_SIZE_PX:
                raise ValueError(f"{name}={getattr(self, name)!r} is below the minimum image side of {MIN_SIZE_PX} px")
        for width, height in self.warmup_size_list():
            self.size_rule().check(width, height)
        if self.lora_dir is not None and not os.path.isdir(self.lora_dir):
            raise ValueError(f"lora_dir={self.lora_dir!r} is not a directory")

    def lora_files(self) -> dict[str, str]:
        """The adapters of `lora_dir`: name -> file (`lora_files`); {} without a lora_dir."""
        return lora_files(self.lora_dir) if self.lora_dir is not None else {}

    def warmup_size_list(self) -> list[tuple[int, int]]:
        """`warmup_sizes` as (width, height) pairs; ValueError for an item that is not WxH."""
        sizes = []
        for item in self.warmup_sizes or []:
            width, sep, height = str(item).strip().lower().partition("x")
            if not (sep and width.isdigit() and height.isdigit()):
                raise ValueError(f"warmup_sizes: {item!r} is not a size WxH, e.g. 1024x768")
            sizes.append((int(width), int(height)))
        return sizes

    def size_rule(self) -> SizeRule:
        """The sizes this configuration serves (the loaded model may narrow it: AsyncEngine.size_rule)."""
        return SizeRule(multiple_px=PATCH_PX, min_px=MIN_SIZE_PX, max_width=self.max_width,
                        max_height=self.max_height)
