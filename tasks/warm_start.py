"""Supervised warm start that turns the random tiny Qwen2 into the palindrome reference policy.

Data: generated here, from the same letter distribution as reasoning-gym (a random half of a-z letters,
a middle letter when the length is odd), letter multisets of the eval split excluded. Every time a
multiset is drawn its target is a fresh uniformly random arrangement of the half, mirrored, so the
model sees *all* valid palindromes of a multiset and learns a spread over them, not one canonical
answer: that spread is what "distinct valid answers per prompt" measures later.
Format: exactly what the RL rollouts see, `format_prompt(tokenizer, instruction, question)` followed by
`<answer>PALINDROME</answer><|end|>`; loss on the response tokens only.

Stopping: the point is a *non-saturated* reference (the issue asks for 20-80% valid at T=1.0), so
every `CHECK_EVERY` steps the policy is sampled (T=1.0) on a generated validation set and training
stops at the first check at or above `sft_target_accuracy`, or after `sft_steps`.
The measured eval-split accuracy, distinct answers (n=8), steps and wall time go to warm_start.json.

Measured with the defaults (4-5 letters, batch 32, lr 3e-3, target 0.5; one torch thread): stops at
step 400, eval accuracy 0.53 and 1.28 distinct valid answers per prompt (n=8, T=1.0), 57-87 s of
training on the shared 2-core machine at load average 20-26 (other engineers' jobs). Why 4-5 letters:
3-letter prompts have a single valid answer (no diversity to measure), and with 6+ letters the mirror
is learned too slowly for the budget (7% valid after 350 steps, against 50% for 4-5).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import string
import time
from pathlib import Path

from core.config import TaskConfig, TinyModelConfig
from tasks.palindrome import PalindromeTask, letters_key, question_for
from tasks.policy_eval import measure
from tasks.prompts import format_prompt, resolve_instruction

CHECK_EVERY = 50  # steps between validation samplings (each ~2-4 s on a busy 2-core machine)
VAL_PROMPTS, VAL_N = 48, 4  # validation: 192 samples, accuracy std ~3.5 points
EVAL_N = 8  # samples per eval prompt for the recorded numbers (the n=8)
WARMUP_STEPS = 20


def palindrome_cfg(task_cfg: TaskConfig) -> TaskConfig:
    """The palindrome settings the warm start trains for (defaults if the RL task is another one)."""
    return task_cfg if task_cfg.name == "palindrome" else TaskConfig(name="palindrome", compact_prompt=True)


def random_multiset(rng: random.Random, min_letters: int, max_letters: int) -> tuple[list[str], str]:
    """(half, middle) of a palindrome with min..max letters, letters drawn like reasoning-gym's."""
    length = rng.randint(min_letters, max_letters)
    half = rng.choices(string.ascii_lowercase, k=length // 2)
    middle = rng.choice(string.ascii_lowercase) if length % 2 else ""
    return half, middle


def random_palindrome(rng: random.Random, half: list[str], middle: str) -> str:
    """A uniformly random arrangement of the half, then the middle, then the mirror."""
    order = rng.sample(half, len(half))
    return "".join(order) + middle + "".join(reversed(order))


class PairSource:
    """Endless (prompt, response) text pairs over a fixed pool of `size` letter multisets."""

    def __init__(self, task_cfg: TaskConfig, tokenizer, instruction: str, size: int, seed: int,
                 exclude: set[str]):
        self.rng = random.Random(seed)
        self.pool = []
        while len(self.pool) < size:
            half, middle = random_multiset(self.rng, task_cfg.min_letters, task_cfg.max_letters)
            letters = half + half + ([middle] if middle else [])
            if letters_key(letters) in exclude:
                continue
            question = question_for(self.rng.sample(letters, len(letters)), task_cfg.compact_prompt)
            self.pool.append((format_prompt(tokenizer, instruction, question), half, middle))
        self.eos = tokenizer.eos_token

    def batch(self, size: int) -> list[tuple[str, str]]:
        picks = [self.pool[self.rng.randrange(len(self.pool))] for _ in range(size)]
        return [(p, f"<answer>{random_palindrome(self.rng, h, m)}</answer>{self.eos}") for p, h, m in picks]


def collate(tokenizer, pairs: list[tuple[str, str]]):
    """Right-padded input_ids/attention_mask (B, L) and labels (B, L) = -100 except on response tokens."""
    import torch

    rows = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        rows.append((p + r, [-100] * len(p) + r))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in rows])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows])
    return ids, mask, labels


def validation_examples(task_cfg: TaskConfig, seed: int, exclude: set[str]):
    """Generated validation prompts (not the eval split, so stopping does not peek at it)."""
    from tasks.base import Example

    rng, out = random.Random(seed + 7919), []
    while len(out) < VAL_PROMPTS:
        half, middle = random_multiset(rng, task_cfg.min_letters, task_cfg.max_letters)
        letters = half + half + ([middle] if middle else [])
        if letters_key(letters) not in exclude:
            shuffled = rng.sample(letters, len(letters))
            reference = "".join(half) + middle + "".join(reversed(half))
            out.append(Example(question_for(shuffled, task_cfg.compact_prompt), reference, {"letters": shuffled}))
    return out


def warm_start(model_dir: str | Path, tiny: TinyModelConfig, task_cfg: TaskConfig, log=print) -> dict:
    """Train the model in `model_dir` in place (saved back there); returns and writes warm_start.json.

    Runs on ONE torch thread: on the shared 2-core machine, two OpenMP threads competing with other
    processes spin-wait and a step took 6 s instead of 0.3 s (measured at load average ~7).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _warm_start(model_dir, tiny, task_cfg, log)
    finally:
        torch.set_num_threads(threads)


def _warm_start(model_dir, tiny: TinyModelConfig, task_cfg: TaskConfig, log) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    task_cfg = palindrome_cfg(task_cfg)
    task = PalindromeTask(task_cfg)
    instruction = resolve_instruction(task_cfg.instruction, task.default_instruction)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    exclude = {letters_key(ex.metadata["letters"]) for ex in task.eval}
    source = PairSource(task_cfg, tokenizer, instruction, tiny.sft_examples, tiny.seed, exclude)
    val = validation_examples(task_cfg, tiny.seed, exclude)
    max_new = task_cfg.max_letters + 4  # <answer> + letters + </answer> + eos, with slack
    torch.manual_seed(tiny.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tiny.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    history, step, loss_value = [], 0, float("nan")
    for step in range(1, tiny.sft_steps + 1):
        model.train()
        ids, mask, labels = collate(tokenizer, source.batch(tiny.sft_batch_size))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if step % CHECK_EVERY == 0 or step == tiny.sft_steps:
            acc = measure(model, tokenizer, task, val, instruction, VAL_N, max_new, seed=step)["accuracy"]
            history.append({"step": step, "loss": round(loss_value, 4), "val_accuracy": acc,
                            "elapsed_s": round(time.time() - start, 1)})
            log(f"warm start step {step}: loss {loss_value:.3f} val accuracy {acc:.3f}")
            if acc >= tiny.sft_target_accuracy:
                break
    train_s = time.time() - start
    model.save_pretrained(model_dir)
    final = measure(model, tokenizer, task, task.eval, instruction, EVAL_N, max_new, seed=tiny.seed)
    report = {
        "eval_accuracy": final["accuracy"], "eval_distinct_valid": final["distinct_valid"],
        "eval_prompts": final["prompts"], "eval_n": EVAL_N, "temperature": 1.0,
        "example_responses": final["example_responses"], "steps": step, "final_loss": loss_value,
        "train_wall_s": round(train_s, 1), "total_wall_s": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "history": history, "tiny": dataclasses.asdict(tiny), "task": dataclasses.asdict(task_cfg),
    }
    (Path(model_dir) / "warm_start.json").write_text(json.dumps(report, indent=2))
    return report
