"""Time-bounded, thread-safe math-verify: `MathVerifier().check(answer, gold) -> bool`.

The problem: math-verify bounds `parse`/`verify` with `signal.alarm`, which only works in the main thread
(Ray actors and Tune trainables call the reward from other threads, where it raises), and an alarm cannot
interrupt sympy/GMP while it is inside C code (`2^{10^{12}}` would hang a signal-based guard anyway).

The choice: run math-verify in one long-lived helper process (a fresh `python -c`, see _start)
and give every check a wall-clock deadline; a check that misses it is answered False and the helper is
killed and respawned on the next call. Inside the helper, math-verify runs in the helper's main thread,
so its own alarms still work as a cheap first line (they return False without a respawn); the kill is
the backstop for work an alarm cannot interrupt. Extracted answers longer than MAX_ANSWER_CHARS are
rejected before any parsing, which removes most pathological inputs for free.
Cost: one process start (~1-2 s, importing sympy) per verifier, then a pipe round trip (~0.1 ms) plus the
parse/verify itself (typically 1-20 ms) per check. Calls from several threads are serialized by a lock.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

MAX_ANSWER_CHARS = 300  # longer boxed answers are wrong for DeepScaleR's short gold answers anyway
DEFAULT_TIMEOUT_S = 5.0  # wall clock per check, including the helper's own parse+verify alarms
REPO_ROOT = Path(__file__).resolve().parents[1]  # so the helper imports this same `tasks` package
STARTUP_TIMEOUT_S = 120.0  # spawning the helper and importing sympy, on a busy 2-core machine


@lru_cache(maxsize=4096)
def _parse(text: str, timeout: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(f"${text}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=timeout)


def verify_here(answer: str, gold: str, timeout: int | None) -> bool:
    """math-verify in this thread: gold and answer each wrapped in $...$; timeout None = no alarm."""
    from math_verify import verify

    gold_parsed, answer_parsed = _parse(gold, timeout), _parse(answer, timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


def serve_stdio(alarm_s: int) -> None:
    """Helper-process loop: one JSON [answer, gold] per stdin line in, one JSON bool per line out."""
    import math_verify  # noqa: F401  (import before saying ready, so no check pays for it)

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            answer, gold = json.loads(line)
            ok = verify_here(answer, gold, alarm_s)
        except Exception:  # a malformed expression is a wrong answer, never a crash
            ok = False
        out.write("true\n" if ok else "false\n")
        out.flush()


class MathVerifier:
    """Checks answers in a helper process with a per-check deadline; safe to call from any thread."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        # A plain `python -c` child rather than multiprocessing's spawn: spawn re-imports the parent's
        # __main__ (a Ray worker script, a user's script without a main guard), fork copies Ray/torch threads.
        alarm = max(1, int(self.timeout_s * 0.6))  # the helper's alarms fire before the parent's deadline
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"from tasks.math_verifier import serve_stdio; serve_stdio({alarm})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            env=env, cwd=str(REPO_ROOT))
        if self._readline(STARTUP_TIMEOUT_S) != "ready":
            self._kill()
            raise RuntimeError(f"math-verify helper process did not start within {STARTUP_TIMEOUT_S} s")

    def _readline(self, timeout_s: float) -> str | None:
        """One stripped line from the helper, or None if none arrives within timeout_s."""
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        return line.strip() if line else None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
        self._proc = None

    def check(self, answer: str, gold: str) -> bool:
        """True when `answer` equals `gold` per math-verify; False when wrong, unparsable or too slow."""
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            return False
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            try:
                self._proc.stdin.write(json.dumps([answer, gold]) + "\n")
                self._proc.stdin.flush()
                reply = self._readline(self.timeout_s)
                if reply is not None:
                    return reply == "true"
            except (OSError, ValueError):
                pass
            self._kill()  # missed the deadline or died: respawn on the next call
            return False

    def warm_up(self) -> None:
        """Start the helper now (so the first check does not pay the process start)."""
        self.check("1", "1")

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __getstate__(self) -> dict:  # pickled into Ray actors: ship the settings, not the process/lock
        return {"timeout_s": self.timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __del__(self):  # best effort: the helper is a daemon, it also dies with this process
        try:
            self._kill()
        except Exception:
            pass
