"""Request validation, response shapes and metrics text of the server, without an engine.

The response and event bodies are checked with the `openai` package's own models, which is what a
client written for OpenAI parses them with.
"""
from __future__ import annotations

import argparse
import base64
import json
from collections import Counter

import pytest

from tetri_engine.config import EngineConfig
from tetri_engine.request import GenerationOutput, RequestMetrics, RequestState
from tetri_engine.server import metrics as prom
from tetri_engine.server import protocol
from tetri_engine.server.config import ServerConfig
from tetri_engine.server.protocol import APIError, Limits, parse_generation_request

LIMITS = Limits(model_name="tiny", size_rule=EngineConfig(max_width=512, max_height=512).size_rule(),
                max_steps=50, max_n=3, default_size="128x128")
PNG = b"\x89PNG\r\n\x1a\nnot-really"


def parse(**body):
    return parse_generation_request(body, LIMITS)


def rejected(body) -> APIError:
    with pytest.raises(APIError) as info:
        parse_generation_request(body, LIMITS)
    assert info.value.status == 400
    return info.value


def test_minimal_request_takes_defaults():
    params = parse(prompt="a cat")
    assert (params.n, params.width, params.height, params.stream) == (1, 128, 128, False)
    assert parse(prompt="a cat", size="auto").size == "128x128"


def test_openai_client_fields_are_accepted():
    params = parse(prompt="a cat", model="tiny", n=2, size="256x64", response_format="b64_json",
                   output_format="png", user="u1", quality="auto", background="opaque",
                   moderation="auto")
    assert (params.n, params.width, params.height, params.user) == (2, 256, 64, "u1")


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "size": "100x100"}, "size"),       # not a multiple of 16
    ({"prompt": "x", "size": "1024x1024"}, "size"),     # beyond the configured max
    ({"prompt": "x", "size": "large"}, "size"),
    ({"prompt": "x", "size": "0x64"}, "size"),
    ({"prompt": "x", "n": 4}, "n"),                     # max_n is 3
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 51}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "output_format": "jpeg"}, "output_format"),
    ({"prompt": "x", "background": "transparent"}, "background"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "deadline_ms": 0}, "deadline_ms"),
    ({"prompt": "x", "deadline_ms": 100, "slo_scale": 1.2}, "slo_scale"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "progress_events": 1}, "progress_events"),
    ({"prompt": "x", "stream": True, "n": 2}, "n"),
    ({"prompt": "x", "partial_images": 4}, "partial_images"),
    ({"prompt": "x", "num_steps": 4}, "num_steps"),     # a typo of an extension is not ignored
    ({"prompt": "x", "cache": "on"}, "cache"),
    ({"prompt": "x", "cache": True}, "cache"),
    ({"prompt": "x", "cache": ""}, "cache"),
    # Digits str.isdigit() takes and int() does not, or numbers too long to mean a size (issue 15).
    ({"prompt": "x", "size": "²x64"}, "size"),
    ({"prompt": "x", "size": "64x²"}, "size"),
    ({"prompt": "x", "size": "٦٤x٦٤"}, "size"),
    ({"prompt": "x", "size": "1" * 5000 + "x64"}, "size"),
    ({"prompt": "x", "size": "64x64x64"}, "size"),
    ({"prompt": "a \ud800 b"}, "prompt"),
    ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt"),
    ({"prompt": "x", "user": "\ud800"}, "user"),
    ({"prompt": "x" * 32_001}, "prompt"),
    ({"prompt": "x", "negative_prompt": "x" * 32_001}, "negative_prompt"),
    ({"prompt": "x", "guidance_scale": 1e308}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 10**400}, "guidance_scale"),
    ({"prompt": "x", "deadline_ms": 10**400}, "deadline_ms"),
    ({"prompt": "x", "deadline_ms": True}, "deadline_ms"),
    ({"prompt": "x", "slo_scale": 1e308}, "slo_scale"),
    # The OpenAI fields that change nothing here take only what OpenAI takes.
    ({"prompt": "x", "quality": 5}, "quality"),
    ({"prompt": "x", "quality": "ultra"}, "quality"),
    ({"prompt": "x", "style": ["vivid"]}, "style"),
    ({"prompt": "x", "moderation": True}, "moderation"),
    ({"prompt": "x", "safety_identifier": {"id": 1}}, "safety_identifier"),
    ({"prompt": "x", "output_compression": 101}, "output_compression"),
    ({"prompt": "x", "output_compression": "high"}, "output_compression"),
    ({"prompt": "x", "priority": 1}, "priority"),  # removed from the API: unknown
])
def test_bad_input_names_the_parameter(body, param):
    error = rejected(body)
    assert error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error"
    json.dumps(error.body())  # always serialisable
    assert len(error.message) < 400  # client values are quoted capped


def test_valid_values_of_the_ignored_openai_fields_are_accepted():
    params = parse(prompt="a cat", quality="hd", style="natural", moderation="low", safety_identifier="u-7",
                   output_compression=0, size=" 64 X 128 ")
    assert params.size == "64x128"


def test_client_values_are_quoted_back_capped_and_ascii():
    assert protocol.shown("64x64") == "'64x64'"
    long = protocol.shown("9" * 5000)
    assert len(long) <= protocol.MAX_SHOWN_CHARS and long.endswith("chars)")
    assert protocol.shown("a\ud800\x00") == "'a\\ud800\\x00'"


def test_every_engine_refusal_has_its_http_answer():
    from tetri_engine.errors import RejectionReason, RequestRejected

    assert set(protocol.REJECTIONS) == set(RejectionReason)  # a new reason needs a row
    queue_full = protocol.rejection_error(RequestRejected("queue full", RejectionReason.QUEUE_FULL, 2.2))
    assert (queue_full.status, queue_full.headers["Retry-After"]) == (429, "3")  # the engine's estimate
    no_hint = protocol.rejection_error(RequestRejected("queue full", RejectionReason.QUEUE_FULL, None))
    assert "Retry-After" not in no_hint.headers
    impossible = protocol.rejection_error(
        RequestRejected("deadline 0.001 s cannot be met: takes at least 0.3 s", RejectionReason.DEADLINE_IMPOSSIBLE),
        "deadline_ms")
    # The official client retries 408, 409, 429 and 5xx: a request that can never succeed gets none.
    assert impossible.status == 400 and impossible.param == "deadline_ms" and not impossible.headers
    assert "at least 0.3 s" in impossible.message
    draining = protocol.rejection_error(RequestRejected("draining", RejectionReason.DRAINING))
    assert draining.status == 503


def test_url_format_explains_why():
    assert "does not host" in rejected({"prompt": "x", "response_format": "url"}).message


def test_body_must_be_a_json_object():
    assert rejected(["prompt"]).code == "invalid_json"
    with pytest.raises(APIError) as info:
        protocol.parse_json_body(b'{"prompt": ')
    assert info.value.code == "invalid_json"
    with pytest.raises(APIError):
        protocol.parse_json_body(b'{"prompt": "x", "guidance_scale": NaN}')
    with pytest.raises(APIError):
        protocol.parse_json_body(b"\xff\xfe")
    with pytest.raises(APIError) as info:
        protocol.parse_json_body(b"[" * 100_000 + b"]" * 100_000)
    assert info.value.code == "invalid_json"


def test_n_images_get_consecutive_seeds_and_distinct_ids():
    params = parse(prompt="a cat", n=3, seed=41, num_inference_steps=4, deadline_ms=2500)
    requests = params.to_requests(default_steps=10, request_id="img-x")
    assert [r.seed for r in requests] == [41, 42, 43]
    assert [r.request_id for r in requests] == ["img-x-0", "img-x-1", "img-x-2"]
    assert {r.deadline_s for r in requests} == {2.5}
    assert {r.num_inference_steps for r in requests} == {4}
    assert parse(prompt="a cat").to_requests(default_steps=10)[0].seed is None


def test_cache_extension_defaults_off_and_reaches_the_engine_request():
    assert parse(prompt="x").cache == "off"
    assert [r.cache for r in parse(prompt="x", n=2).to_requests(10)] == ["off", "off"]
    assert [r.cache for r in parse(prompt="x", n=2, cache="auto").to_requests(10)] == ["auto", "auto"]
    assert parse(prompt="x", cache="off").to_requests(10)[0].cache == "off"
    message = rejected({"prompt": "x", "cache": "fast"}).message
    assert "'off'" in message and "'auto'" in message and "'fast'" in message


def test_progress_events_are_on_unless_turned_off():
    assert parse(prompt="x", stream=True).progress_events is True
    assert parse(prompt="x", stream=True, progress_events=False).progress_events is False


def test_previews_only_on_streams():
    assert parse(prompt="x", partial_images=2).to_requests(12)[0].preview_every == 0
    # 2 previews over 12 steps: every 4 steps (at 4 and 8), before the final image at 12.
    assert parse(prompt="x", stream=True, partial_images=2).to_requests(12)[0].preview_every == 4
    assert parse(prompt="x", stream=True, preview_every=3).to_requests(12)[0].preview_every == 3
    assert parse(prompt="x", stream=True, partial_images=3,
                 num_inference_steps=2).to_requests(12)[0].preview_every == 1


def final_output(request_id="img-1", state=RequestState.COMPLETED):
    metrics = RequestMetrics(queue_s=0.1, encode_s=0.01, denoise_s=0.5, decode_s=0.02, total_s=0.63,
                             steps_at_degree={1: 2, 2: 2}, deadline_s=1.5, deadline_met=True)
    return GenerationOutput(request_id=request_id, kind="final", state=state, png=PNG, seed=7,
                            metrics=metrics, error=None if state == RequestState.COMPLETED else "boom")


def test_images_response_parses_with_the_openai_models():
    from openai.types import ImagesResponse

    params = parse(prompt="a red fox", n=2, size="64x64")
    body = protocol.images_response(params, [final_output("a"), final_output("b")], created=123)
    response = ImagesResponse.model_validate(json.loads(json.dumps(body)))
    assert response.created == 123
    assert [base64.b64decode(d.b64_json) for d in response.data] == [PNG, PNG]
    assert response.usage.output_tokens == 2 * 4 * 4
    assert response.size == "64x64"
    metrics = body["metrics"]
    assert [m["request_id"] for m in metrics] == ["a", "b"]
    assert metrics[0]["steps_at_degree"] == {"1": 2, "2": 2}
    assert metrics[0]["deadline_met"] is True and metrics[0]["seed"] == 7


def sse_frames(raw: bytes) -> list[tuple[str, dict]]:
    frames = []
    for block in raw.decode().strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        frames.append((fields["event"], json.loads(fields["data"])))
    return frames


def test_stream_events_parse_with_the_openai_models():
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    params = parse(prompt="a red fox", size="64x64", stream=True, partial_images=1)
    out = GenerationOutput(request_id="r", kind="preview", step=2, total_steps=4)
    [(event, data)] = sse_frames(protocol.partial_image_event(params, PNG, 0, out))
    partial = ImageGenPartialImageEvent.model_validate(data)
    assert event == partial.type == "image_generation.partial_image"
    assert partial.partial_image_index == 0 and base64.b64decode(partial.b64_json) == PNG

    [(event, data)] = sse_frames(protocol.completed_event(params, final_output()))
    completed = ImageGenCompletedEvent.model_validate(data)
    assert event == completed.type == "image_generation.completed"
    assert completed.size == "64x64" and completed.usage.output_tokens == 16
    assert data["metrics"]["deadline_met"] is True

    round_out = GenerationOutput(request_id="r", kind="round", degree=2, devices=("cpu:0", "cpu:1"),
                                 step=0, total_steps=4, layout={"cfg": 2, "sp": 1, "decode": 2})
    [(event, data)] = sse_frames(protocol.round_event(round_out))
    assert (event, data["degree"], data["devices"]) == ("tetri.round", 2, ["cpu:0", "cpu:1"])
    assert data["layout"] == {"cfg": 2, "sp": 1, "decode": 2}  # the group's parallel layout (issue 16)


def test_failed_final_is_a_server_error_and_cancel_while_draining_is_503():
    failed = protocol.final_error(final_output(state=RequestState.FAILED), draining=False)
    assert failed.status == 500 and "boom" in failed.message
    cancelled = protocol.final_error(final_output(state=RequestState.CANCELLED), draining=True)
    assert cancelled.status == 503


def test_server_config_maps_onto_engine_config_and_documents_every_flag():
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    config = ServerConfig.from_args(parser.parse_args(
        ["--devices", "cpu:0,cpu:1", "--max-queue", "3", "--port", "0", "--policy", "fixed2"]))
    engine_config = config.to_engine_config()
    assert engine_config.devices == ["cpu:0", "cpu:1"]
    assert (engine_config.max_queue, engine_config.policy) == (3, "fixed2")
    assert config.host == "127.0.0.1"
    help_text = parser.format_help()
    for flag in ("--host", "--port", "--model", "--devices", "--profile", "--max-queue", "--api-key",
                 "--max-n", "--max-body-bytes", "--drain-timeout-s", "--allowed-hosts", "--cors-origins",
                 "--max-connections", "--keepalive-timeout-s", "--header-timeout-s", "--body-timeout-s",
                 "--write-timeout-s"):
        assert flag in help_text
    config = ServerConfig.from_args(parser.parse_args(["--allowed-hosts", "gpu-box.lan,10.0.0.7",
                                                      "--cors-origins", "https://app.example"]))
    assert config.allowed_hosts == ["gpu-box.lan", "10.0.0.7"] and config.cors_origins == ["https://app.example"]


def test_connection_bounds_are_checked_and_the_cap_leaves_descriptors_for_the_rest(monkeypatch):
    import resource

    for flags, words in ((["--write-timeout-s", "0"], "write-timeout-s"), (["--header-timeout-s", "-1"], "header"),
                         (["--max-connections", "0"], "max-connections"),
                         (["--max-edit-bytes-in-flight", "1000"], "at least --max-edit-body-bytes")):
        parser = argparse.ArgumentParser()
        ServerConfig.add_arguments(parser)
        with pytest.raises(ValueError, match=words):
            ServerConfig.from_args(parser.parse_args(flags))
    assert ServerConfig(max_connections=7).resolved_max_connections == 7
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))  # `ulimit -n 256`
    assert ServerConfig().resolved_max_connections == 128  # 128 descriptors kept for the engine
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    assert ServerConfig().resolved_max_connections == 1024


def test_every_engine_option_is_a_serve_flag_and_bad_values_are_refused():
    import dataclasses

    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    help_text = parser.format_help()
    for f in dataclasses.fields(EngineConfig):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    config = ServerConfig.from_args(parser.parse_args(["--no-cuda-graphs", "--admission", "best_effort",
                                                      "--round-s", "0.5"]))
    assert config.engine.cuda_graphs is False and config.engine.round_s == 0.5
    assert config.engine.admission == "best_effort"
    assert ServerConfig.from_args(parser.parse_args([])).engine == EngineConfig()
    for flags, words in ((["--max-queue", "0"], "max_queue"), (["--round-s", "-1"], "round_s"),
                         (["--max-width", "32"], "max_width")):
        with pytest.raises(ValueError, match=words):
            ServerConfig.from_args(parser.parse_args(flags))
    with pytest.raises(ValueError, match="admission must be 'reject' or 'best_effort'"):
        EngineConfig(admission="maybe")


def test_a_config_the_server_cannot_serve_with_is_refused_before_anything_starts():
    from tetri_engine.server import create_app

    with pytest.raises(ValueError, match="default-size"):
        create_app(ServerConfig(default_size="100x100"))
    with pytest.raises(ValueError, match="default-size"):
        create_app(ServerConfig(default_size="4096x4096", engine=EngineConfig(max_width=2048)))
    # Without --default-size the default follows the limits down.
    assert ServerConfig(engine=EngineConfig(max_width=256, max_height=128)).resolved_default_size == "256x128"


def test_api_key_comes_from_the_environment_when_not_given(monkeypatch):
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    monkeypatch.setenv("TETRI_ENGINE_API_KEY", "sekrit")
    assert ServerConfig.from_args(parser.parse_args([])).api_key == "sekrit"
    assert ServerConfig.from_args(parser.parse_args(["--api-key", "k2"])).api_key == "k2"


def test_metrics_text_parses_and_histograms_are_cumulative():
    from prometheus_client.parser import text_string_to_metric_families

    latency = prom.LatencyHistograms()
    stats = {"queue_depth": 2, "running": 1, "states": {"completed": 5, "rejected": 1, "running": 1},
             "sar": 0.8, "deadline_met": 4, "deadline_total": 5,
             "device_busy_fraction": {"cpu:0": 0.5, "cpu:1": 0.25}, "regroups": 3, "rounds": 9,
             "comm_cache": {"created": 2, "hits": 7, "misses": 2, "evicted": 0, "creation_s": 0.01,
                            "size": 2},
             "step_latency_s": [0.002, 0.02, 3.0], "step_latency_count": 3,
             "step_latency_sum_s": 3.022,
             "round_latency_s": [0.1], "round_latency_count": 1, "round_latency_sum_s": 0.1}
    responses = Counter({("/v1/images/generations", 200): 5, ("/v1/images/generations", 429): 1})
    text = prom.render(stats, responses, latency, ready=True, draining=False)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in families.values() for s in f.samples}
    assert values[("tetri_requests_total", (("state", "completed"),))] == 5
    assert values[("tetri_requests_total", (("state", "failed"),))] == 0
    assert values[("tetri_device_busy_fraction", (("device", "cpu:1"),))] == 0.25
    assert values[("tetri_comm_cache_hits_total", ())] == 7
    assert values[("tetri_http_responses_total",
                   (("route", "/v1/images/generations"), ("status", "429")))] == 1
    assert families["tetri_step_latency_seconds"].type == "histogram"
    assert values[("tetri_step_latency_seconds_bucket", (("le", "0.0025"),))] == 1
    assert values[("tetri_step_latency_seconds_bucket", (("le", "2.5"),))] == 2
    assert values[("tetri_step_latency_seconds_bucket", (("le", "+Inf"),))] == 3

    # Next scrape: two new samples; the engine's window still holds the old ones.
    stats.update(step_latency_s=[0.002, 0.02, 3.0, 0.002, 0.002], step_latency_count=5,
                 step_latency_sum_s=3.026)
    text = prom.render(stats, responses, latency, ready=True, draining=False)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert values[("tetri_step_latency_seconds_bucket", (("le", "0.0025"),))] == 3
    assert values[("tetri_step_latency_seconds_count", ())] == 5


def test_metrics_before_the_engine_is_ready_still_parse():
    from prometheus_client.parser import text_string_to_metric_families

    text = prom.render(None, Counter(), prom.LatencyHistograms(), ready=False, draining=False)
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"tetri_engine_ready", "tetri_requests", "tetri_queue_depth",
            "tetri_step_latency_seconds"} <= names
