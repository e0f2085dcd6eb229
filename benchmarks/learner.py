"""Learner throughput: tokens/s of one PPO step (score + update) through the real LearnerWorker.

    .venv/bin/python benchmarks/learner.py                      # CPU: tiny and ~25M Qwen2, fp32, ZeRO-0
    .venv/bin/python benchmarks/learner.py --sizes 25m --zero-stage 2
    .venv/bin/python benchmarks/learner.py --cuda               # GPU: R1-Distill-Qwen-1.5B shape, bf16, MFU

A step is what the trial does per RL step: `score` (policy + reference forward, full-vocabulary entropy
and exact KL) then `update` (forward + backward + AdamW). Tokens are prompt + response tokens of the
batch (what the model processes). Inputs are random tokens of fixed lengths; weights are random (the
speed of a dense transformer does not depend on their values).

MFU (--cuda) counts matmul FLOPs only, the usual convention (PaLM appendix B; Chinchilla):
per token, a forward costs 2 * N_matmul + 4 * L * S * d (attention scores and values, causal halved
not taken), a backward twice that; the step is score (2 forwards: policy, reference) + update
(ppo_epochs forward+backward), i.e. (4 + 6 * epochs) * N_matmul + (8 + 12 * epochs) * L * S * d per
token, with N_matmul the non-embedding parameters plus the lm_head.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers import environment  # noqa: E402

# Dense bf16 peak TFLOP/s by device-name substring (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None = None  # None: the tiny char tokenizer's
    tie: bool = False
    rope_theta: float = 10000.0
    max_position: int = 512


SHAPES = {
    "tiny": Shape(128, 4, 4, 2, 384),  # TinyModelConfig defaults (~0.8M parameters)
    "25m": Shape(512, 8, 8, 4, 1536),  # ~25M parameters, still the char tokenizer
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json, hard-coded so no hub access is needed.
    "r1-1.5b": Shape(1536, 28, 12, 2, 8960, vocab=151936, tie=False, rope_theta=10000.0, max_position=131072),
}


def build_model(name: str, shape: Shape, out: Path, dtype: str) -> Path:
    """A random-weight Qwen2 folder of `shape` (cached: rebuilt only when missing)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks.tiny_model import build_tokenizer

    folder = out / f"{name}-{dtype}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=shape.vocab or len(tokenizer), hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         tie_word_embeddings=shape.tie, rope_theta=shape.rope_theta,
                         max_position_embeddings=shape.max_position, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_batch(vocab: int, rows: int, prompt_len: int, response_len: int):
    """A full-length RolloutBatch of random tokens and (B, T) random per-sequence advantages."""
    import torch

    from core.types import RolloutBatch

    g = torch.Generator().manual_seed(0)
    batch = RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (rows, prompt_len), generator=g),
        prompt_mask=torch.ones(rows, prompt_len, dtype=torch.bool),
        response_ids=torch.randint(0, vocab, (rows, response_len), generator=g),
        response_mask=torch.ones(rows, response_len, dtype=torch.bool),
        sampler_logprobs=torch.zeros(rows, response_len), group_index=torch.arange(rows) // 8,
        finish_reasons=["length"] * rows, prompt_texts=[""] * rows, response_texts=[""] * rows)
    adv = torch.randn(rows, 1, generator=g).expand(rows, response_len).contiguous()
    return batch, adv


def matmul_flops_per_token(shape: Shape, vocab: int, seq: int, epochs: int) -> float:
    """Training-step FLOPs per token (module docstring)."""
    d, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * shape.intermediate  # q, o, k, v, gate/up/down
    n_matmul = shape.layers * per_layer + d * vocab
    attention = 4 * shape.layers * seq * d
    return (4 + 6 * epochs) * n_matmul + (2 + 3 * epochs) * attention  # score: 2 fwd; update: 3 fwd-equivalents


def bench(name: str, args) -> dict:
    import torch

    from core.config import Config
    from core.types import TrainBatch
    from workers.learner import LearnerWorker

    shape = SHAPES[name]
    folder = build_model(name, shape, Path(args.out), args.dtype)
    rows = args.prompts * args.samples
    config = Config().replace(**{
        "model.dtype": args.dtype, "learner.zero_stage": args.zero_stage,
        "learner.micro_batch_size": args.micro_batch, "learner.ppo_epochs": args.epochs,
        "rollout.n_samples": args.samples, "task.prompts_per_step": args.prompts,
        "learner.backend": "nccl" if args.cuda else "gloo"})
    learner = LearnerWorker(folder, config)
    vocab = learner.engine.module.config.vocab_size
    batch, adv = random_batch(vocab, rows, args.prompt_len, args.response_len)
    sync = torch.cuda.synchronize if args.cuda else (lambda: None)
    times = {"score": [], "update": []}
    for i in range(args.warmup + args.repeats):
        sync()
        t0 = time.perf_counter()
        scores = learner.score(batch)
        sync()
        t1 = time.perf_counter()
        learner.update(TrainBatch(batch, scores.logprobs, scores.ref_logprobs, adv))
        sync()
        t2 = time.perf_counter()
        if i >= args.warmup:
            times["score"].append(t1 - t0)
            times["update"].append(t2 - t1)
    tokens = rows * (args.prompt_len + args.response_len)
    score_s, update_s = (sorted(v)[len(v) // 2] for v in times.values())  # medians
    step_s = score_s + update_s
    result = {"model": name, "parameters": sum(p.numel() for p in learner.engine.module.parameters()),
              "dtype": args.dtype, "zero_stage": args.zero_stage, "rows": rows, "prompt_len": args.prompt_len,
              "response_len": args.response_len, "micro_batch": args.micro_batch, "ppo_epochs": args.epochs,
              "score_s": round(score_s, 3), "update_s": round(update_s, 3),
              "tokens_per_s": round(tokens / step_s, 1),
              "response_tokens_per_s": round(rows * args.response_len / step_s, 1)}
    if args.cuda:
        seq = args.prompt_len + args.response_len
        achieved = matmul_flops_per_token(shape, vocab, seq, args.epochs) * tokens / step_s
        gpu = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
        result.update(gpu=gpu, achieved_tflops=round(achieved / 1e12, 1),
                      mfu=round(achieved / (peak * 1e12), 3) if peak else None,
                      peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true", help="GPU path: r1-1.5b shape in bf16 with MFU")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--response-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 peak")
    parser.add_argument("--out", default=None, help="where random-weight model folders are cached")
    args = parser.parse_args(argv)
    run_dir = environment.configure()
    # CPU defaults: the palindrome trial's shapes (prompts ~16 tokens, 32 new tokens). GPU: R1-style
    # math rollouts (256-token prompts, 1024-token responses) in micro-batches of 4.
    args.sizes = args.sizes or (["r1-1.5b"] if args.cuda else ["tiny", "25m"])
    args.dtype = args.dtype or ("bfloat16" if args.cuda else "float32")
    args.prompt_len = args.prompt_len or (256 if args.cuda else 16)
    args.response_len = args.response_len or (1024 if args.cuda else 32)
    args.micro_batch = args.micro_batch or (4 if args.cuda else 16)
    args.out = args.out or str(run_dir / "bench_models")
    import torch

    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device visible")
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    for name in args.sizes:
        print(json.dumps(bench(name, args)), flush=True)


if __name__ == "__main__":
    main()
