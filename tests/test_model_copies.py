"""Hand copies of diffusers code are marked, and checked against the installed diffusers.

Every copy in tetri_engine/model/ says "Copied from diffusers VERSION `dotted.path` (source sha256
DIGEST)". DIGEST is the first 12 hex digits of the sha256 of the source's syntax tree (docstrings
dropped, so comments, docstrings and formatting do not count). When an installed diffusers changes
one of these functions the test fails: re-read the new source, update the copy, then the marker
(version and the digest printed in the failure).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import pathlib
import re
import textwrap

import pytest

MODEL_DIR = pathlib.Path(__file__).resolve().parent.parent / "tetri_engine" / "model"
# Wrapped docstrings may split a marker over lines: whitespace (and a docstring's indent) is folded.
MARKER = re.compile(r"Copied from diffusers\s+(\S+)\s+`([\w.]+)`\s+\(source\s+sha256\s+(\w+)\)")


def source_digest(dotted: str) -> str:
    """`tree_digest` of the source of the object `dotted` names (module, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return tree_digest(inspect.getsource(obj))
    raise ImportError(dotted)


def tree_digest(source: str) -> str:
    """sha256 (12 hex digits) of the syntax tree of `source`, docstrings dropped."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:12]


def markers() -> list[tuple[str, str, str, str]]:
    """(file, version, dotted path, digest) of every marker under tetri_engine/model/."""
    found = []
    for path in sorted(MODEL_DIR.glob("*.py")):
        text = " ".join(path.read_text().split())
        found += [(path.name, *m.groups()) for m in MARKER.finditer(text)]
    return found


def test_the_copies_are_marked():
    marked = {dotted for _, _, dotted, _ in markers()}
    # The attention processors, forwards and pipeline stages the runtime re-implements on shards.
    assert {
        "diffusers.models.transformers.transformer_flux.FluxAttnProcessor.__call__",
        "diffusers.models.transformers.transformer_flux.FluxTransformer2DModel.forward",
        "diffusers.pipelines.flux.pipeline_flux.FluxPipeline.__call__",
        "diffusers.models.attention_processor.JointAttnProcessor2_0.__call__",
        "diffusers.models.transformers.transformer_sd3.SD3Transformer2DModel.forward",
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.StableDiffusion3Pipeline.__call__",
        "diffusers.schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteScheduler.step",
    } <= marked


@pytest.mark.parametrize("file, version, dotted, digest", markers(), ids=lambda v: str(v).rsplit(".", 2)[-1])
def test_copied_source_is_unchanged_in_the_installed_diffusers(file, version, dotted, digest):
    import diffusers

    now = source_digest(dotted)
    assert now == digest, (
        f"{file}: `{dotted}` changed in the installed diffusers {diffusers.__version__} (copied from {version}): "
        f"re-read it, update the copy in tetri_engine/model/{file}, then its marker to "
        f"'Copied from diffusers {diffusers.__version__} `{dotted}` (source sha256 {now})'")


def test_the_digest_sees_code_changes_but_not_docstrings_or_comments():
    from diffusers.models.embeddings import PatchEmbed

    source = textwrap.dedent(inspect.getsource(PatchEmbed.forward))
    assert tree_digest(source) == source_digest("diffusers.models.embeddings.PatchEmbed.forward")
    lines = source.splitlines()
    reworded = "\n".join([lines[0], '    """Another docstring."""  # and a comment', *lines[1:]])
    assert tree_digest(reworded) == tree_digest(source)
    assert tree_digest(source.replace("return ", "return 0 + ", 1)) != tree_digest(source)
