"""DeepScaleR math (agentica-org/DeepScaleR-Preview-Dataset schema: problem, answer, solution).

Data: TaskConfig.data_path is a local .jsonl/.parquet file, or a hub dataset id loaded through the
optional `datasets` package (imported only on that path). Every row must hold `problem`, `answer` and
`solution`; a malformed file or row raises ValueError naming the file and the 1-based row. Rows are
de-duplicated by problem text and shuffled with data_seed; the first eval_size form the eval split,
the next train_size the train split (fewer if the file is smaller), so the splits are disjoint.

Answer: the contents of the last `\\boxed{...}` (braces matched, so `\\boxed{\\frac{1}{2}}` works).
Reward: 1.0 when math-verify finds it equal to the gold answer (both wrapped in `$...$`), checked in a
time-bounded helper process (see tasks/math_verifier.py for why); `format_reward` when a box exists but
is wrong; 0.0 with no box.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from core.config import TaskConfig
from tasks.base import Example, Task
from tasks.math_verifier import MathVerifier

FIELDS = ("problem", "answer", "solution")
BOX_MARKERS = ("\\boxed{", "\\fbox{")
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) with nested braces matched; None if none/unclosed."""
    if not text:
        return None
    start = max(text.rfind(marker) + len(marker) if marker in text else -1 for marker in BOX_MARKERS)
    if start < 0:
        return None
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"task.data_path: {path} row {number} is not valid JSON: {err}") from err
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:
        raise ValueError(f"task.data_path: {path} is not a readable parquet file: {err}") from err


def _read_hub(dataset_id: str) -> list[dict]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"task.data_path: {dataset_id!r} is not a local file, so it was taken as a hub dataset "
                         "id, which needs the optional `datasets` package (pip install datasets); or give a "
                         "local .jsonl/.parquet file") from err
    return [dict(row) for row in datasets.load_dataset(dataset_id, split="train")]


def looks_like_file(data_path: str) -> bool:
    return data_path.endswith((".jsonl", ".json", ".parquet")) or data_path.startswith(("/", ".", "~"))


def load_rows(data_path: str) -> list[dict]:
    """Rows of the file/dataset, each checked to hold FIELDS as strings (numbers are stringified)."""
    path = Path(data_path).expanduser()
    if path.exists() or looks_like_file(data_path):
        if not path.is_file():
            raise ValueError(f"task.data_path: file {str(path)!r} does not exist")
        if path.suffix == ".parquet":
            rows = _read_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            rows = _read_jsonl(path)
        else:
            raise ValueError(f"task.data_path: {path} has suffix {path.suffix!r}; allowed: .jsonl, .parquet")
        where = str(path)
    else:
        rows, where = _read_hub(data_path), data_path
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"task.data_path: {where} row {number} is a {type(row).__name__}, expected an "
                             f"object with fields {list(FIELDS)}")
        missing = [f for f in FIELDS if row.get(f) is None]
        if missing:
            raise ValueError(f"task.data_path: {where} row {number} is missing field(s) {missing}; "
                             f"every row needs {list(FIELDS)}")
        for f in FIELDS:
            row[f] = str(row[f])
    if not rows:
        raise ValueError(f"task.data_path: {where} has no rows")
    return rows


class DeepScaleRTask(Task):
    """Math word problems with one gold answer, checked by math-verify."""

    name = "deepscaler"

    def __init__(self, cfg: TaskConfig, verifier: MathVerifier | None = None):
        self.cfg = cfg
        rows = list({row["problem"]: row for row in load_rows(cfg.data_path)}.values())  # dedupe problems
        order = list(range(len(rows)))
        random.Random(cfg.data_seed).shuffle(order)
        examples = [Example(rows[i]["problem"], rows[i]["answer"], {"solution": rows[i]["solution"], "row": i})
                    for i in order]
        self.eval = examples[:cfg.eval_size]
        self.train = examples[cfg.eval_size:cfg.eval_size + cfg.train_size]
        if not self.train:
            raise ValueError(f"task.data_path: {cfg.data_path} has {len(rows)} distinct problems, all taken by "
                             f"task.eval_size={cfg.eval_size}; nothing is left to train on")
        self.verifier = verifier or MathVerifier()

    @property
    def default_instruction(self) -> str:
        return INSTRUCTION

    def extract_answer(self, response: str) -> str | None:
        return last_boxed(response)

    def reward(self, response: str, example: Example) -> float:
        answer = self.extract_answer(response)
        if answer is None:
            return 0.0
        if self.verifier.check(answer, example.answer):
            return 1.0
        return self.cfg.format_reward
