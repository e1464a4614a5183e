"""The images API end to end: one app (real engine, tiny model, 4 CPU devices) for the module.

Covers every endpoint, the 4xx answers, SSE read to completion and dropped mid-way, a request
abandoned by its client, /metrics through prometheus_client's parser, and the official `openai`
client (sync, in a thread) against the live loopback server.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from test_server_support import CPU_DEVICES, ServingTestServer, parse_sse, png_size, small_config, wait_until_idle
from tetri_engine.server import create_app, wait_until_ready

pytestmark = pytest.mark.asyncio(loop_scope="module")

GEN = "/v1/images/generations"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client():
    app = create_app(small_config())
    # Served as `tetri-engine serve` serves it (connection.make_runner: handler_cancellation, bounds).
    async with TestClient(ServingTestServer(app, host="127.0.0.1")) as test_client:
        await wait_until_ready(app)
        yield test_client


async def error_of(resp, status: int) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_models_and_health(client):
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["tiny"] and body["object"] == "list"
    assert (await client.get("/v1/models/tiny")).status == 200
    assert (await error_of(await client.get("/v1/models/flux-dev"), 404))["code"] == "model_not_found"
    health = await wait_until_idle(client)
    assert health["devices"] == CPU_DEVICES and health["busy_devices"] == []


async def test_generation_returns_a_png_and_per_request_metrics(client):
    resp = await client.post(GEN, json={"prompt": "a red fox", "size": "64x64",
                                        "num_inference_steps": 2, "seed": 5})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert isinstance(body["created"], int) and body["size"] == "64x64"
    [image] = body["data"]
    assert png_size(base64.b64decode(image["b64_json"])) == (64, 64)
    [metrics] = body["metrics"]
    assert metrics["seed"] == 5 and metrics["state"] == "completed"
    assert metrics["request_id"] == resp.headers["X-Request-Id"]
    assert sum(metrics["steps_at_degree"].values()) == 2
    assert set(metrics["steps_at_degree"]) <= {"1", "2", "4"}
    for key in ("queue_s", "encode_s", "denoise_s", "decode_s", "total_s"):
        assert metrics[key] >= 0
    assert isinstance(metrics["deadline_met"], bool)


def pixels(b64_json: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_json))), dtype=np.int16)


async def test_n_images_run_with_consecutive_seeds(client):
    body = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2}
    resp = await client.post(GEN, json={**body, "n": 2, "seed": 10})
    assert resp.status == 200, await resp.text()
    both = await resp.json()
    assert [m["seed"] for m in both["metrics"]] == [10, 11]
    ids = [m["request_id"] for m in both["metrics"]]
    assert ids == [f"{resp.headers['X-Request-Id']}-{i}" for i in range(2)]
    # The second image is the one seed 11 gives on its own (whatever degrees each ran at).
    single = await (await client.post(GEN, json={**body, "seed": 11})).json()
    difference = np.abs(pixels(both["data"][1]["b64_json"]) - pixels(single["data"][0]["b64_json"]))
    assert difference.max() <= 2
    assert np.abs(pixels(both["data"][0]["b64_json"]) - pixels(single["data"][0]["b64_json"])).max() > 2


@pytest.mark.parametrize("payload, param", [
    ({"size": "64x64"}, "prompt"),
    ({"prompt": "x", "size": "100x100"}, "size"),
    ({"prompt": "x", "size": "512x512"}, "size"),  # the test server accepts 256x256 at most
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 21}, "num_inference_steps"),
    ({"prompt": "x", "model": "flux-dev"}, "model"),
    ({"prompt": "x", "n": 4}, "n"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
])
async def test_bad_input_is_a_400_naming_the_parameter(client, payload, param):
    error = await error_of(await client.post(GEN, json=payload), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_malformed_json_and_wrong_routes(client):
    resp = await client.post(GEN, data=b'{"prompt": "x"', headers={"Content-Type": "application/json"})
    assert (await error_of(resp, 400))["code"] == "invalid_json"
    assert (await error_of(await client.get(GEN), 405))["code"] == "method_not_allowed"
    assert (await error_of(await client.get("/v2/nothing"), 404))["code"] == "not_found"


async def test_oversized_body_is_a_413(client):
    resp = await client.post(GEN, json={"prompt": "x" * (100 * 1024)})
    assert (await error_of(resp, 413))["code"] == "request_too_large"


async def test_impossible_deadline_is_a_400_that_says_the_fastest_time(client):
    # Not 429: the official client retries 429 (and 408, 409, 5xx), and this can never succeed.
    resp = await client.post(GEN, json={"prompt": "x", "size": "256x256",
                                        "num_inference_steps": 20, "deadline_ms": 1})
    error = await error_of(resp, 400)
    assert error["code"] == "deadline_impossible" and error["param"] == "deadline_ms"
    assert "takes at least" in error["message"] and "Retry-After" not in resp.headers


async def test_stream_read_to_completion(client):
    resp = await client.post(GEN, json={"prompt": "a red fox", "size": "256x256", "stream": True,
                                        "num_inference_steps": 10, "preview_every": 1})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    frames = parse_sse(await resp.text())
    kinds = [event for event, _ in frames]
    assert kinds[0] == "tetri.queued" and kinds[-1] == "image_generation.completed"
    assert all(event == data["type"] for event, data in frames)
    assert frames[0][1]["queue_position"] >= 0
    rounds = [data for event, data in frames if event == "tetri.round"]
    assert rounds and all(r["degree"] == len(r["devices"]) and r["degree"] in (1, 2, 4)
                          for r in rounds)
    steps = [data["step"] for event, data in frames if event == "tetri.step"]
    assert steps == list(range(1, 11))
    # A preview at every round boundary before the last (the latent is whole only between rounds).
    partials = [data for event, data in frames if event == "image_generation.partial_image"]
    assert [p["partial_image_index"] for p in partials] == list(range(len(rounds) - 1))
    for p in partials:
        assert png_size(base64.b64decode(p["b64_json"])) == (32, 32)  # latent-sized: 256 / 8
    completed = frames[-1][1]
    assert png_size(base64.b64decode(completed["b64_json"])) == (256, 256)
    assert completed["usage"]["output_tokens"] == 256
    assert completed["metrics"]["state"] == "completed"
    assert sum(completed["metrics"]["steps_at_degree"].values()) == 10


async def test_stream_without_progress_events_has_only_openai_event_types(client):
    resp = await client.post(GEN, json={"prompt": "a red fox", "size": "64x64", "stream": True,
                                        "num_inference_steps": 2, "progress_events": False})
    frames = parse_sse(await resp.text())
    assert [event for event, _ in frames] == ["image_generation.completed"]


async def cancelled_count(client) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tetri_requests_total" and sample.labels == {"state": "cancelled"}:
                return sample.value
    raise AssertionError("no tetri_requests_total{state=cancelled} in /metrics")


async def test_stream_dropped_midway_aborts_and_frees_the_devices(client):
    await wait_until_idle(client)
    before = await cancelled_count(client)
    resp = await client.post(GEN, json={"prompt": "slow", "size": "256x256", "stream": True,
                                        "num_inference_steps": 20, "slo_scale": 100})
    assert resp.status == 200
    buffer = ""
    while "event: tetri.step" not in buffer:  # wait until it is really running
        chunk = await resp.content.readany()
        assert chunk, "stream ended before the first step"
        buffer += chunk.decode()
    resp.close()  # drop the connection mid-way
    health = await wait_until_idle(client)
    assert health["busy_devices"] == []
    assert await cancelled_count(client) == before + 1
    assert "image_generation.completed" not in buffer


async def test_client_gone_before_the_answer_aborts_the_request(client):
    await wait_until_idle(client)
    before = await cancelled_count(client)
    request = asyncio.create_task(client.post(GEN, json={
        "prompt": "slow", "size": "256x256", "num_inference_steps": 20, "slo_scale": 100}))
    for _ in range(400):  # until the engine has it
        health = await (await client.get("/health")).json()
        if health["running"] + health["queue_depth"] > 0:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the request never reached the engine")
    request.cancel()  # closes the connection
    with pytest.raises(asyncio.CancelledError):
        await request
    health = await wait_until_idle(client)
    assert health["busy_devices"] == []
    assert await cancelled_count(client) == before + 1


async def test_metrics_parse_with_prometheus_client(client):
    from prometheus_client.parser import text_string_to_metric_families

    assert (await client.post(GEN, json={"size": "64x64"})).status == 400
    resp = await client.post(GEN, json={"prompt": "x", "size": "64x64", "num_inference_steps": 2})
    assert resp.status == 200
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in families.values() for s in f.samples}
    assert values[("tetri_requests_total", (("state", "completed"),))] >= 1
    assert values[("tetri_engine_ready", ())] == 1
    assert {dict(labels)["device"] for name, labels in values
            if name == "tetri_device_busy_fraction"} == set(CPU_DEVICES)
    assert families["tetri_step_latency_seconds"].type == "histogram"
    assert values[("tetri_step_latency_seconds_count", ())] >= 1
    assert values[("tetri_round_latency_seconds_count", ())] >= 1
    assert values[("tetri_http_responses_total",
                   (("route", "/v1/images/generations"), ("status", "400")))] >= 1
    for name in ("tetri_regroups_total", "tetri_comm_cache_hits_total",
                 "tetri_comm_cache_misses_total", "tetri_slo_attainment_ratio", "tetri_queue_depth"):
        assert (name, ()) in values


async def test_the_openai_client_works_unchanged(client):
    import openai

    base_url = str(client.make_url("/v1"))

    def use_the_openai_client():
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        image = api.images.generate(model="tiny", prompt="a red fox", size="64x64",
                                    extra_body={"num_inference_steps": 2, "seed": 1})
        events = list(api.images.generate(model="tiny", prompt="a red fox", size="64x64",
                                          stream=True, extra_body={"num_inference_steps": 2}))
        with pytest.raises(openai.BadRequestError) as bad:
            api.images.generate(model="tiny", prompt="x", size="100x100")
        return image, events, bad.value

    image, events, bad = await asyncio.to_thread(use_the_openai_client)
    assert png_size(base64.b64decode(image.data[0].b64_json)) == (64, 64)
    assert image.usage.output_tokens == 16
    assert image.model_extra["metrics"][0]["seed"] == 1
    # Our progress events reach the client too (as extra event types it passes through).
    assert events[0].type == "tetri.queued" and events[-1].type == "image_generation.completed"
    assert png_size(base64.b64decode(events[-1].b64_json)) == (64, 64)
    assert bad.status_code == 400 and "multiples of 16" in bad.message
    json.dumps(bad.body)  # the error envelope came through as JSON


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_logs_say_why_a_request_ended_badly_and_never_carry_the_prompt(client, caplog):
    caplog.set_level(logging.INFO)
    # diffusers and transformers log through their own handlers (caplog does not see them): listen there too.
    libraries = ListHandler()
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).addHandler(libraries)
    secret = "SECRET-PROMPT-TEXT " * 1500  # 28 500 characters: far beyond what the encoders read
    ok = await client.post(GEN, json={"prompt": secret, "size": "64x64", "num_inference_steps": 2})
    assert ok.status == 200 and (await ok.json())["data"]
    caplog.clear()
    bad = await client.post(GEN, json={"prompt": secret, "size": "²x64"})
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "size"
    lines = [r.getMessage() for r in caplog.records if r.name == "tetri_engine.server"]
    assert len(lines) == 1 and "400 invalid_value (param size)" in lines[0], lines
    # A client that leaves: one line saying so.
    caplog.clear()
    request = asyncio.create_task(client.post(GEN, json={
        "prompt": secret, "size": "256x256", "num_inference_steps": 20, "slo_scale": 100}))
    for _ in range(400):
        health = await (await client.get("/health")).json()
        if health["running"] + health["queue_depth"] > 0:
            break
        await asyncio.sleep(0.05)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await wait_until_idle(client)
    for _ in range(200):  # the handler ends once its request has (bounded polls)
        lines = [r.getMessage() for r in caplog.records if r.name == "tetri_engine.server"]
        if lines:
            break
        await asyncio.sleep(0.05)
    assert len(lines) == 1 and "went away" in lines[0], lines
    # The prompt reached no log line, and nothing printed it (the pipelines' truncation warnings).
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).removeHandler(libraries)
    assert "SECRET" not in caplog.text
    assert not [message for message in libraries.messages if "SECRET" in message]


async def test_a_request_given_up_streams_tetri_late_and_reports_it():
    """admission=best_effort takes a deadline no schedule can meet; the scheduler gives it up at once
    and the stream says so before its steps, with `late` in its metrics."""
    app = create_app(small_config(admission="best_effort"))
    async with TestClient(ServingTestServer(app, host="127.0.0.1")) as late_client:
        await wait_until_ready(app)
        resp = await late_client.post(GEN, json={"prompt": "hurry", "size": "64x64", "stream": True,
                                                 "num_inference_steps": 4, "deadline_ms": 1})
        assert resp.status == 200, await resp.text()
        frames = parse_sse(await resp.text())
        kinds = [event for event, _ in frames]
        assert kinds.count("tetri.late") == 1 and kinds.index("tetri.late") < kinds.index("tetri.step")
        assert kinds[-1] == "image_generation.completed"
        metrics = frames[-1][1]["metrics"]
        assert metrics["late"] is True and metrics["deadline_met"] is False
