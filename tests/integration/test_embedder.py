"""workers.embedder loads all-MiniLM-L6-v2 with the network unreachable and HF offline mode unset.

Runs in a fresh interpreter whose environment has HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE removed, every
proxy pointed at a dead local port, and socket connects to IP addresses refused and recorded: the
embedder must set offline mode itself and never try the network.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, socket, time
attempts = []
_connect = socket.socket.connect
def guarded(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        attempts.append(repr(address))
        raise OSError("network disabled by test_embedder")
    return _connect(self, address)
socket.socket.connect = guarded
socket.socket.connect_ex = lambda self, address: guarded(self, address) or 0

from workers.embedder import Embedder, embed_cos_metrics
import numpy as np
emb = Embedder(batch_size=64)
assert emb._model is None, "the model must load lazily"
x = emb.encode(["a racecar is a palindrome", "a racecar is a palindrome", "stock prices fell sharply"])
texts = [f"the answer is {w}" for w in ("abba", "level", "noon", "civic")] * 16  # 64 short texts
emb.encode(texts)  # warm-up
times = []
for _ in range(3):
    t = time.perf_counter(); emb.encode(texts); times.append(1000 * (time.perf_counter() - t))
print(json.dumps({
    "shape": list(x.shape), "dtype": str(x.dtype), "norms": np.linalg.norm(x, axis=1).tolist(),
    "same": float(x[0] @ x[1]), "different": float(x[0] @ x[2]),
    "empty": list(emb.encode([]).shape),
    "metric": embed_cos_metrics(emb, ["abba", "abba", "noon", "level"], [0, 0, 1, 1]),
    "offline": [os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE")],
    "attempts": attempts, "ms_per_64": min(times),
}))
"""


def test_embedder_offline_with_dead_network(run_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    dead = "http://127.0.0.1:9"  # discard port: nothing listens, so any proxied request fails fast
    env.update({k: dead for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")})
    env.update({"NO_PROXY": "", "no_proxy": "", "PYTHONPATH": str(ROOT), "KLRL_RUN_DIR": str(run_dir),
                "HF_HOME": str(run_dir / "cache" / "hf_empty_for_embedder_test")})
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["offline"] == ["1", "1"], "klrl must set HF offline mode itself"
    assert out["attempts"] == [], f"embedder tried the network: {out['attempts']}"
    assert out["shape"] == [3, 384] and out["dtype"] == "float32" and out["empty"] == [0, 384]
    assert all(abs(n - 1) < 1e-5 for n in out["norms"])
    assert out["same"] > 0.999 and out["different"] < 0.5
    # group 0 is two identical texts (cosine 1); group 1 two different words (below 1)
    assert 0.5 < out["metric"]["diversity/embed_cos"] < 1.0
    print(f"all-MiniLM-L6-v2 on CPU: {out['ms_per_64']:.0f} ms per batch of 64 short texts")
    assert out["ms_per_64"] < 10_000  # a sanity bound only: this machine's 2 cores are shared
