"""Face embedding: batched InceptionResnetV1 forward passes that return L2-normalised float32 vectors."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.model.checkpoints import Checkpoint, Standardization
from serve_app.model.standardization import fixed_standardization, prewhiten


class Embedder:
    """Runs one checkpoint. ``embed`` splits any number of crops into forward passes of at most ``max_batch``."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        max_batch: int = 32,
        flip: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.max_batch = max_batch
        self.flip = flip
        self.device = device or torch.device("cpu")
        self.network = checkpoint.load().to(self.device).eval()
        self._standardize = (
            prewhiten if checkpoint.standardization is Standardization.PREWHITEN else fixed_standardization
        )

    @property
    def model_id(self) -> str:
        """Identifies the embedding space; flip averaging changes the vectors, so it is part of the id."""
        return self.checkpoint.model_id + ("+flip" if self.flip else "")

    @property
    def dim(self) -> int:
        return self.checkpoint.dim

    def embed(self, crops: torch.Tensor) -> np.ndarray:
        """``(N, 3, 160, 160)`` crops in 0..255 -> ``(N, dim)`` L2-normalised float32 embeddings."""
        if crops.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        outputs = []
        with torch.inference_mode():
            for start in range(0, crops.shape[0], self.max_batch):
                batch = self._standardize(crops[start : start + self.max_batch].to(self.device, torch.float32))
                vectors = self.network(batch)
                if self.flip:
                    # Averaging with the mirror image removes some pose/lighting asymmetry.
                    vectors = vectors + self.network(torch.flip(batch, dims=[3]))
                outputs.append(torch.nn.functional.normalize(vectors, dim=1).cpu())
        return torch.cat(outputs).numpy().astype(np.float32, copy=False)
