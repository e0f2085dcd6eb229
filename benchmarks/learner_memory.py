"""Learner memory: peak resident memory of `score` and `update`, full-vocabulary logits vs chunked head.

    .venv/bin/python benchmarks/learner_memory.py --out runs/bench_memory/points.jsonl   # every point
    .venv/bin/python benchmarks/learner_memory.py --lengths 2048 --paths full chunked --out ...
    .venv/bin/python benchmarks/learner_memory.py --shape 25m --lengths 2048 --paths chunked ckpt --phases update
    .venv/bin/python benchmarks/learner_memory.py --report runs/bench_memory/points.jsonl  # table + plan
    .venv/bin/python benchmarks/learner_memory.py --step-time                              # tiny model

A point is (path, phase, T): one fresh process imports the libraries, reads its RSS (the baseline),
builds the learner on a small Qwen2 with the real 151,936-token vocabulary (hidden 256, 2 layers, untied
embeddings, float32, ZeRO-0, world size 1), warms up with one update and one score (Adam's states exist,
both models' weights are resident), resets the kernel's peak-RSS counter (`/proc/self/clear_refs`) and
runs the phase; `learner_peak_mib` is that run's VmHWM minus the baseline (what the plan models) and
`step_increment_mib` its VmHWM minus the RSS just before it. Rows: 2 per batch, 1 per micro-batch, 64
prompt tokens + T response tokens each. Children run with MALLOC_MMAP_THRESHOLD_=65536 so
freed tensors go back to the kernel and the peak RSS follows torch's live memory.

Paths:
  full      the output layer on every response position at once, then the unchunked math on (b, T, V)
            float32 logits (logsumexp + gather, core.kl.exact_token_kl, core.metrics.entropy_from_logits):
            the learner before core/lm_head.py, reconstructed here (ZeRO-0 only: it calls the model
            outside DeepSpeed's forward);
  chunked   the learner as it is (core.lm_head: logits kl_chunk_size tokens at a time);
  ckpt      chunked + learner.gradient_checkpointing.
score always computes the exact KLs; update is the k3-in-loss arm (log-prob gradients only).

--step-time runs the tiny model's PPO step (score + update, 64 rows x 48 tokens, micro-batch 16) through
the full and the chunked learner alternately in one process and reports the ratio of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers import environment  # noqa: E402

# "v151936": the logits-dominated shape of the before/after points; "25m": activation-dominated (8 layers,
# the tiny char vocabulary), to check the plan's activation term with and without checkpointing.
SHAPES = {"v151936": dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=768, vocab=151936),
          "25m": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536, vocab=266)}
PROMPT_LEN, CHUNK = 64, 256
ROWS = {"v151936": (2, 1), "25m": (4, 4)}  # (rows per batch, rows per micro-batch)
LENGTHS = (256, 512, 1024, 2048)
PATHS = ("full", "chunked", "ckpt")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def build_model(out: Path, shape: str) -> Path:
    """A random-weight Qwen2 of SHAPES[shape], untied embeddings (cached)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks.tiny_model import build_tokenizer

    sh = SHAPES[shape]
    folder = out / f"qwen2-{shape}-h{sh['hidden']}-l{sh['layers']}"
    if (folder / "config.json").exists():
        return folder
    config = Qwen2Config(vocab_size=sh["vocab"], hidden_size=sh["hidden"], num_hidden_layers=sh["layers"],
                         num_attention_heads=sh["heads"], num_key_value_heads=sh["kv_heads"],
                         intermediate_size=sh["intermediate"], tie_word_embeddings=False,
                         max_position_embeddings=4096, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def full_logits_learner_class():
    """LearnerWorker with the unchunked head: (b, T, V) float32 logits, then the unchunked math."""
    import torch

    from core.kl import exact_token_kl
    from core.metrics import entropy_from_logits
    from workers.learner import LearnerWorker

    class FullLogitsLearner(LearnerWorker):
        def _token_values(self, inputs, reference, entropy=False):
            temperature, chunk = self.config.rollout.temperature, self.config.learner.kl_chunk_size

            def logits_of(scorer):  # (b, T, V) float32
                logits = scorer.head(scorer.response_hidden(inputs)).float()
                return logits / temperature if temperature != 1.0 else logits

            def logprobs_of(logits):
                return logits.gather(-1, inputs.response_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

            logits = logits_of(self.engine.module)
            values = {"logprobs": logprobs_of(logits)}
            if entropy:
                values["entropy"] = entropy_from_logits(logits, chunk)
            if reference:
                with torch.no_grad():
                    ref_logits = logits_of(self.reference)
                values["ref_logprobs"] = logprobs_of(ref_logits)
                values["kl_reverse"], values["kl_forward"] = exact_token_kl(logits, ref_logits, chunk)
            mask = inputs.response_mask
            return {k: torch.where(mask, v, 0.0) for k, v in values.items()}

    return FullLogitsLearner


def learner_config(path: str, rows: int, micro: int, chunk: int):
    from core.config import Config

    return Config().replace(**{
        "learner.micro_batch_size": micro, "learner.kl_chunk_size": chunk, "learner.lr": 1e-5,
        "learner.gradient_checkpointing": path == "ckpt", "rollout.n_samples": rows, "task.prompts_per_step": 1,
        "algorithm.kl_mode": "in_loss", "algorithm.kl_estimator": "k3", "algorithm.kl_clamp": 10.0})


def make_learner(path: str, folder: Path, config):
    from workers.learner import LearnerWorker

    cls = full_logits_learner_class() if path == "full" else LearnerWorker
    return cls(folder, config)


def measure_point(path: str, phase: str, T: int, shape: str, folder: Path) -> dict:
    """One point in this process (module docstring)."""
    import torch

    from benchmarks.learner import random_batch
    from core.types import TrainBatch

    rows, micro = ROWS[shape]
    config = learner_config(path, rows, micro, CHUNK)
    full_logits_learner_class()  # imports transformers, DeepSpeed and the learner before the baseline
    base_kib = _status_kib("VmRSS")
    learner = make_learner(path, folder, config)
    batch, adv = random_batch(SHAPES[shape]["vocab"], rows, PROMPT_LEN, T)
    train = TrainBatch(batch, torch.zeros(rows, T), torch.zeros(rows, T), adv)
    # Warm-up, as a trial's first step: Adam's states exist and both models' weights are resident
    # (from_pretrained maps the files; pages load when first read).
    learner.update(train)
    learner.score(batch)
    run = (lambda: learner.score(batch)) if phase == "score" else (lambda: learner.update(train))
    start_kib = _status_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM")
    return {"shape": shape, "path": path, "phase": phase, "T": T, "rows": rows, "micro": micro,
            "prompt_len": PROMPT_LEN, "chunk": CHUNK, "base_mib": round(base_kib / 1024),
            "start_mib": round(start_kib / 1024), "peak_mib": round(peak_kib / 1024),
            "learner_peak_mib": round((peak_kib - base_kib) / 1024),
            "step_increment_mib": round((peak_kib - start_kib) / 1024), "seconds": round(seconds, 2)}


def run_points(args) -> None:
    build_model(Path(args.models), args.shape)  # once, before the children read it
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for T in args.lengths:
        for path in args.paths:
            for phase in args.phases:
                cmd = [sys.executable, __file__, "--point", path, phase, str(T), "--shape", args.shape,
                       "--models", args.models]
                result = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if result.returncode:
                    raise SystemExit(f"point {path} {phase} T={T} failed:\n{result.stderr[-3000:]}")
                line = result.stdout.strip().splitlines()[-1]
                print(line, flush=True)
                with out.open("a") as f:
                    f.write(line + "\n")


def step_time(args) -> None:
    """Tiny model: median PPO step, full vs chunked learner, interleaved in one process."""
    import torch

    from benchmarks import learner as bench
    from core.types import TrainBatch

    folder = bench.build_model("tiny", bench.SHAPES["tiny"], Path(args.models), "float32")
    config = learner_config("chunked", 64, 16, 4096)
    learners = {path: make_learner(path, folder, config) for path in ("full", "chunked")}
    vocab = learners["full"].engine.module.config.vocab_size
    batch, adv = bench.random_batch(vocab, 64, 16, 32)
    times: dict[str, list[float]] = {p: [] for p in learners}
    for i in range(args.warmup + args.repeats):
        for path, learner in learners.items():
            t0 = time.perf_counter()
            scores = learner.score(batch)
            learner.update(TrainBatch(batch, scores.logprobs, scores.ref_logprobs, adv))
            if i >= args.warmup:
                times[path].append(time.perf_counter() - t0)
    medians = {p: sorted(v)[len(v) // 2] for p, v in times.items()}
    print(json.dumps({"tiny_step_s": {p: round(m, 4) for p, m in medians.items()},
                      "chunked_over_full": round(medians["chunked"] / medians["full"], 3),
                      "repeats": args.repeats, "threads": torch.get_num_threads()}))


def report(path: Path) -> None:
    """Markdown table of the measured points beside the plan's prediction (orchestrator.plan)."""
    from orchestrator.plan import Arch, learner_memory

    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| shape | T | phase | path | learner peak MiB | step increment MiB | plan MiB | plan error | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in sorted(points, key=lambda p: (p["shape"], p["T"], p["phase"], PATHS.index(p["path"]))):
        arch = Arch(**SHAPES[p["shape"]], tied=False)
        row = (f"| {p['shape']} | {p['T']} | {p['phase']} | {p['path']} | {p['learner_peak_mib']:,} | "
               f"{p['step_increment_mib']:,} |")
        if p["path"] != "full":
            config = learner_config(p["path"], p["rows"], p["micro"], p["chunk"])
            plan = learner_memory(arch, config, p["prompt_len"] + p["T"], p["T"], device="cpu")
            predicted = plan.peak_score if p["phase"] == "score" else plan.peak_update
            error = predicted / 2**20 / p["learner_peak_mib"] - 1
            row += f" {predicted / 2**20:,.0f} | {error:+.0%} |"
        else:
            row += " - | - |"
        print(row + f" {p['seconds']} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--point", nargs=3, metavar=("PATH", "PHASE", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--phases", nargs="+", choices=("score", "update"), default=["score", "update"])
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="v151936")
    parser.add_argument("--out", default=None, help="JSONL file the points are appended to")
    parser.add_argument("--report", default=None, help="print the table of a JSONL file with the plan's figures")
    parser.add_argument("--step-time", action="store_true", help="tiny model step time, chunked / full")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default=None, help="where random-weight model folders are cached")
    args = parser.parse_args(argv)
    run_dir = environment.configure()
    args.models = args.models or str(run_dir / "bench_models")
    if args.report:
        return report(Path(args.report))
    if args.point:
        path, phase, T = args.point
        print(json.dumps(measure_point(path, phase, int(T), args.shape, build_model(Path(args.models), args.shape))))
        return
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "load": os.getloadavg()}), flush=True)
    if args.step_time:
        return step_time(args)
    args.out = args.out or str(run_dir / "bench_memory" / "points.jsonl")
    run_points(args)


if __name__ == "__main__":
    main()
