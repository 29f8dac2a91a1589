"""Recognition settings: one object, built once at the entry point (CLI or Serve app) and handed down."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve_app.model.checkpoints import DEFAULT_CHECKPOINT, Checkpoint, resolve_checkpoint
from serve_app.model.detector import DetectorConfig

if TYPE_CHECKING:
    import torch

    from serve_app.model.pipeline import Models


class RecognitionConfig(BaseModel):
    """How faces are detected, embedded and matched (a plain model: the Serve app takes it from its config)."""

    checkpoint: str = Field(DEFAULT_CHECKPOINT, description="embedder: a registry name or a path to a .pt state dict")
    flip: bool = Field(False, description="average each embedding with that of the mirrored face")
    threshold: float | None = Field(
        None, description="cosine similarity for a match; when set, false_accept_rate is not used"
    )
    false_accept_rate: float | None = Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description="the chance that a stranger is named as one of the enrolled people: the match threshold is "
        "derived from it and the gallery's size (null: the checkpoint's verification threshold, fixed)",
    )
    min_margin: float = Field(
        0.10,
        ge=0.0,
        le=2.0,
        description="a face is named only if its best person leads the second-best by this much (cosine); "
        "chosen with `facerec eval identify`: DIR at FAR 1% 0.89 -> 0.91 on LFW DevTest people",
    )
    top_k: int = Field(3, ge=1, le=100, description="candidates returned per face")
    max_embed_batch: int = Field(32, ge=1, le=1024, description="faces per embedder forward pass")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's choice")
    detect_probability: float = Field(0.95, ge=0.0, le=1.0, description="minimum MTCNN face probability")
    min_face_size: int = Field(20, ge=8, description="smallest face side searched for, in pixels")
    detect_max_side: int = Field(1280, ge=64, description="photos are downscaled to this longest side for detection")
    embed_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="embedder arithmetic; auto: bfloat16 where the CPU has it natively, else float32"
    )

    def resolved_checkpoint(self) -> Checkpoint:
        """The checkpoint these settings name (the one place a name or path becomes weights and facts)."""
        return resolve_checkpoint(self.checkpoint, self.threshold)

    @property
    def model_id(self) -> str:
        """The embedding space these settings produce (checkpoint, and flip averaging)."""
        return self.resolved_checkpoint().model_id_for(self.flip)

    @property
    def verification_threshold(self) -> float:
        """One photo against one other: the configured ``threshold``, or the checkpoint's own (with flip)."""
        return self.resolved_checkpoint().threshold_for(self.flip) if self.threshold is None else self.threshold

    def load_models(self, torch_threads: int | None = None) -> Models:
        """The detector, embedder and match rule these settings describe."""
        return load_models(self, torch_threads=torch_threads)

    def detector_config(self) -> DetectorConfig:
        return DetectorConfig(
            probability_threshold=self.detect_probability,
            min_face_size=self.min_face_size,
            max_side=self.detect_max_side,
        )


class RecognitionSettings(RecognitionConfig, BaseSettings):
    """:class:`RecognitionConfig` read from the environment (``FACEREC_<FIELD>``), for the command line."""

    model_config = SettingsConfigDict(env_prefix="FACEREC_", extra="ignore")


def load_models(
    settings: RecognitionConfig, *, torch_threads: int | None = None, device: torch.device | None = None
) -> Models:
    """Load MTCNN and the settings' embedding checkpoint once, with the match rule the settings ask for.

    With ``false_accept_rate`` (and no ``threshold``), gallery matches use a threshold derived from the
    checkpoint's shipped impostor calibration and the gallery's size (:mod:`serve_app.model.match_threshold`).
    """
    # Imported here: reading settings (the command line's help, a config check) must not load torch.
    import torch

    from serve_app.model.detector import FaceDetector
    from serve_app.model.embedder import Embedder
    from serve_app.model.match_threshold import threshold_rule
    from serve_app.model.pipeline import Models

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    resolved = settings.resolved_checkpoint()
    detector = FaceDetector(settings.detector_config(), device=device)
    embedder = Embedder(
        resolved,
        max_batch=settings.max_embed_batch,
        flip=settings.flip,
        device=device,
        precision=settings.embed_precision,
    )
    fixed = settings.verification_threshold
    rule = threshold_rule(
        fixed=fixed,
        false_accept_rate=settings.false_accept_rate if settings.threshold is None else None,
        checkpoint=resolved.name,
        flip=settings.flip,
        model_id=embedder.model_id,
        min_margin=settings.min_margin,
    )
    return Models(detector, embedder, fixed, rule)
