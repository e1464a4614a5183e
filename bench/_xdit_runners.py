"""The xDiT baseline's GPU side (bench/xdit_baseline.py): the torch.distributed context, the FLUX model
parts built with random weights, and the two runners — xfuser's own wrapper, and the labelled yunchang
fallback — with the choice between them. `import xfuser` / `yunchang` happen only inside the runners,
on GPU machines (xfuser fails to import without a GPU)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import _xdit_common as common

XFUSER_FALLBACK_BACKENDS = ("SDPA_FLASH", "SDPA")
YUNCHANG_ATTN_TYPES = ("torch_flash", "torch_cudnn", "torch_efficient", "torch_math")  # math: last resort


class DistContext:
    """torch.distributed set-up plus a CPU (gloo) control group for rank-0 decisions and agreement."""

    def __init__(self, args: argparse.Namespace):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        if args.device == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA GPU here: use --dry-run, or --device cpu --model tiny to debug")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            self.backend = "nccl"
        else:
            self.device = torch.device("cpu")
            self.backend = "gloo"
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        timeout = timedelta(seconds=args.dist_timeout_s)
        if not dist.is_initialized():
            # No device_id: xfuser creates its groups with new_group() afterwards (see its parallel_state).
            dist.init_process_group(backend=self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=timeout)
        self.ctrl = dist.new_group(backend="gloo", timeout=timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        self.dist.barrier(group=self.ctrl)

    def broadcast(self, values: list[float]) -> list[float]:
        t = self.torch.tensor(values, dtype=self.torch.float64)
        self.dist.broadcast(t, src=0, group=self.ctrl)
        return t.tolist()

    def _reduce(self, value: float, op) -> float:
        t = self.torch.tensor([value], dtype=self.torch.float64)
        self.dist.all_reduce(t, op=op, group=self.ctrl)
        return float(t.item())

    def all_min(self, value: float) -> float:
        return self._reduce(value, self.dist.ReduceOp.MIN)

    def all_max(self, value: float) -> float:
        return self._reduce(value, self.dist.ReduceOp.MAX)

    def agree(self, ok: bool) -> bool:
        """True only when every rank is ok (so that all take the same branch afterwards)."""
        return self.all_min(1.0 if ok else 0.0) > 0.5

    def log(self, msg: str, all_ranks: bool = False) -> None:
        if all_ranks or self.is_main:
            print(f"[xdit r{self.rank}] {msg}", flush=True)

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _short_exc(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 400 else text[:400] + " ..."


def _print_traceback(ctx: "DistContext", exc: BaseException) -> None:
    """Rank 0: the last frames of `exc` and its first 400 characters (enough to locate it, not a wall)."""
    if ctx.is_main:
        frames = traceback.TracebackException.from_exception(exc, limit=-6).stack.format()
        print("Traceback (last frames):\n" + "".join(frames) + _short_exc(exc), flush=True)


def _package_version(name: str) -> str | None:
    """Installed version, or the module's own __version__ when it is imported but has no metadata."""
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        pass
    if name not in sys.modules:
        return None
    found = getattr(sys.modules[name], "__version__", None)
    if isinstance(found, str):
        return found
    try:
        import importlib
        return getattr(importlib.import_module(f"{name}.__version__"), "__version__", None)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------- model parts

def build_transformer(cls, config: dict, ctx: DistContext, seed: int):
    """FLUX transformer of `config` with random weights, built directly on the device in the run dtype
    (seconds for 11.9 B parameters) and identical on every rank (same seed)."""
    torch = ctx.torch
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)


def build_vae(config: dict, ctx: DistContext, seed: int):
    from diffusers import AutoencoderKL

    torch = ctx.torch
    torch.manual_seed(seed + 1)
    with torch.device(ctx.device):
        vae = AutoencoderKL(**config)
    return vae.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)


def latent_image_ids(width: int, height: int):
    import torch

    h, w = height // common.PATCH_PX, width // common.PATCH_PX
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(width: int, height: int, text_tokens: int, tcfg: dict, ctx: DistContext, seed: int) -> dict:
    """One request's transformer inputs, drawn on the device (fast, no host copy), identical on every
    rank (same seed, same generator type). The prompt embeddings stand in for CLIP/T5 outputs."""
    torch = ctx.torch
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    n = common.image_tokens(width, height)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=ctx.device, dtype=torch.float32).to(ctx.dtype)

    inputs = {
        "hidden_states": randn(1, n, tcfg["in_channels"]),
        "encoder_hidden_states": randn(1, text_tokens, tcfg["joint_attention_dim"]),
        "pooled_projections": randn(1, tcfg["pooled_projection_dim"]),
        "timestep": torch.ones(1, device=ctx.device, dtype=ctx.dtype),
        "img_ids": latent_image_ids(width, height).to(device=ctx.device, dtype=ctx.dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=ctx.device, dtype=ctx.dtype),
    }
    if tcfg.get("guidance_embeds"):
        inputs["guidance"] = torch.full((1,), common.DEFAULT_GUIDANCE, device=ctx.device, dtype=ctx.dtype)
    return inputs


def unpack_latents(latents, width: int, height: int):
    """FluxPipeline._unpack_latents: (1, tokens, 64) -> (1, 16, H/8, W/8)."""
    b, _, c = latents.shape
    h, w = height // common.VAE_SCALE_FACTOR, width // common.VAE_SCALE_FACTOR
    x = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, h, w)


def _flux_blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def reference_forward(model, inputs: dict):
    """One-device diffusers forward of the same weights (diffusers' own FluxAttnProcessor, full sequence)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxTransformer2DModel

    blocks = _flux_blocks(model)
    saved = [b.attn.processor for b in blocks]
    try:
        for b in blocks:
            b.attn.processor = FluxAttnProcessor()
        return FluxTransformer2DModel.forward(model, **inputs, return_dict=False)[0]
    finally:
        for b, p in zip(blocks, saved):
            b.attn.processor = p


class FluxXditBaselinePipelineStub:
    """What xfuser's DiTRuntimeState reads from a pipeline: `.transformer` and `.vae_scale_factor`.
    The class name starts with "Flux" so that xfuser applies FLUX's 2x2 packing (scale 16)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.vae_scale_factor = common.VAE_SCALE_FACTOR


# ------------------------------------------------------------------------------------------- runners

class XfuserRunner:
    """xfuser 0.7.0's xFuserFlux1Transformer2DWrapper under xDiT's own runtime state and groups."""

    path = "xfuser"

    def __init__(self, args: argparse.Namespace, ctx: DistContext, tcfg: dict):
        self.ctx = ctx
        from xfuser.config import xFuserArgs
        from xfuser.core.distributed import (
            get_runtime_state,
            get_ring_parallel_world_size,
            get_sequence_parallel_world_size,
            get_ulysses_parallel_world_size,
            init_distributed_environment,
            initialize_runtime_state,
        )
        from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

        self._get_runtime_state = get_runtime_state
        self.version = _package_version("xfuser")
        init_distributed_environment(rank=ctx.rank, world_size=ctx.world_size, local_rank=ctx.local_rank,
                                     backend=ctx.backend)
        xargs = xFuserArgs(
            model="black-forest-labs/FLUX.1-dev",
            ulysses_degree=ctx.world_size,
            ring_degree=1,
            pipefusion_parallel_degree=1,
            height=1024,
            width=1024,
            num_inference_steps=50,
            max_sequence_length=args.text_tokens,
            attention_backend=args.attention_backend,
        )
        engine_config, _ = xargs.create_config()
        cls = xFuserFlux1Transformer2DWrapper
        # 0.7.0 calls self._pad_to_sp_divisible but defines pad_to_sp_divisible (only hit when the image
        # token count is not divisible by the degree).
        if not hasattr(cls, "_pad_to_sp_divisible") and hasattr(cls, "pad_to_sp_divisible"):
            cls._pad_to_sp_divisible = cls.pad_to_sp_divisible
        self.model = build_transformer(cls, tcfg, ctx, args.seed)
        initialize_runtime_state(FluxXditBaselinePipelineStub(self.model), engine_config)
        # As xfuser's FLUX.1 runner does before each pipeline call (no height/width: metadata only for PipeFusion).
        get_runtime_state().set_input_parameters(
            batch_size=1, num_inference_steps=50, max_condition_sequence_length=args.text_tokens,
            split_text_embed_in_sp=True)
        self.degree = get_sequence_parallel_world_size()
        self.detail = (f"xfuser {self.version} xFuserFlux1Transformer2DWrapper, SP degree {self.degree} = Ulysses "
                       f"{get_ulysses_parallel_world_size()} x ring {get_ring_parallel_world_size()}, "
                       f"PipeFusion 1, CFG parallel off")

    @property
    def attention(self) -> str:
        return self._get_runtime_state().attention_backend.name

    def attention_candidates(self) -> list[str]:
        first = self.attention
        return [first] + [b for b in XFUSER_FALLBACK_BACKENDS if b != first]

    def set_attention(self, name: str) -> None:
        self._get_runtime_state().set_attention_backend(name)

    def forward(self, inputs: dict):
        return self.model(**inputs, return_dict=False)[0]

    def reference_forward(self, inputs: dict):
        return reference_forward(self.model, inputs)

    def close(self) -> None:
        self.model = None


class UlyssesFluxAttnProcessor:
    """diffusers' FluxAttnProcessor (0.42) with the attention call replaced by yunchang's
    LongContextAttention: (B, S/N, H, D) sequence shards -> all-to-all -> attention -> all-to-all back."""

    def __init__(self, attention):
        import torch
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        self.attention = attention
        self._cat = torch.cat
        self._qkv = _get_qkv_projections
        self._rope = apply_rotary_emb

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = self._qkv(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = self._cat([encoder_query, query], dim=1)
            key = self._cat([encoder_key, key], dim=1)
            value = self._cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = self._rope(query, image_rotary_emb, sequence_dim=1)
            key = self._rope(key, image_rotary_emb, sequence_dim=1)
        out = self.attention(query.contiguous(), key.contiguous(), value.contiguous())
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            encoder_out = attn.to_add_out(encoder_out.contiguous())
            return out, encoder_out
        return out


class YunchangRunner:
    """Fallback: diffusers FluxTransformer2DModel + yunchang LongContextAttention (xDiT's Ulysses core)."""

    path = "yunchang"

    def __init__(self, args: argparse.Namespace, ctx: DistContext, tcfg: dict):
        import yunchang
        from diffusers import FluxTransformer2DModel
        from yunchang import LongContextAttention, set_seq_parallel_pg
        from yunchang.globals import PROCESS_GROUP
        from yunchang.kernels import AttnType

        self.ctx = ctx
        self.version = _package_version("yunchang") or getattr(yunchang, "__version__", None)
        if PROCESS_GROUP.ULYSSES_PG is None:
            set_seq_parallel_pg(ctx.world_size, 1, ctx.rank, ctx.world_size)
        self.group = PROCESS_GROUP.ULYSSES_PG
        self.degree = ctx.dist.get_world_size(self.group)
        self.group_rank = ctx.dist.get_rank(self.group)
        self._lca, self._attn_type = LongContextAttention, AttnType
        self.model = build_transformer(FluxTransformer2DModel, tcfg, ctx, args.seed)
        self._attention = args.yunchang_attn
        self.set_attention(self._attention)
        self.detail = (f"yunchang {self.version} LongContextAttention (Ulysses degree {self.degree}, ring 1) in "
                       f"diffusers FluxTransformer2DModel; fallback, not xfuser's own wrapper")

    @property
    def attention(self) -> str:
        return self._attention

    def attention_candidates(self) -> list[str]:
        return [self._attention] + [a for a in YUNCHANG_ATTN_TYPES if a != self._attention]

    def set_attention(self, name: str) -> None:
        attention = self._lca(ring_impl_type="basic", attn_type=self._attn_type.from_string(name))
        processor = UlyssesFluxAttnProcessor(attention)
        for block in _flux_blocks(self.model):
            block.attn.processor = processor
        self._attention = name

    def _shard(self, x, dim: int):
        if x.shape[dim] % self.degree:
            raise ValueError(f"sequence of {x.shape[dim]} tokens does not split into {self.degree} shards")
        return x.chunk(self.degree, dim=dim)[self.group_rank]

    def forward(self, inputs: dict):
        torch = self.ctx.torch
        local = dict(inputs)
        local["hidden_states"] = self._shard(inputs["hidden_states"], 1)
        local["encoder_hidden_states"] = self._shard(inputs["encoder_hidden_states"], 1)
        local["img_ids"] = self._shard(inputs["img_ids"], 0)
        local["txt_ids"] = self._shard(inputs["txt_ids"], 0)
        out = self.model(**local, return_dict=False)[0].contiguous()
        if self.degree == 1:
            return out
        b, n, c = out.shape
        gathered = torch.empty((self.degree * b, n, c), dtype=out.dtype, device=out.device)
        self.ctx.dist.all_gather_into_tensor(gathered, out, group=self.group)  # rank shards cat along dim 0
        return gathered.view(self.degree, b, n, c).permute(1, 0, 2, 3).reshape(b, self.degree * n, c)

    def reference_forward(self, inputs: dict):
        return reference_forward(self.model, inputs)

    def close(self) -> None:
        self.model = None


RUNNERS = {"xfuser": XfuserRunner, "yunchang": YunchangRunner}


def _free(ctx: DistContext) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        ctx.torch.cuda.empty_cache()


PROBE_SIZE = {"flux-dev": (256, 256), "tiny": (64, 64)}  # the first forward that decides the path


def select_runner(args: argparse.Namespace, ctx: DistContext, tcfg: dict):
    """Build the first path that imports, builds and runs one forward (at PROBE_SIZE, whatever sizes the
    run uses) on every rank; returns (runner, attempts) where attempts lists what failed and why."""
    probe_size = PROBE_SIZE[args.model]
    torch = ctx.torch
    order = ["xfuser", "yunchang"] if args.path == "auto" else [args.path]
    attempts: list[dict] = []
    probe = make_inputs(*probe_size, args.text_tokens, tcfg, ctx, seed=12345)
    for name in order:
        runner, error = None, None
        t = time.time()
        try:
            runner = RUNNERS[name](args, ctx, tcfg)
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next path
            error = _short_exc(exc)
            ctx.log(f"path {name}: build failed: {error}", all_ranks=True)
            _print_traceback(ctx, exc)
        if not ctx.agree(error is None):
            attempts.append({"path": name, "stage": "build", "error": error or "failed on another rank"})
            runner = None
            _free(ctx)
            continue
        ctx.log(f"path {name}: built in {time.time() - t:.1f} s ({runner.detail})")
        for backend in runner.attention_candidates():
            error = None
            try:
                if backend != runner.attention:
                    runner.set_attention(backend)
                with torch.no_grad():
                    out = runner.forward(probe)
                ctx.sync()
                if tuple(out.shape) != tuple(probe["hidden_states"].shape):
                    raise RuntimeError(f"output shape {tuple(out.shape)} != input {tuple(probe['hidden_states'].shape)}")
            except Exception as exc:  # noqa: BLE001
                error = _short_exc(exc)
                ctx.log(f"path {name}, attention {backend}: first forward failed: {error}", all_ranks=True)
                _print_traceback(ctx, exc)
            if ctx.agree(error is None):
                ctx.log(f"path {name}: first forward ok with attention {runner.attention}")
                return runner, attempts
            attempts.append({"path": name, "stage": f"forward[{backend}]", "error": error or "failed on another rank"})
        runner.close()
        runner = None
        _free(ctx)
    raise RuntimeError(f"no xDiT path worked: {json.dumps(attempts)}")


def run_meta(args: argparse.Namespace, ctx: DistContext, runner, attempts: list[dict]) -> dict:
    torch = ctx.torch
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "path": runner.path,
        "path_detail": runner.detail,
        "fallback_used": runner.path != "xfuser",
        "failed_attempts": attempts,
        "attention": runner.attention,
        "degree": runner.degree,
        "world_size": ctx.world_size,
        "model": args.model,
        "dtype": args.dtype,
        "text_tokens": args.text_tokens,
        "device": f"{ctx.world_size}x {gpu}",
        "torch": torch.__version__,
        "diffusers": _package_version("diffusers"),
        "xfuser": _package_version("xfuser"),
        "yunchang": _package_version("yunchang"),
        "env": {k: os.environ.get(k) for k in common.XDIT_ENV_VARS},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _print_fallback_note(args: argparse.Namespace, meta: dict, attempts: list[dict]) -> None:
    if not meta["fallback_used"]:
        return
    why = ("requested with --path yunchang" if args.path == "yunchang"
           else f"xfuser's own wrapper failed: {json.dumps(attempts)}")
    print(f"NOTE: FALLBACK PATH ({meta['path']}: yunchang's Ulysses in diffusers' FLUX, not xfuser's wrapper): {why}")


class JsonlWriter:
    """Rank 0 appends one JSON object per line and flushes, so a killed run keeps what it measured."""

    def __init__(self, path: str | None):
        self.f = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "w", encoding="utf-8")

    def write(self, obj: dict) -> None:
        if self.f:
            self.f.write(json.dumps(obj) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


