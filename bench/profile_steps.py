"""Step-time profile of a model on this machine: bench/profiles/<model>-<machine>.json plus a markdown
table for bench/RESULTS.md (bench/profiles/<model>-<machine>.md), and one JSON line per entry.

(Not bench/profile.py: a script directory is first on sys.path, and a file named profile.py there
shadows the standard library's `profile`, which cProfile, hence torch._dynamo, hence diffusers, imports:
every script in bench/ that loads the model would break.)

Median of >= 20 steps after warm-up per (size, degree, batch), steps run 5 per executor call as the
engine's rounds run them; VAE decode (+PNG) and prompt-encode times. Same implementation as
`tetri-engine profile` (tetri_engine/engine/profiling.py). Examples:

    python bench/profile_steps.py --model tiny --devices cpu:0,cpu:1,cpu:2,cpu:3 --resolutions 256,512 --steps 20
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python bench/profile_steps.py --model flux-dev --devices cuda:0,cuda:1
    # one GPU: refresh the degree-1 rows of the 2-GPU profile (degree 2 kept, each entry dated)
    python bench/profile_steps.py --model flux-dev --devices cuda:0 --degrees 1 \
        --merge-into bench/profiles/flux-dev-2xH200.json --output bench/profiles/flux-dev-2xH200.json

The model runs with the engine's options and defaults (--compile, --attention, --dtype, --ulysses-chunks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tetri_engine.commands import profile as profile_command  # noqa: E402
from tetri_engine.engine.profiling import format_table, machine_name, profile_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    profile_command.add_arguments(parser)
    parser.add_argument("--outdir", default=os.path.join(HERE, "profiles"))
    args = parser.parse_args(argv)
    devices = profile_command.resolve_devices(args.devices)
    settings = profile_command.settings_from_args(args, len(devices))
    name = f"{os.path.basename(args.model.rstrip('/'))}-{machine_name(devices)}"
    output = args.output or os.path.join(args.outdir, f"{name}.json")
    table_path = args.table or os.path.splitext(output)[0] + ".md"
    print(f"# profiling {args.model} on {','.join(devices)} -> {output}", file=sys.stderr, flush=True)
    profile = profile_model(args.model, devices, settings, dtype=args.dtype,
                            progress=lambda message: print("# " + message, file=sys.stderr, flush=True),
                            **profile_command.model_options(args))
    if args.merge_into:
        profile = profile_command.merge_into(args.merge_into, profile)
    for entry in profile["step_ms"]:
        print(json.dumps({"kind": "step", "model": profile["model"], "machine": profile["machine"], **entry}))
    for entry in profile["decode_ms"]:
        print(json.dumps({"kind": "decode", "model": profile["model"], "machine": profile["machine"], **entry}))
    print(json.dumps({"kind": "encode", "model": profile["model"], "machine": profile["machine"],
                      "ms": profile["encode_ms"]}))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
    table = format_table(profile)
    with open(table_path, "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table, file=sys.stderr)
    print(f"# wrote {output} and {table_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
