"""Model classes -> template labels: an explicit map (env), the template's predicted_values, or the same name."""

from __future__ import annotations

import logging

from appliance.labelstudio.labeling import LabelingSpec

log = logging.getLogger("predict.labels")


def parse_label_map(text: str) -> dict[str, str]:
    """``"cat:Animal, dog:Animal"`` -> {"cat": "Animal", "dog": "Animal"}."""
    pairs = {}
    for item in text.split(","):
        if item.strip():
            model_class, _, label = item.partition(":")
            pairs[model_class.strip().lower()] = label.strip()
    return pairs


class LabelMapper:
    def __init__(self, spec: LabelingSpec, explicit: dict[str, str]):
        targets = {label for control in ("BrushLabels", "RectangleLabels", "PolygonLabels")
                   for label in spec.labels.get(spec.controls.get(control, ""), ())}
        self.by_class: dict[str, str] = {label.lower(): label for label in targets}
        for label, classes in spec.predicted_values.items():
            self.by_class.update({c.lower(): label for c in classes})
        self.by_class.update({k: v for k, v in explicit.items() if v in targets})
        self.warned: set[str] = set()

    def label(self, model_class: str) -> str | None:
        """The template label of a model class, or None."""
        return self.by_class.get(model_class.lower())

    def __call__(self, model_class: str) -> str | None:
        label = self.label(model_class)
        if label is None and model_class not in self.warned:
            self.warned.add(model_class)  # one line per class, not per request
            log.warning("model class %r has no label in the template; its detections are dropped "
                        "(map it with APPLIANCE_LABEL_MAP=%s:<Label> or predicted_values)", model_class, model_class)
        return label
