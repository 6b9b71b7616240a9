"""The datasets of one run: the journal's tasks, split by task id into train and held-out COCO sets."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from appliance.labelstudio import state as app_state
from appliance.labelstudio import client as studio_api
from appliance.labelstudio import labeling
from appliance.labelstudio.images import ImageFetcher
from appliance.settings import Settings
from appliance.trainer import journal
from appliance.trainer.dataset import DatasetInfo, build_dataset, choose_holdout


class DatasetError(RuntimeError):
    pass


@dataclass
class Datasets:
    train: Path
    holdout: Path
    labels: list[str]
    train_info: DatasetInfo
    holdout_info: DatasetInfo
    spec: labeling.LabelingSpec | None = None  # the template: its predicted_values map model classes to labels

    def trained_labels(self) -> list[str]:
        """The labels with at least one training object, in template order (all of them when the counts are
        unknown)."""
        if not self.train_info.per_label:
            return list(self.labels)
        return [label for label in self.labels if self.train_info.per_label.get(label, 0) > 0]

    def summary(self) -> dict:
        return {"train_images": self.train_info.images, "train_objects": self.train_info.objects,
                "holdout_images": self.holdout_info.images, "holdout_objects": self.holdout_info.objects,
                "skipped_tasks": len(self.train_info.skipped) + len(self.holdout_info.skipped),
                "holdout_ids": sorted(self.holdout_info.task_ids)[:1000]}


def keep_snapshot(datasets: Datasets, model_dir: Path) -> None:
    """The version's record of its data: both COCO sets (task ids, annotation ids and times, image URLs, masks),
    from which `appliance export --version` gives this exact training set back, whatever is edited later."""
    for split, folder in (("train", datasets.train), ("holdout", datasets.holdout)):
        if (folder / "annotations.json").is_file():
            shutil.copyfile(folder / "annotations.json", model_dir / f"dataset-{split}.json")


def project_spec(settings: Settings) -> labeling.LabelingSpec:
    project_id = app_state.project_id(settings)
    if not project_id:
        raise DatasetError("the project does not exist yet (the bootstrap has not run)")
    return labeling.parse(studio_api.Studio(settings, timeout=30).label_config(project_id))


def build_datasets(settings: Settings, work: Path) -> Datasets:
    tasks = journal.read_tasks(settings.journal_dir)
    spec = project_spec(settings)
    try:
        labels = labeling.model_labels(spec)
    except labeling.LabelingError as error:
        raise DatasetError(str(error)) from error
    fetcher = ImageFetcher.from_settings(settings)
    holdout_ids = choose_holdout(tasks, settings.holdout_percent)
    common = dict(labels=labels, fetch=fetcher.fetch, holdout_percent=settings.holdout_percent,
                  holdout_ids=holdout_ids,
                  image_cache=settings.cache_dir / "images", image_key=spec.image_key,
                  max_pixels=settings.image_max_megapixels * 1_000_000)
    train = build_dataset(tasks, out_dir=work / "train", split="train", **common)
    holdout = build_dataset(tasks, out_dir=work / "holdout", split="holdout", **common)
    if train.objects == 0:
        raise DatasetError(f"no annotated objects in the training split yet ({len(tasks)} task(s) in the journal)")
    return Datasets(work / "train", work / "holdout", labels, train, holdout, spec)
