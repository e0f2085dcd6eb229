"""Diversity and pass@k metrics over groups of responses (rows of one prompt share a group index).

Pure functions of texts, answers and embeddings; they import numpy and the stdlib only, so the trial
loop, the rollout actor and the tests can all call them. Every `*_metrics` function returns
`dict[str, float]` with `section/name` keys (docs/DESIGN.md).

Conventions
- Group statistics are computed per prompt and then averaged over prompts, so a step's value does not
  depend on how many prompts it had. Groups too small for a statistic (one response for a pairwise
  cosine) are skipped; a statistic with no usable group is NaN (MLflow logs NaN; plots leave a gap).
- n-grams default to characters: the tiny policy is character-level and palindrome answers are short
  letter strings, where word n-grams would mostly be unigrams. `unit="word"` splits on whitespace,
  which suits DeepScaleR's prose. The unit used in `diversity/distinct_*` is the `unit` argument.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

NGRAM_UNITS = ("char", "word")
DISTINCT_NS = (1, 2, 3, 4)


def _as_numpy(x) -> np.ndarray:
    """numpy view of a numpy array, list or (possibly CUDA) torch tensor, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _groups(group_index) -> list[np.ndarray]:
    """Row indices of each group, in order of first appearance; group_index is (B,) ints."""
    g = _as_numpy(group_index).reshape(-1)
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    order = np.argsort(first)  # keep prompt order, though no caller depends on it
    return [np.flatnonzero(inverse == k) for k in order]


# --- pass@k -------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k).

    Uses the paper's product form 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge
    binomials. Requires 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_ks(n: int) -> list[int]:
    """The k of the pass@k curve from n samples: 1, 2, 4, ... (powers of two below n), then n itself."""
    if n < 1:
        raise ValueError(f"pass_at_k_ks: n must be >= 1, got {n}")
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i < n} | {n})


def pass_at_k_metrics(correct, ks: Sequence[int] | None = None) -> dict[str, float]:
    """Mean unbiased pass@k over prompts from a (P, n) bool matrix (row = prompt, column = sample).

    Returns `eval/pass_at_{k}` for each k in `ks` (default `pass_at_k_ks(n)`: 1, 2, 4, ..., n), the
    pass@k curve of Yue et al. 2025 ("Does RL really incentivize reasoning capacity...", 2504.13837).
    """
    c = _as_numpy(correct).astype(bool)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"pass_at_k_metrics: correct must be a non-empty (P, n) matrix, got shape {c.shape}")
    n = c.shape[1]
    ks = sorted(set(ks)) if ks else pass_at_k_ks(n)
    counts = c.sum(axis=1)
    return {f"eval/pass_at_{k}": float(np.mean([pass_at_k(n, int(ci), k) for ci in counts])) for k in ks}


# --- lexical diversity ----------------------------------------------------------------------------

def _units(text: str, unit: str) -> list[str]:
    if unit == "char":
        return list(text)
    if unit == "word":
        return text.split()
    raise ValueError(f"unit: unknown value {unit!r}; allowed: {list(NGRAM_UNITS)}")


def distinct_n(texts: Sequence[str], n: int, unit: str = "char") -> float:
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective"): distinct n-grams / total n-grams,
    pooled over `texts` (one group's responses). In [0, 1]; 1 = no n-gram repeats; NaN if no text has
    n units. `unit` is 'char' (default) or 'word' (whitespace split)."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        u = _units(text, unit)
        grams = [tuple(u[i:i + n]) for i in range(len(u) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else float("nan")


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def grouped_distinct_n(texts: Sequence[str], group_index, ns: Sequence[int] = DISTINCT_NS,
                       unit: str = "char") -> dict[str, float]:
    """`diversity/distinct_{n}`: distinct-n within each prompt's group, averaged over prompts.

    Per group, because distinct-n across prompts would mostly measure how different the prompts are.
    """
    groups = _groups(group_index)
    return {f"diversity/distinct_{n}": _nanmean([distinct_n([texts[i] for i in rows], n, unit)
                                                 for rows in groups]) for n in ns}


# --- semantic diversity -----------------------------------------------------------------------------

def mean_pairwise_cosine(embeddings, group_index) -> float:
    """Mean over groups of the mean off-diagonal cosine similarity of the group's embeddings.

    embeddings (B, D) float (normalised or not; rows are normalised here), group_index (B,) ints.
    1.0 = a group's responses embed identically (no diversity). Groups of one row are skipped;
    NaN if every group has one row. A zero row counts as cosine 0 with everything.
    """
    e = _as_numpy(embeddings).astype(np.float64)
    if e.ndim != 2 or e.shape[0] != _as_numpy(group_index).reshape(-1).shape[0]:
        raise ValueError(f"mean_pairwise_cosine: embeddings must be (B, D) with B = len(group_index), "
                         f"got {e.shape} and {_as_numpy(group_index).shape}")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.where(norms > 0, norms, 1.0)
    means = []
    for rows in _groups(group_index):
        m = len(rows)
        if m < 2:
            continue
        sim = e[rows] @ e[rows].T
        means.append((sim.sum() - np.trace(sim)) / (m * (m - 1)))
    return float(np.mean(means)) if means else float("nan")


# --- answer diversity -------------------------------------------------------------------------------

def distinct_answers(answers: Sequence[str | None], valid: Sequence[bool], group_index) -> dict[str, float]:
    """Distinct answers per prompt, averaged over prompts (the seed study's "response uniqueness").

    answers: B answers already normalised as the task's scorer normalises them (`Task.valid_answer`;
    for palindromes stripped and lower-cased), None = nothing extracted. They are compared as given:
    "ABA" and "aba" are two answers here, so the caller normalises. valid: B flags, True where the answer
    earns the full reward (for palindromes: a palindrome of the prompt's letters; several can be valid).
    - `diversity/distinct_valid`: distinct valid answers per prompt.
    - `diversity/distinct_answers`: distinct extracted answers of any validity per prompt (None is not
      an answer, so a group of unparseable responses scores 0).
    """
    if not (len(answers) == len(valid) == _as_numpy(group_index).reshape(-1).shape[0]):
        raise ValueError(f"distinct_answers: answers ({len(answers)}), valid ({len(valid)}) and "
                         f"group_index must have the same length")
    n_valid, n_any = [], []
    for rows in _groups(group_index):
        n_any.append(len({answers[i] for i in rows if answers[i] is not None}))
        n_valid.append(len({answers[i] for i in rows if answers[i] is not None and valid[i]}))
    return {"diversity/distinct_valid": float(np.mean(n_valid)) if n_valid else float("nan"),
            "diversity/distinct_answers": float(np.mean(n_any)) if n_any else float("nan")}


def answer_entropy(valid_answers: Sequence[str | None]) -> float:
    """Entropy in nats of the empirical distribution of one prompt's valid answers (None = an invalid
    sample, left out): -sum_a p_a log p_a with p_a = count(a) / (valid samples). 0 for one answer,
    log m for m equally frequent ones; NaN when no sample is valid (no distribution to measure)."""
    counts = np.array(list(Counter(a for a in valid_answers if a is not None).values()), dtype=np.float64)
    if counts.size == 0:
        return float("nan")
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def coverage_metrics(valid_answers: Sequence[Sequence[str | None]],
                     ref_valid_answers: Sequence[Sequence[str | None]]) -> dict[str, float]:
    """How the policy's valid answers on the eval prompts relate to pi_ref's (docs/CONVENTIONS.md).

    valid_answers / ref_valid_answers: per eval prompt (same prompts, same order), the n normalised
    valid answers of the policy / of pi_ref, None for an invalid sample. S_pi / S_ref = a prompt's set
    of distinct valid answers. Each metric is a mean over prompts (so the number of prompts does not
    weigh in); a prompt on which a ratio is undefined is skipped, and a metric with no usable prompt is
    NaN:
    - `eval/answer_coverage`: |S_pi ∩ S_ref| / |S_ref|, prompts with empty S_ref skipped; 1 = the
      policy still finds every answer pi_ref found (Yue et al. 2025, 2504.13837, ask whether RL narrows
      this).
    - `eval/answer_novelty`: |S_pi \\ S_ref| / |S_pi|, prompts with empty S_pi skipped; the share of
      the policy's answers pi_ref never produced in its n samples.
    - `eval/answer_entropy`: `answer_entropy` per prompt (nats), prompts without a valid sample skipped.
    - `eval/distinct_valid`: |S_pi| per prompt (a prompt with no valid sample counts 0).
    """
    if len(valid_answers) != len(ref_valid_answers):
        raise ValueError(f"coverage_metrics: valid_answers has {len(valid_answers)} prompts but "
                         f"ref_valid_answers has {len(ref_valid_answers)}; they must be the same eval prompts")
    if not valid_answers:
        raise ValueError("coverage_metrics: no eval prompts")
    coverage, novelty, entropy, distinct = [], [], [], []
    for answers, ref_answers in zip(valid_answers, ref_valid_answers):
        s_pi = {a for a in answers if a is not None}
        s_ref = {a for a in ref_answers if a is not None}
        if s_ref:
            coverage.append(len(s_pi & s_ref) / len(s_ref))
        if s_pi:
            novelty.append(len(s_pi - s_ref) / len(s_pi))
        entropy.append(answer_entropy(answers))
        distinct.append(len(s_pi))
    return {"eval/answer_coverage": _nanmean(coverage), "eval/answer_novelty": _nanmean(novelty),
            "eval/answer_entropy": _nanmean(entropy), "eval/distinct_valid": float(np.mean(distinct))}


def diversity_metrics(response_texts: Sequence[str], answers: Sequence[str | None], valid: Sequence[bool],
                      group_index, embeddings=None, unit: str = "char") -> dict[str, float]:
    """All of a step's diversity metrics: `diversity/distinct_valid`, `diversity/distinct_answers`,
    `diversity/distinct_1`..`_4` (per-group distinct-n over `unit`s), and `diversity/embed_cos`
    (mean within-group pairwise cosine) when `embeddings` (B, D) are given (see workers/embedder.py).
    """
    out = distinct_answers(answers, valid, group_index)
    out.update(grouped_distinct_n(response_texts, group_index, unit=unit))
    if embeddings is not None:
        out["diversity/embed_cos"] = mean_pairwise_cosine(embeddings, group_index)
    return out
