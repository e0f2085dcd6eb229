"""Measure a HF causal-LM policy on a task with plain HF (no vLLM): sampled and exact accuracy/diversity.

Used by the warm start (to record the reference policy's figures) and by the tiny-policy tests.
- `measure`: n samples per prompt at T=1.0 (top_k off, top_p 1.0: the policy itself, as the RL rollouts
  sample it); accuracy and distinct valid answers counted through `Task.valid_answer`.
- `exact_measure`: for tasks whose valid answers can be listed (palindromes), the probability the
  policy gives each valid answer, by teacher forcing, hence the *expected* accuracy and the expected
  number of distinct valid answers in n samples, free of sampling noise (sum over valid y of
  1 - (1 - p_y)^n). It counts only the canonical response `<answer>y</answer><eos>` the warm start
  trains, so it is a lower bound of the sampled figures (the tiny model emits nothing else).
"""
from __future__ import annotations

from typing import Callable, Sequence

from tasks.base import Example, Task, distinct_valid_per_group
from tasks.prompts import format_prompt

EXACT_MAX_ANSWERS = 24  # exact figures skip prompts with more valid answers (9+ letters): memory guard


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


def score_samples(task: Task, responses: Sequence[str], examples: Sequence[Example], n: int) -> dict[str, float]:
    """Accuracy (share of rows with a valid answer) and mean distinct valid answers per prompt.

    responses: P * n rows, the n samples of examples[i] at rows i*n .. i*n+n-1.
    """
    rows = [ex for ex in examples for _ in range(n)]
    valid = task.valid_answers(responses, rows)
    distinct = distinct_valid_per_group(task, responses, rows, n)
    return {"accuracy": sum(a is not None for a in valid) / len(valid),
            "distinct_valid": sum(distinct) / len(distinct)}


def measure(model, tokenizer, task: Task, examples: Sequence[Example], instruction: str, n: int,
            max_new_tokens: int, seed: int = 0, repeats: int = 1) -> dict:
    """Sampled accuracy and mean distinct valid answers per prompt in n samples (T=1.0).

    repeats: independent draws of n samples per example, averaged (the same figure, less sampling noise).
    """
    prompts = [format_prompt(tokenizer, instruction, ex.question) for ex in examples]
    draws = [score_samples(task, responses, examples, n) | {"responses": responses}
             for responses in (sample(model, tokenizer, prompts, n, max_new_tokens, seed + r) for r in range(repeats))]
    return {"accuracy": sum(d["accuracy"] for d in draws) / repeats,
            "distinct_valid": sum(d["distinct_valid"] for d in draws) / repeats,
            "prompts": len(examples), "n": n, "repeats": repeats, "example_responses": draws[0]["responses"][:n]}


def collate(tokenizer, pairs: Sequence[tuple[str, str]]):
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


def response_logits(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_rows: int = 256):
    """Teacher-forced logits (B, L-1, V) float64 and their targets (B, L-1), -100 off the response.

    Rows are padded to one width across batches so the result is a single tensor pair.
    """
    import torch

    ids, mask, labels = collate(tokenizer, pairs)  # (B, L) each
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_rows):
            rows = slice(start, start + batch_rows)
            chunks.append(model(input_ids=ids[rows], attention_mask=mask[rows]).logits[:, :-1].double())
    return torch.cat(chunks), labels[:, 1:]


def sequence_probabilities(logits, targets, scale: float = 1.0):
    """pi(response | prompt) per row (B,) under logits * scale (a temperature of 1/scale)."""
    import torch

    logp = torch.log_softmax(logits * scale, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (targets != -100)).sum(-1).exp()


def exact_measure(model, tokenizer, examples: Sequence[Example], instruction: str, n: int,
                  valid_answers_of: Callable[[Example], list[str]], response_of: Callable[[str], str]) -> dict:
    """Expected accuracy and expected distinct valid answers in n samples, per prompt then averaged.

    valid_answers_of(example): every valid answer (palindrome: `all_palindromes`); response_of(answer):
    the response text that gives it (the warm start's format). Prompts with more than
    EXACT_MAX_ANSWERS valid answers are skipped (reported in `skipped`).
    """
    pairs, owner, skipped = [], [], 0
    for i, ex in enumerate(examples):
        answers = valid_answers_of(ex)
        if len(answers) > EXACT_MAX_ANSWERS:
            skipped += 1
            continue
        prompt = format_prompt(tokenizer, instruction, ex.question)
        pairs += [(prompt, response_of(y)) for y in answers]
        owner += [i] * len(answers)
    probs = sequence_probabilities(*response_logits(model, tokenizer, pairs)).tolist() if pairs else []
    accuracy, distinct = [0.0] * len(examples), [0.0] * len(examples)
    for p, i in zip(probs, owner):
        accuracy[i] += p
        distinct[i] += 1.0 - (1.0 - p) ** n
    kept = sorted(set(owner))
    mean = (lambda values: sum(values[i] for i in kept) / len(kept)) if kept else (lambda _: float("nan"))
    return {"expected_accuracy": mean(accuracy), "expected_distinct_valid": mean(distinct),
            "n": n, "prompts": len(kept), "skipped": skipped}
