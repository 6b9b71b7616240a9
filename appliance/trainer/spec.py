"""A training run's parameters: the one list, written by the trainer (service.py) as JSON and read by the job
subprocess (job.py). Every value comes from the settings or the run; the job adds none of its own."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class TrainingJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: Path = Field(description="the training COCO set (annotations.json + images/)")
    holdout: Path = Field(description="the held-out COCO set the candidate is scored on")
    out: Path = Field(description="where the trained model goes")
    classes: list[str]
    arch: str
    epochs: int = Field(ge=1)
    img_size: int = Field(ge=0, description="0: the device's default (job.device_defaults)")
    batch_size: int = Field(ge=0, description="0: the device's default")
    threads: int = Field(ge=1)
    device: str
    sam_model_type: str
    sam_checkpoint: Path | None = None
    embeddings: Path | None = Field(None, description="the shared SAM embedding store; None: no store")
    embeddings_mb: int = Field(0, ge=0)
    # where the weights start from (init.py); none: the architecture's own initialisation
    init: Path | None = None
    init_classes: list[str] | None = Field(None, description="classes of `init` when they are not `classes`")
    class_map: dict[str, str] | None = Field(None, description="label -> class of `init` it continues")
    init_trusted: bool = Field(False, description="`init` is a full checkpoint the admin gave")
    # the serving model, scored on the same held-out set at the thresholds it serves
    current: Path | None = None
    current_labels: dict[str, str | None] | None = Field(None, description="class of `current` -> label")
    current_thresholds: dict[str, float] = Field(default_factory=dict)
    score_threshold: float = Field(0.3, description="`current`'s threshold for classes not in current_thresholds")

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> TrainingJob:
        return cls.model_validate_json(Path(path).read_text())
