"""`tetri-engine serve --replicas 2`: the command starts a local Ray cluster, serves, and on SIGTERM
drains (a request in flight finishes), takes the replicas down and exits 0 (Ray's own SIGTERM handler,
which would end the process mid-drain, is not left in place)."""
from __future__ import annotations

import importlib.util
import json
import signal
import threading
import time
import urllib.request

import pytest

from test_server_support import free_port, start_serve

if importlib.util.find_spec("ray") is None:
    pytest.skip("the cluster tests need the `cluster` extra (ray[serve])", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def post(port: int, body: dict, results: list) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        results.append((answer.status, json.loads(answer.read())))


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
        return json.loads(answer.read())


def test_serve_replicas_drains_on_sigterm(tmp_path):
    port = free_port()
    server, lines = start_serve(tmp_path, port, "--replicas", "2", "--devices-per-replica", "1", "--ray-num-cpus", "4",
                                "--max-width", "256", "--max-height", "256")
    try:
        assert lines and lines[-1].startswith("curl "), "".join(lines)
        assert len(health(port)["devices"]) == 2
        results: list = []
        sender = threading.Thread(target=post, args=(port, {"prompt": "in flight", "size": "256x256",
                                                            "num_inference_steps": 100, "deadline_ms": 600000},
                                                     results))
        sender.start()
        for _ in range(600):  # bounded: until it runs on a replica (status polled every 0.5 s)
            if health(port)["busy_devices"]:
                break
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        rest = server.communicate(timeout=180)[0]
        sender.join(timeout=60)
        assert server.returncode == 0, rest
        assert "cluster stopped" in rest and "tetri-engine: stopped." in rest, rest
        [(status, body)] = results
        assert status == 200 and body["metrics"][0]["state"] == "completed"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
