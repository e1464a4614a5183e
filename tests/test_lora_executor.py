"""LoRA adapters in the model and executor layers (issue 19), tiny FLUX model on virtual CPU devices: files read
as diffusers reads them, adapters fused per device and undone exactly, any degree and degree changes, the LRU.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from lora_support import attention_layers, lora_factors, save_lora
from test_model_speed_options import needs_cpu_fp8
from tetri_engine.executor import Executor
from tetri_engine.executor.adapters import LoraDevices
from tetri_engine.model import load_runtime
from tetri_engine.model.lora import read_adapter
from tetri_engine.request import GenerationRequest, LoraRef

STEPS = 3


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("loras")
    save_lora(str(directory), "a", seed=1, alpha=8)  # NAME/pytorch_lora_weights.safetensors, scale alpha / r = 2
    save_lora(str(directory), "b", seed=2, as_file=True)  # NAME.safetensors, no adapter config: scale 1
    save_lora(str(directory), "c", seed=3)
    save_lora(str(directory), "wrong", seed=4, layers=["transformer_blocks.0.attn.no_such_layer"])
    # "ab": one rank-8 adapter that is a (at its scale 2) and b side by side, i.e. their sum.
    a, b = lora_factors(1), lora_factors(2)
    ab = {}
    for layer in attention_layers():
        ab[f"{layer}.lora_A.weight"] = torch.cat([a[f"{layer}.lora_A.weight"], b[f"{layer}.lora_A.weight"]])
        ab[f"{layer}.lora_B.weight"] = torch.cat([2 * a[f"{layer}.lora_B.weight"], b[f"{layer}.lora_B.weight"]], 1)
    FluxPipeline.save_lora_weights(str(directory / "ab"), transformer_lora_layers=ab)
    return str(directory)


@pytest.fixture(scope="module")
def executor(lora_dir):
    ex = Executor.load("tiny", ["cpu:0", "cpu:1"], lora_dir=lora_dir)
    yield ex
    ex.shutdown()


def run(ex: Executor, rid: str, lora, groups: list[tuple[tuple[int, ...], int]]) -> torch.Tensor:
    """Encode, run the steps group by group ((device indices, steps), ...), and return the final latent."""
    ex.submit_encode(rid, GenerationRequest("a lighthouse at dusk", 128, 128, num_inference_steps=STEPS, seed=11,
                                            lora=lora)).result()
    for devices, steps in groups:
        result = ex.submit_steps([rid], devices, steps).result()
        assert not result.errors, result.errors
    latent = ex.latent(rid)
    ex.release(rid)
    return latent


def test_read_adapter_takes_the_scale_from_the_adapter_config(lora_dir):
    runtime = load_runtime("tiny", devices=["cpu:0"])
    from tetri_engine.model.lora import target_layers

    layers = target_layers(runtime.transformer_on("cpu:0"))
    a = read_adapter(f"{lora_dir}/a/pytorch_lora_weights.safetensors", "FluxPipeline", layers, torch.device("cpu"),
                     torch.float32)
    b = read_adapter(f"{lora_dir}/b.safetensors", "FluxPipeline", layers, torch.device("cpu"), torch.float32)
    factors = lora_factors(1)
    layer = attention_layers()[0]
    assert set(a.layers) == set(attention_layers()) and a.rank == 4
    torch.testing.assert_close(a.layers[layer][0], factors[f"{layer}.lora_A.weight"])
    torch.testing.assert_close(a.layers[layer][1], factors[f"{layer}.lora_B.weight"] * 2)  # lora_alpha 8 / r 4
    torch.testing.assert_close(b.layers[layer][1], lora_factors(2)[f"{layer}.lora_B.weight"])  # no config: 1
    with pytest.raises(ValueError, match="no_such_layer"):
        read_adapter(f"{lora_dir}/wrong/pytorch_lora_weights.safetensors", "FluxPipeline", layers,
                     torch.device("cpu"), torch.float32)


def test_an_adapter_changes_the_result_and_the_plain_model_comes_back_bit_for_bit(executor):
    base = run(executor, "base", None, [((0,), STEPS)])
    with_a = run(executor, "a", (LoraRef("a", 1.0),), [((0,), STEPS)])
    assert (with_a - base).abs().max() > 0.1  # the adapter matters
    assert torch.equal(run(executor, "a-again", (LoraRef("a", 1.0),), [((0,), STEPS)]), with_a)
    fused = executor.loras.devices[0].fused
    assert fused.originals_nbytes > 0  # kept while `a` is fused, for undoing
    # Device 0 holds `a` fused now: a plain request there gets the original weights back, exactly, and the
    # device keeps no copy of them any more.
    assert torch.equal(run(executor, "base-again", None, [((0,), STEPS)]), base)
    assert fused.key == () and fused.originals_nbytes == 0
    assert torch.equal(run(executor, "scale-0", (LoraRef("a", 0.0),), [((0,), STEPS)]), base)
    half = run(executor, "a-half", (LoraRef("a", 0.5),), [((0,), STEPS)])
    assert 0 < (half - base).abs().max() < (with_a - base).abs().max()


def test_two_adapters_apply_their_sum(executor):
    only_a = run(executor, "only-a", (LoraRef("a", 1.0),), [((0,), STEPS)])
    both = run(executor, "a+b", (LoraRef("a", 1.0), LoraRef("b", 1.0)), [((0,), STEPS)])
    assert executor.loras.devices[0].fused.key == (("a", 1.0), ("b", 1.0))
    assert (both - only_a).abs().max() > 0.01
    summed = run(executor, "ab", (LoraRef("ab", 1.0),), [((0,), STEPS)])
    torch.testing.assert_close(both, summed, atol=1e-5, rtol=1e-5)


def test_degree_1_degree_2_and_a_degree_change_give_the_same_image(executor):
    lora = (LoraRef("c", 0.9),)
    one = run(executor, "d1", lora, [((1,), STEPS)])
    two = run(executor, "d2", lora, [((0, 1), STEPS)])
    moved = run(executor, "d-mixed", lora, [((0,), 1), ((0, 1), 1), ((1,), 1)])
    base = run(executor, "d-base", None, [((0, 1), STEPS)])
    assert (one - base).abs().max() > 0.1
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved, one, atol=1e-5, rtol=1e-5)


def test_requests_with_different_adapter_sets_are_never_one_batch(executor):
    for rid, lora in (("x", (LoraRef("a", 1.0),)), ("y", (LoraRef("b", 1.0),))):
        executor.submit_encode(rid, GenerationRequest("p", 64, 64, num_inference_steps=1, seed=1, lora=lora)).result()
    with pytest.raises(ValueError, match="different LoRA adapter sets"):
        executor.submit_steps(["x", "y"], (0,), 1)
    executor.release("x")
    executor.release("y")


def test_an_adapter_that_does_not_fit_fails_at_encode_and_is_then_refused(executor):
    future = executor.submit_encode("bad", GenerationRequest("p", 64, 64, num_inference_steps=1, seed=1,
                                                             lora=(LoraRef("wrong", 1.0),)))
    with pytest.raises(ValueError, match="no_such_layer"):
        future.result()
    executor.release("bad")
    with pytest.raises(ValueError, match="cannot be used with this model"):
        executor.loras.check("wrong")
    assert "wrong" not in executor.loras.names() and {"a", "b", "c"} <= set(executor.loras.names())
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'"):
        executor.loras.check("nope")


def test_the_lru_evicts_under_its_cap_and_an_evicted_adapter_is_right_when_used_again(lora_dir):
    runtime = load_runtime("tiny", devices=["cpu:0"], replica_per_device=True)
    adapter_bytes = 19 * 2 * 4 * 64 * 4  # 19 layers x (A [4, 64] + B [64, 4]) in float32
    loras = LoraDevices(runtime, ["cpu:0"], lora_dir, cache_bytes=int(2.5 * adapter_bytes))
    with Executor(runtime, loras=loras) as ex:
        first_a = run(ex, "a1", (LoraRef("a", 1.0),), [((0,), STEPS)])
        run(ex, "b1", (LoraRef("b", 1.0),), [((0,), STEPS)])
        run(ex, "c1", (LoraRef("c", 1.0),), [((0,), STEPS)])  # a, b, c do not fit: a (least recent) goes
        device = loras.devices[0]
        assert list(device.loaded) == ["b", "c"] and device.evictions == 1
        assert device.loaded_bytes <= device.cache_bytes
        again_a = run(ex, "a2", (LoraRef("a", 1.0),), [((0,), STEPS)])
        assert device.loads == 4 and list(device.loaded) == ["c", "a"]  # read again; b went this time
        assert torch.equal(again_a, first_a)


def test_a_set_larger_than_the_cache_fails_its_request_alone(lora_dir):
    runtime = load_runtime("tiny", devices=["cpu:0"], replica_per_device=True)
    with Executor(runtime, loras=LoraDevices(runtime, ["cpu:0"], lora_dir, cache_bytes=1000)) as ex:
        ex.submit_encode("big", GenerationRequest("p", 64, 64, num_inference_steps=1, seed=1,
                                                  lora=(LoraRef("a", 1.0),))).result()
        result = ex.submit_steps(["big"], (0,), 1).result()
        assert "more than the" in result["big"].error and "--lora-cache-mb" in result["big"].error
        base = run(ex, "after", None, [((0,), 1)])  # the device still works, with its original weights
        assert torch.isfinite(base).all()


def test_lora_needs_a_replica_per_device():
    runtime = load_runtime("tiny", devices=["cpu:0", "cpu:1"])  # CPU devices share one model
    with pytest.raises(ValueError, match="replica per device"):
        LoraDevices(runtime, ["cpu:0", "cpu:1"], ".", cache_bytes=1 << 20)


@pytest.mark.gpu
def test_cuda_graphs_replay_the_fused_weights(lora_dir):
    """A CUDA graph captured with one adapter set replays with the weights of the next (fused in place)."""
    ex = Executor.load("tiny", ["cuda:0"], lora_dir=lora_dir, cuda_graphs=True, dtype="fp32")
    try:
        eager_ex = Executor.load("tiny", ["cuda:0"], lora_dir=lora_dir, cuda_graphs=False, dtype="fp32")
        try:
            want = {name: run(eager_ex, f"e-{name}", None if name == "base" else (LoraRef(name, 1.0),),
                              [((0,), STEPS)]) for name in ("base", "a", "b")}
        finally:
            eager_ex.shutdown()
        for i, name in enumerate(("a", "base", "b", "a")):
            got = run(ex, f"g{i}", None if name == "base" else (LoraRef(name, 1.0),), [((0,), STEPS)])
            torch.testing.assert_close(got, want[name], atol=1e-4, rtol=1e-4)
        assert ex.graph_stats()["replays"] > 0
    finally:
        ex.shutdown()


@needs_cpu_fp8
def test_float8_layers_take_the_adapter_and_give_their_weights_back(lora_dir):
    """With dtype fp8 the fused weight is quantized again; the plain model comes back bit for bit."""
    ex = Executor.load("tiny", ["cpu:0"], lora_dir=lora_dir, dtype="fp8")
    try:
        assert ex.runtime.fp8_linears > 0
        base = run(ex, "f-base", None, [((0,), STEPS)])
        with_a = run(ex, "f-a", (LoraRef("a", 1.0),), [((0,), STEPS)])
        assert (with_a - base).abs().max() > 0.1
        assert torch.equal(run(ex, "f-base-again", None, [((0,), STEPS)]), base)
    finally:
        ex.shutdown()


@pytest.mark.multi_gpu
def test_cuda_graphs_with_adapters_across_degree_changes_equal_eager(lora_dir):
    """Two GPUs: an adapter set fused on both, graphs captured per group and degree, the request moving from one
    GPU to both and back, equals the eager run; so does a plain request after it (the originals came back)."""
    schedules = [(LoraRef("a", 0.8), [((0,), 1), ((0, 1), 1), ((1,), 1)]), (LoraRef("a", 0.8), [((0, 1), STEPS)]),
                 (None, [((1,), STEPS)])]
    latents = {}
    for graphs in (False, True):
        ex = Executor.load("tiny", ["cuda:0", "cuda:1"], lora_dir=lora_dir, cuda_graphs=graphs, dtype="fp32")
        try:
            latents[graphs] = [run(ex, f"m{graphs}{i}", (ref,) if ref else None, groups)
                               for i, (ref, groups) in enumerate(schedules)]
            assert not graphs or ex.graph_stats()["replays"] > 0
        finally:
            ex.shutdown()
    for eager, graphed in zip(latents[False], latents[True]):
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(latents[True][1], latents[True][0], atol=1e-4, rtol=1e-4)  # degree 2 = moving
