"""The publish decision: a version serves only if its pre-annotations save the annotator actions on the held-out
tasks, against SAM clicks alone and against the serving version (models/detection/cost.py counts the actions),
and surely so: on photos its thresholds were not chosen on too (cost.unseen)."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.models.detection.cost import saving


@dataclass(frozen=True)
class Decision:
    publish: bool
    why: str


def decide(candidate: dict | None, current: dict | None, serving: bool) -> Decision:
    """candidate/current: holdout.score() of the new model and of the serving one (None: not measured);
    serving: a version serves now."""
    spent = (candidate or {}).get("cost")
    if not spent or not spent.get("photos"):
        return Decision(False, "not published: no held-out annotations to measure it on yet; annotate more")
    if spent["actions"] >= spent["sam_only"]:
        return Decision(False, f"not published: it would cost more than it saves ({spent['actions']} actions "
                               f"where SAM clicks alone need {spent['sam_only']} on {spent['photos']} held-out "
                               f"photo(s)); annotate more")
    sure = (candidate or {}).get("unseen")
    if sure and sure["lower"] <= 0:
        return Decision(False, f"not published: its saving is not sure yet (each held-out photo costed at the "
                               f"thresholds chosen on the others, it saves {sure['saved']} action(s) on "
                               f"{sure['photos']} photo(s), too few for their spread); annotate more")
    theirs = (current or {}).get("cost")
    if serving and theirs and theirs.get("photos") and not _cheaper(candidate, current):
        return Decision(False, f"not published: it saves no more than the serving model ({spent['actions']} "
                               f"actions against {theirs['actions']} on the same {spent['photos']} held-out photo(s))")
    return Decision(True, saving(candidate))


def _cheaper(candidate: dict, current: dict) -> bool:
    """Fewer actions; at equal actions, better mask AP (the boxes' AP breaks a tie)."""
    mine, theirs = candidate["cost"]["actions"], current["cost"]["actions"]
    if mine != theirs:
        return mine < theirs
    key = lambda m: (round(m.get("segm_mAP", 0.0), 4), round(m.get("bbox_mAP", 0.0), 4))  # noqa: E731
    return key(candidate) > key(current)
