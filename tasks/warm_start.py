"""Supervised warm start that turns the random tiny Qwen2 into the palindrome reference policy pi_ref.

Data: generated here, from reasoning-gym's letter distribution (a random half of a-z letters drawn
with replacement, a middle letter when the length is odd), letter multisets of the held-out eval
split excluded. Lengths are drawn with weight proportional to the half's size (L // 2): every half
letter is one more decision to learn, so the long prompts, where the diversity lives, get more
practice. Every time a multiset is drawn its target is a fresh uniformly random arrangement of the
half, mirrored, so the model learns a spread over *all* valid palindromes of a multiset, not one
canonical answer: that spread is what "distinct valid answers per prompt" measures later.
Format: exactly what the RL rollouts see, `format_prompt(tokenizer, instruction, question)` followed by
`<answer>PALINDROME</answer><|end|>`; loss on the response tokens only.

Schedule: fixed, so the result does not hinge on a noisy check: `sft_steps` AdamW steps, linear warm-up
then cosine decay to zero. The learning curve of a ~1M-parameter model on this task is steep and its
timing varies with floating-point rounding (the same recipe lands anywhere from 40% to 85% valid),
so the finished model is then *calibrated*: its output layer is scaled by the one factor (a
temperature baked into the weights) at which the exact expected accuracy at T=1 on generated
validation prompts equals `sft_target_accuracy`. That expectation is computed by teacher forcing over
every valid palindrome (`policy_eval.exact_measure`), so it carries no sampling noise and moves
continuously with the weights: machines whose trajectories differ still land at the same accuracy.
The eval-split figures (sampled, n=8, T=1, and their exact expectations), steps, the scale and the wall
time go to warm_start.json; docs/BENCHMARKS.md records them for the shipped reference.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import string
import time
from pathlib import Path

from core.config import TaskConfig, TinyModelConfig
from tasks.base import Example
from tasks.palindrome import PalindromeTask, all_palindromes, letters_key, question_for
from tasks.policy_eval import (
    EXACT_MAX_ANSWERS,
    collate,
    exact_measure,
    measure,
    response_logits,
    sequence_probabilities,
)
from tasks.prompts import format_prompt, resolve_instruction

WARMUP_STEPS = 20
HELD_OUT_PROMPTS = 256  # eval multisets excluded from the warm-start data: any eval_size up to this
VAL_PROMPTS = 256  # generated validation prompts the output scale is calibrated on
EVAL_N, EVAL_REPEATS = 8, 4  # recorded figures: distinct valid in n=8 samples, mean of 4 draws
SCALE_RANGE = (0.25, 1.0)  # calibration only ever flattens: a weak model is left as it is
LOSS_EVERY = 100  # steps per loss entry in warm_start.json's history


def palindrome_cfg(task_cfg: TaskConfig) -> TaskConfig:
    """The palindrome settings the warm start trains for (defaults if the RL task is another one)."""
    return task_cfg if task_cfg.name == "palindrome" else TaskConfig(name="palindrome", compact_prompt=True)


def held_out_cfg(task_cfg: TaskConfig) -> TaskConfig:
    """palindrome_cfg with eval_size raised to HELD_OUT_PROMPTS: the warm start excludes that split.

    Eval splits of one data_seed/train_size are prefixes of each other, so every study evaluating on up
    to HELD_OUT_PROMPTS prompts evaluates on multisets the warm start never saw, and shares its policy.
    """
    cfg = palindrome_cfg(task_cfg)
    return dataclasses.replace(cfg, eval_size=max(cfg.eval_size, HELD_OUT_PROMPTS))


def random_multiset(rng: random.Random, min_letters: int, max_letters: int,
                    weighted: bool = False) -> tuple[list[str], str]:
    """(half, middle) of a palindrome with min..max letters, letters drawn like reasoning-gym's.

    weighted: lengths drawn with weight max(1, L // 2) instead of uniformly (reasoning-gym's).
    """
    lengths = range(min_letters, max_letters + 1)
    length = rng.choices(lengths, weights=[max(1, n // 2) for n in lengths])[0] if weighted else \
        rng.randint(min_letters, max_letters)
    half = rng.choices(string.ascii_lowercase, k=length // 2)
    middle = rng.choice(string.ascii_lowercase) if length % 2 else ""
    return half, middle


def random_palindrome(rng: random.Random, half: list[str], middle: str) -> str:
    """A uniformly random arrangement of the half, then the middle, then the mirror."""
    order = rng.sample(half, len(half))
    return "".join(order) + middle + "".join(reversed(order))


def response_text(answer: str, eos: str) -> str:
    """The response the warm start teaches (and `exact_measure` scores): the tagged answer, then eos."""
    return f"<answer>{answer}</answer>{eos}"


class PairSource:
    """Endless (prompt, response) text pairs over a fixed pool of `size` letter multisets."""

    def __init__(self, task_cfg: TaskConfig, tokenizer, instruction: str, size: int, seed: int,
                 exclude: set[str]):
        self.rng = random.Random(seed)
        self.pool = []
        while len(self.pool) < size:
            half, middle = random_multiset(self.rng, task_cfg.min_letters, task_cfg.max_letters, weighted=True)
            letters = half + half + ([middle] if middle else [])
            if letters_key(letters) in exclude:
                continue
            question = question_for(self.rng.sample(letters, len(letters)), task_cfg.compact_prompt)
            self.pool.append((format_prompt(tokenizer, instruction, question), half, middle))
        self.eos = tokenizer.eos_token

    def batch(self, size: int) -> list[tuple[str, str]]:
        picks = [self.pool[self.rng.randrange(len(self.pool))] for _ in range(size)]
        return [(p, response_text(random_palindrome(self.rng, h, m), self.eos)) for p, h, m in picks]


def validation_examples(task_cfg: TaskConfig, seed: int, exclude: set[str]) -> list[Example]:
    """VAL_PROMPTS generated prompts (reasoning-gym's length distribution, not the eval split)."""
    rng, out = random.Random(seed + 7919), []
    while len(out) < VAL_PROMPTS:
        half, middle = random_multiset(rng, task_cfg.min_letters, task_cfg.max_letters)
        letters = half + half + ([middle] if middle else [])
        if letters_key(letters) not in exclude:
            shuffled = rng.sample(letters, len(letters))
            reference = "".join(half) + middle + "".join(reversed(half))
            out.append(Example(question_for(shuffled, task_cfg.compact_prompt), reference, {"letters": shuffled}))
    return out


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over WARMUP_STEPS, then cosine decay to 0 at `steps` (step is 0-based)."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model, tokenizer, source: PairSource, tiny: TinyModelConfig) -> list[dict]:
    """The fixed schedule: sft_steps AdamW steps on fresh batches; returns the loss history."""
    import torch

    torch.manual_seed(tiny.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tiny.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tiny.sft_steps))
    history, window = [], []
    model.train()
    for step in range(1, tiny.sft_steps + 1):
        ids, mask, labels = collate(tokenizer, source.batch(tiny.sft_batch_size))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if step % LOSS_EVERY == 0 or step == tiny.sft_steps:
            history.append({"step": step, "loss": round(sum(window) / len(window), 4)})
            window = []
    return history


def calibrate_output_scale(model, tokenizer, examples: list[Example], instruction: str, target: float) -> float:
    """Scale lm_head in place by the smallest factor in SCALE_RANGE whose exact expected accuracy on
    `examples` reaches `target` (1.0, no change, when the model is below target); returns the factor.

    Prompts with more than EXACT_MAX_ANSWERS valid answers (none at the default 5-8 letters) are left out.
    """
    import torch

    pairs, prompts = [], 0
    for ex in examples:
        answers = all_palindromes(ex.metadata["letters"])
        if len(answers) <= EXACT_MAX_ANSWERS:
            prompt = format_prompt(tokenizer, instruction, ex.question)
            pairs += [(prompt, response_text(answer, tokenizer.eos_token)) for answer in answers]
            prompts += 1
    if not pairs:
        return 1.0
    logits, targets = response_logits(model, tokenizer, pairs)  # (B, L-1, V), (B, L-1)

    def accuracy(scale: float) -> float:
        return float(sequence_probabilities(logits, targets, scale).sum()) / prompts

    lo, hi = SCALE_RANGE
    if accuracy(hi) <= target:
        scale = hi
    elif accuracy(lo) >= target:
        scale = lo
    else:  # expected accuracy rises with the scale while the likeliest answers are valid: bisect
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if accuracy(mid) < target else (lo, mid)
        scale = hi
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return scale


def warm_start(model_dir: str | Path, tiny: TinyModelConfig, task_cfg: TaskConfig, log=print,
               threads: int = 1) -> dict:
    """Train the model in `model_dir` in place (saved back there); returns and writes warm_start.json.

    threads: torch threads while it runs (default ONE: on the shared 2-core machine, two OpenMP threads
    competing with other processes spin-wait and a step took 6 s instead of 0.3 s at load average ~7).
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _warm_start(Path(model_dir), tiny, task_cfg, log)
    finally:
        torch.set_num_threads(saved)


def _warm_start(model_dir: Path, tiny: TinyModelConfig, task_cfg: TaskConfig, log) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    task_cfg = palindrome_cfg(task_cfg)
    task = PalindromeTask(task_cfg)
    instruction = resolve_instruction(task_cfg.instruction, task.default_instruction)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    exclude = {letters_key(ex.metadata["letters"]) for ex in PalindromeTask(held_out_cfg(task_cfg)).eval}
    source = PairSource(task_cfg, tokenizer, instruction, tiny.sft_examples, tiny.seed, exclude)
    log(f"warm start: {tiny.sft_steps} steps of {tiny.sft_batch_size} sequences, "
        f"{task_cfg.min_letters}-{task_cfg.max_letters} letters")
    history = train(model, tokenizer, source, tiny)
    train_s = time.time() - start
    scale = 1.0
    if tiny.sft_target_accuracy > 0:
        val = validation_examples(task_cfg, tiny.seed, exclude)
        scale = calibrate_output_scale(model, tokenizer, val, instruction, tiny.sft_target_accuracy)
    model.save_pretrained(model_dir)
    report = {**reference_figures(model, tokenizer, task, instruction, tiny.seed), "logit_scale": scale,
              "steps": tiny.sft_steps, "final_loss": history[-1]["loss"], "train_wall_s": round(train_s, 1),
              "total_wall_s": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
              "load_avg_1m": round(os.getloadavg()[0], 2), "loss_history": history,
              "tiny": dataclasses.asdict(tiny), "task": dataclasses.asdict(task_cfg)}
    log(f"warm start done: eval accuracy {report['eval_accuracy']:.3f}, distinct valid "
        f"{report['eval_distinct_valid']:.2f} (n={EVAL_N}), output scale {scale:.3f}, {train_s:.0f} s")
    (model_dir / "warm_start.json").write_text(json.dumps(report, indent=2))
    return report


def reference_figures(model, tokenizer, task: PalindromeTask, instruction: str, seed: int) -> dict:
    """The eval split's figures at T=1: sampled (n=EVAL_N) and exact expectations, and its room to diversify."""
    from tasks.palindrome import valid_arrangements

    sampled = measure(model, tokenizer, task, task.eval, instruction, EVAL_N,
                      max_new_tokens=task.cfg.max_letters + 4, seed=seed, repeats=EVAL_REPEATS)
    exact = exact_measure(model, tokenizer, task.eval, instruction, EVAL_N,
                          valid_answers_of=lambda ex: all_palindromes(ex.metadata["letters"]),
                          response_of=lambda answer: response_text(answer, tokenizer.eos_token))
    arrangements = [valid_arrangements(ex.metadata["letters"]) for ex in task.eval]
    return {"eval_accuracy": sampled["accuracy"], "eval_distinct_valid": sampled["distinct_valid"],
            "expected_accuracy": round(exact["expected_accuracy"], 4),
            "expected_distinct_valid": round(exact["expected_distinct_valid"], 4),
            "eval_valid_arrangements_mean": sum(arrangements) / len(arrangements),
            "eval_prompts": len(task.eval), "eval_n": EVAL_N, "eval_repeats": EVAL_REPEATS, "temperature": 1.0,
            "example_responses": sampled["example_responses"]}
