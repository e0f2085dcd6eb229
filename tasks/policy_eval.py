"""Measure a HF causal-LM policy on a task with plain HF sampling (no vLLM): accuracy and diversity.

Used by the warm start (to pick its stopping step and to record the reference policy's numbers) and by
the tiny-policy integration test. Sampling is T=1.0, top_k off, top_p 1.0: the policy itself, as the RL
rollouts sample it.
"""
from __future__ import annotations

from typing import Sequence

from tasks.base import Example, Task, distinct_valid_per_group
from tasks.prompts import format_prompt


def sample(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int, seed: int,
           temperature: float = 1.0, batch_prompts: int = 64) -> list[str]:
    """n samples per prompt, rows of one prompt contiguous; decoded without special tokens. (B = P * n)."""
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # decoder-only batch generation needs the prompt flush right
    out: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_prompts):
        chunk = list(prompts[start:start + batch_prompts])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def measure(model, tokenizer, task: Task, examples: Sequence[Example], instruction: str, n: int,
            max_new_tokens: int, seed: int = 0) -> dict[str, float]:
    """Accuracy (mean 0/1 reward, format reward excluded) and mean distinct valid answers per prompt."""
    prompts = [format_prompt(tokenizer, instruction, ex.question) for ex in examples]
    responses = sample(model, tokenizer, prompts, n, max_new_tokens, seed)
    rows = [ex for ex in examples for _ in range(n)]
    correct = [task.reward(r, ex) >= 1.0 for r, ex in zip(responses, rows)]
    distinct = distinct_valid_per_group(task, responses, rows, n)
    return {
        "accuracy": sum(correct) / len(correct),
        "distinct_valid": sum(distinct) / len(distinct),
        "prompts": len(examples),
        "n": n,
        "example_responses": responses[:n],
    }
