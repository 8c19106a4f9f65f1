"""A process forked after the parent loaded, warmed and used the engine scores correctly, for
each CPU backend, with the parent idle and with parent threads scoring at the moment of the fork
(and a cache store's lock held then): the README's promise to pre-forking servers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

if not hasattr(os, "fork"):
    pytest.skip("no fork() on this platform", allow_module_level=True)

_PROBE = textwrap.dedent('''
    import os, sys, threading, time
    sys.path.insert(0, sys.argv[2])
    import numpy as np
    import torch
    from pathlib import Path
    from train_fixtures import TINY, prepare_tiny, raw_history, spread_bundle
    from srp4ctr.engine import Engine, UserCacheStore
    root = Path(sys.argv[1])
    ds = prepare_tiny(root, cache="c", n_users=12)
    bundle = spread_bundle(root, ds, TINY, seed=3)
    backends = sys.argv[3].split(",")
    hist = raw_history(ds, 2)
    cands = list(range(1, 60))
    for backend in backends:
        engine = Engine.load(bundle, backend=backend, threads=2)
        want = engine.score(engine.encode_user(hist), cands).numpy()
        for busy in (False, True):
            store = UserCacheStore(max_bytes=1 << 20)
            stop = threading.Event()

            def spin():
                while not stop.is_set():
                    c = engine.encode_user(hist)
                    engine.score(c, cands)
                    with store._lock:  # held now and then, as a request would
                        time.sleep(0.001)

            threads = [threading.Thread(target=spin) for _ in range(2)] if busy else []
            for t in threads:
                t.start()
            time.sleep(0.3)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    store.put("u", engine.encode_user(hist))  # its lock is usable
                    got = engine.score(store.get("u"), cands).numpy()
                    many = engine.score_many([store.get("u")], [cands])[0].numpy()
                    ok = np.abs(got - want).max() <= 1e-6 and np.abs(many - want).max() <= 1e-6
                    os.write(w, b"ok" if ok else b"differs")
                finally:
                    os._exit(0)
            os.close(w)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                status = "hung"
            reply = os.read(r, 16).decode()
            stop.set()
            for t in threads:
                t.join()
            print(f"{backend} {'busy' if busy else 'idle'} {reply or status}", flush=True)
''')


def test_forked_children_score_like_the_parent(tmp_path):
    from train_fixtures import cpu_backends

    backends = cpu_backends()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), tests_dir,
                           ",".join(backends)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    want = [f"{b} {m} ok" for b in backends for m in ("idle", "busy")]
    assert proc.stdout.strip().splitlines() == want, proc.stdout + proc.stderr[-2000:]
