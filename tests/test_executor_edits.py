"""Image edits (img2img, inpainting) on the executor: the same latents as diffusers' FluxImg2ImgPipeline and
FluxInpaintPipeline, the mask respected in latent space, and the same image at any degree, through degree
changes, in a batch with a text-to-image request, and with either step loop. Tiny model, 4 CPU devices."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from tetri_engine import ops
from tetri_engine.executor import Executor
from tetri_engine.executor.options import StepOptions
from tetri_engine.model import load_runtime
from tetri_engine.request import GenerationRequest, edit_steps

DEVICES = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
WIDTH, HEIGHT, STEPS = 96, 64, 10
_ids = itertools.count()


@pytest.fixture(scope="module")
def runtime():
    return load_runtime("tiny", DEVICES)


@pytest.fixture(scope="module")
def ex(runtime):
    executor = Executor(runtime, DEVICES, ops.CommCache(timeout_s=30.0))
    yield executor
    executor.shutdown()


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """A smooth picture (a VAE encodes it to something far from noise), uint8 [H, W, 3]."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) % 256], axis=-1)
    return rgb.astype(np.uint8)


def left_half() -> np.ndarray:
    edit = np.zeros((HEIGHT, WIDTH), dtype=bool)
    edit[:, :WIDTH // 2] = True
    return edit


def run(ex, schedule, picture, mask=None, strength=0.6, seed=3, prompt="a boat"):
    """Encode an edit, run `schedule` [(device indices, steps), ...]; -> (latent, prepared, request id)."""
    rid = f"e{next(_ids)}"
    ex.submit_encode(rid, GenerationRequest(prompt=prompt, width=WIDTH, height=HEIGHT, seed=seed,
                                            num_inference_steps=STEPS, image=picture, mask=mask,
                                            strength=strength)).result()
    for devices, n in schedule:
        result = ex.submit_steps([rid], devices, n).result()
        assert result[rid].error is None, result[rid].error
    return ex.latent(rid), ex.prepared(rid), rid


def test_strength_sets_the_steps_that_run(ex, picture):
    for strength, expected in ((1.0, 10), (0.6, 6), (0.25, 3), (0.05, 1)):
        _, prepared, rid = run(ex, [], picture, strength=strength)
        assert prepared.num_steps == expected == edit_steps(STEPS, strength)
        assert ex.progress(rid).num_steps == expected
        ex.release(rid)
    assert edit_steps(28, 0.6) == 17  # diffusers' get_timesteps: t_start = int(28 - 16.8) = 11


def test_inpainting_keeps_the_unmasked_latents_of_the_input(ex, picture):
    latent, prepared, rid = run(ex, [((0,), 6)], picture, mask=left_half())
    assert ex.progress(rid).step == 6
    edit = prepared.edit
    kept, edited = edit.mask == 0, edit.mask == 1
    assert kept.any() and edited.any()
    # After the last step (sigma 0) the kept tokens are the input's latents themselves.
    torch.testing.assert_close(latent[kept], edit.image_latents[kept], rtol=0, atol=0)
    assert (latent[edited] - edit.image_latents[edited]).abs().mean() > 0.1
    # The mask follows the image: its left half is the first half of each token row (2x2 patches).
    tokens = edit.mask[0, :, 0].view(HEIGHT // 16, WIDTH // 16)
    assert tokens[:, :WIDTH // 32].eq(1).all() and tokens[:, WIDTH // 32:].eq(0).all()
    ex.release(rid)


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpaint"])
def test_edits_match_diffusers_pipelines(runtime, ex, picture, masked, monkeypatch):
    """Our latents after every step equal diffusers' FluxImg2ImgPipeline / FluxInpaintPipeline's (output_type
    "latent") on the same components, the VAE's posterior mean taken as we take it."""
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline
    from diffusers.pipelines.flux import pipeline_flux_img2img, pipeline_flux_inpaint

    def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    for module in (pipeline_flux_img2img, pipeline_flux_inpaint):
        monkeypatch.setattr(module, "retrieve_latents", posterior_mean)
    mask = left_half() if masked else None
    ours, _, rid = run(ex, [((0,), 6)], picture, mask=mask, seed=11)
    ex.release(rid)
    kwargs = dict(prompt="a boat", image=Image.fromarray(picture), height=HEIGHT, width=WIDTH, strength=0.6,
                  num_inference_steps=STEPS, guidance_scale=runtime.default_guidance, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(11), max_sequence_length=runtime.adapter.text_tokens)
    if masked:
        pipe = FluxInpaintPipeline(**runtime.pipeline.components)
        kwargs["mask_image"] = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    else:
        pipe = FluxImg2ImgPipeline(**runtime.pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = pipe(**kwargs).images
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_inpainting_is_the_same_at_any_degree_and_through_degree_changes(ex, picture):
    one, _, a = run(ex, [((0,), 6)], picture, mask=left_half())
    two, _, b = run(ex, [((0, 1), 6)], picture, mask=left_half())
    moving, _, c = run(ex, [((0,), 2), ((2, 3), 2), ((0, 1, 2, 3), 1), ((1,), 1)], picture, mask=left_half())
    torch.testing.assert_close(two, one)
    torch.testing.assert_close(moving, one)
    assert ex.progress(c).steps_at_degree == {1: 3, 2: 2, 4: 1}
    for rid in (a, b, c):
        ex.release(rid)


def test_an_edit_batches_with_a_text_to_image_request(ex, picture):
    alone, _, a = run(ex, [((0, 1), 6)], picture, mask=left_half())
    edit_id, plain_id = f"e{next(_ids)}", f"e{next(_ids)}"
    ex.submit_encode(edit_id, GenerationRequest(prompt="a boat", width=WIDTH, height=HEIGHT, seed=3,
                                                num_inference_steps=STEPS, image=picture, mask=left_half(),
                                                strength=0.6)).result()
    ex.submit_encode(plain_id, GenerationRequest(prompt="a car", width=WIDTH, height=HEIGHT, seed=4,
                                                 num_inference_steps=6)).result()
    result = ex.submit_steps([edit_id, plain_id], (0, 1), 6).result()
    assert result.errors == {} and result[edit_id].finished and result[plain_id].finished
    torch.testing.assert_close(ex.latent(edit_id), alone)
    for rid in (a, edit_id, plain_id):
        ex.release(rid)


def test_python_and_native_step_loops_inpaint_alike(runtime, ex, picture):
    native, _, a = run(ex, [((0, 1), 6)], picture, mask=left_half())
    ex.release(a)
    python_loop = Executor(runtime, DEVICES, ops.CommCache(timeout_s=30.0), step_options=StepOptions(loop="python"))
    try:
        python, _, b = run(python_loop, [((0, 1), 6)], picture, mask=left_half())
    finally:
        python_loop.shutdown()
    torch.testing.assert_close(python, native, rtol=0, atol=0)


def test_a_bad_edit_fails_its_encode_with_a_value_error(ex, picture):
    bad = [dict(image=picture[:, :, 0]), dict(image=picture, mask=left_half()[:32]),
           dict(image=picture, strength=0.0), dict(image=picture, strength=1.5)]
    for fields in bad:
        future = ex.submit_encode(f"e{next(_ids)}", GenerationRequest(prompt="x", width=WIDTH, height=HEIGHT,
                                                                     num_inference_steps=STEPS, **fields))
        with pytest.raises(ValueError):
            future.result()


# --- the blend inside a CUDA graph's step ----------------------------------------------------------------


@pytest.mark.parametrize("degree", [1, 2])
def test_the_captured_step_inpaints_as_the_eager_step(runtime, ex, picture, degree):
    """What a CUDA graph captures (`Graph.step`: the forward, the Euler update, the inpaint blend with the
    sigma read at the step index held as data, on static buffers) run eagerly on CPU ranks: the executor's
    eager steps bit for bit, across a reload of the buffers (`Graph.begin`) between two batches of steps."""
    import rank_threads

    from tetri_engine.executor.cuda_graphs import Graph, _StaticRequest
    from tetri_engine.model import SPContext
    from tetri_engine.model.ulysses import valid_tokens

    reference, _, a = run(ex, [(tuple(range(degree)), 6)], picture, mask=left_half())
    _, prepared, b = run(ex, [], picture, mask=left_half())
    devices = DEVICES[:degree]
    comm = ops.CommCache().get(tuple(devices)) if degree > 1 else None
    shards = ops.shard(prepared.noise, degree, devices)
    lengths = {"image": prepared.image_tokens, "text": prepared.text_tokens}

    def rank(r):
        device = torch.device("cpu")
        inputs = runtime.adapter.rank_inputs([prepared], device, r, degree)
        static = _StaticRequest(prepared, device, (r, degree))
        assert static.kept is not None
        graph = Graph(None, device, [shards[r].clone()], [static], {k: v.clone() for k, v in inputs.items()},
                      valid_tokens(prepared.image_tokens, degree, r))
        context, transformer = SPContext(comm, r, degree, lengths), runtime.transformer_on(device)
        graph.begin([shards[r]], [prepared], [0], inputs)
        for _ in range(4):
            graph.step(runtime.adapter, transformer, context)
        after_4 = graph.end()[0]
        graph.begin([after_4], [prepared], [4], inputs)
        for _ in range(2):
            graph.step(runtime.adapter, transformer, context)
        return graph.end()[0]

    out = rank_threads.run_ranks(rank, range(degree))
    torch.testing.assert_close(ops.gather(out, prepared.image_tokens), reference, rtol=0, atol=0)
    for rid in (a, b):
        ex.release(rid)


def graphs_and_eager(devices, schedule):
    """An inpainting request and a text-to-image one, batched, on GPUs with and without CUDA graphs."""
    gpu_runtime = load_runtime("tiny", devices, dtype="fp32")
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([x * 2, y * 3, x + y], -1).astype(np.uint8)
    results = {}
    for graphs in (False, True):
        with Executor(gpu_runtime, devices, ops.CommCache(), cuda_graphs=graphs) as gpu_ex:
            gpu_ex.submit_encode("edit", GenerationRequest(prompt="a boat", width=WIDTH, height=HEIGHT, seed=3,
                                                           num_inference_steps=STEPS, image=image, mask=left_half(),
                                                           strength=0.6)).result()
            gpu_ex.submit_encode("plain", GenerationRequest(prompt="a car", width=WIDTH, height=HEIGHT, seed=4,
                                                            num_inference_steps=6)).result()
            for group, steps in schedule:
                assert gpu_ex.submit_steps(["edit", "plain"], group, steps).result().errors == {}
            results[graphs] = ({rid: gpu_ex.latent(rid) for rid in ("edit", "plain")}, gpu_ex.graph_stats(),
                               gpu_ex.prepared("edit"))
    (eager, _, prepared), (graphed, stats, _) = results[False], results[True]
    assert stats["failures"] == [] and stats["captures"] >= 1 and stats["native_launches"] >= 1, stats
    for rid in ("edit", "plain"):
        torch.testing.assert_close(graphed[rid], eager[rid], rtol=0, atol=1e-4 * max(1.0, eager[rid].abs().max()))
    kept = prepared.edit.mask == 0
    torch.testing.assert_close(graphed["edit"][kept], prepared.edit.image_latents[kept], rtol=0, atol=0)


@pytest.mark.gpu
def test_inpainting_in_cuda_graphs_equals_eager_on_one_gpu():
    graphs_and_eager(["cuda:0"], [((0,), 3), ((0,), 3)])


@pytest.mark.multi_gpu
def test_inpainting_in_cuda_graphs_through_degree_changes():
    graphs_and_eager(["cuda:0", "cuda:1"], [((0,), 2), ((0, 1), 2), ((1,), 2)])


def test_sd3_inpainting_at_degree_1_2_and_cfg_parallel(picture):
    """SD3 (true classifier-free guidance: two rows per request) inpaints alike at degree 1, degree 2 and
    in the CFG-parallel layout (2 branches x 2 ranks), its kept latents the input's."""
    sd3 = load_runtime("tiny-sd3", DEVICES)
    with Executor(sd3, DEVICES, ops.CommCache(timeout_s=30.0)) as sd3_ex:
        def inpaint(devices, cfg=1):
            rid = f"e{next(_ids)}"
            sd3_ex.submit_encode(rid, GenerationRequest(prompt="a boat", width=WIDTH, height=HEIGHT, seed=3,
                                                        num_inference_steps=STEPS, image=picture,
                                                        mask=left_half())).result()
            result = sd3_ex.submit_steps([rid], devices, 6, cfg=cfg).result()
            assert result[rid].error is None and result[rid].finished, result[rid].error
            return sd3_ex.latent(rid), sd3_ex.prepared(rid)

        one, prepared = inpaint((0,))
        assert prepared.rows == 2
        torch.testing.assert_close(inpaint((0, 1))[0], one)
        torch.testing.assert_close(inpaint((0, 1, 2, 3), cfg=2)[0], one)
        kept = prepared.edit.mask == 0
        torch.testing.assert_close(one[kept], prepared.edit.image_latents[kept], rtol=0, atol=0)
