"""The annotator's cost model (benchmark and publish gate alike) and the publish decision, on hand-made masks."""

from __future__ import annotations

import numpy as np

from appliance.models.detection.cost import NO_PREDICTIONS, Photo, Predicted, Truth, choose_thresholds, photo_cost, \
    saving, total, unseen
from appliance.trainer.policy import decide


def box(x0: int, y0: int, x1: int, y1: int, size: int = 100) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


A, B, C = box(0, 0, 20, 20), box(50, 50, 80, 80), box(10, 60, 30, 90)


def objects(clicks=(2, 3, 4)) -> list[Truth]:
    return [Truth("cat", A, clicks[0]), Truth("cat", B, clicks[1]), Truth("dog", C, clicks[2])]


def test_kept_deleted_and_missed_objects():
    photo = Photo(objects(), [
        Predicted("cat", 0.9, box(0, 0, 20, 21)),   # A at IoU 0.95: kept
        Predicted("cat", 0.8, box(50, 50, 80, 68)),  # B at IoU 0.6: almost right, deleted, B still clicked
        Predicted("cat", 0.7, box(85, 0, 99, 10)),   # nothing there: deleted
    ])
    cost = photo_cost(photo)
    assert (cost.kept, cost.deleted, cost.clicks, cost.objects) == (1, 2, 3 + 4, 3)
    assert cost.actions == 2 + 7 + 1 and cost.sam_only == 2 + 3 + 4 + 1


def test_an_almost_right_prediction_clicked_on_costs_its_refinement_and_its_deletion():
    almost = Predicted("cat", 0.8, box(50, 50, 80, 68))  # B at IoU 0.6, under B's first click
    photo = Photo(objects(), [Predicted("cat", 0.9, A), almost], seeds={1: (1, 1)})  # refined in 1 click
    cost = photo_cost(photo)
    assert (cost.kept, cost.deleted, cost.clicks) == (1, 1, 1 + 4)
    hidden = photo_cost(photo, {"cat": 0.85})  # the seed not shown: B costs its clicks from nothing
    assert (hidden.kept, hidden.deleted, hidden.clicks) == (1, 0, 3 + 4)


def test_a_mask_over_two_objects_is_deleted_and_both_are_clicked():
    merged = A | box(20, 0, 40, 20)  # A and its neighbour in one mask: IoU 0.5 with each
    photo = Photo([Truth("cat", A, 2), Truth("cat", box(20, 0, 40, 20), 2)], [Predicted("cat", 0.9, merged)])
    cost = photo_cost(photo)
    assert (cost.kept, cost.deleted, cost.clicks, cost.actions) == (0, 1, 4, 6)


def test_a_duplicate_and_a_wrong_label_are_deleted():
    photo = Photo(objects(), [Predicted("cat", 0.9, A), Predicted("cat", 0.8, A), Predicted("cat", 0.7, C)])
    cost = photo_cost(photo)
    assert (cost.kept, cost.deleted, cost.clicks) == (1, 2, 3 + 4)


def test_the_threshold_hides_predictions_below_it():
    photo = Photo(objects(), [Predicted("cat", 0.9, A), Predicted("cat", 0.2, box(85, 0, 99, 10))])
    assert photo_cost(photo, {"cat": 0.5}).deleted == 0
    assert photo_cost(photo, {"cat": 0.1}).deleted == 1
    assert photo_cost(photo, {"cat": NO_PREDICTIONS}).actions == photo_cost(photo).sam_only


def test_thresholds_are_chosen_per_class_by_cost():
    junk = box(85, 0, 99, 10)
    photos = [Photo(objects(), [Predicted("cat", 0.9, A), Predicted("cat", 0.6, B), Predicted("cat", 0.4, junk),
                                Predicted("dog", 0.95, junk), Predicted("dog", 0.3, C)]),
              Photo(objects(), [Predicted("cat", 0.8, A), Predicted("cat", 0.5, junk), Predicted("dog", 0.9, junk)])]
    chosen = choose_thresholds(photos)
    # cat: showing down to 0.6 keeps A twice and B once; 0.5 and 0.4 only add junk. Halfway to the next score.
    assert chosen["cat"] == 0.55
    # dog: junk scores above the one right mask (0.95, 0.9 > 0.3): showing C costs 2 deletions to save 4 clicks.
    assert chosen["dog"] == 0.3
    # With the lowest score predicted (the held-out set's floor), showing every prediction goes halfway down to it.
    assert choose_thresholds(photos, floor=0.1)["dog"] == 0.2 and choose_thresholds(photos, floor=0.1)["cat"] == 0.55
    grid = [{"cat": t, "dog": d} for t in (0.0, 0.95, NO_PREDICTIONS) for d in (0.0, 0.92, NO_PREDICTIONS)]
    assert total(photos, chosen).actions < min(total(photos, thresholds).actions for thresholds in grid)


def test_a_class_whose_predictions_are_all_junk_is_not_shown():
    junk = box(85, 0, 99, 10)
    photos = [Photo(objects(), [Predicted("cat", 0.9, junk), Predicted("cat", 0.8, box(60, 0, 70, 10))])]
    assert choose_thresholds(photos) == {"cat": NO_PREDICTIONS}


def _metrics(actions: int, sam_only: int, photos: int = 4, segm: float = 0.5) -> dict:
    return {"segm_mAP": segm, "bbox_mAP": segm,
            "cost": {"photos": photos, "objects": 10, "kept": 5, "deleted": 1, "clicks": actions - photos - 1,
                     "actions": actions, "sam_only": sam_only, "predictions": 6}}


def test_the_gate_publishes_only_what_saves_actions():
    assert decide(_metrics(20, 30), None, False).publish
    costly = decide(_metrics(31, 30), None, False)
    assert not costly.publish and "would cost more than it saves (31 actions where SAM clicks alone need 30" in \
        costly.why
    assert not decide(_metrics(30, 30), None, False).publish  # saving nothing is not worth serving
    assert not decide(None, None, False).publish and "no held-out" in decide(None, None, False).why
    # Against the serving version on the same tasks: fewer actions wins, equal actions goes to the better AP.
    assert decide(_metrics(20, 30), _metrics(22, 30), True).publish
    worse = decide(_metrics(22, 30), _metrics(20, 30), True)
    assert not worse.publish and "saves no more than the serving model" in worse.why
    assert decide(_metrics(20, 30, segm=0.6), _metrics(20, 30, segm=0.5), True).publish
    assert not decide(_metrics(20, 30, segm=0.5), _metrics(20, 30, segm=0.5), True).publish


def test_the_saving_sentence():
    assert saving(_metrics(18, 30, photos=12)).startswith("saves 40 % of the actions on 12 held-out photo(s)")
    assert saving(_metrics(33, 30)).startswith("costs 10 % more")
    assert saving({"segm_mAP": 0.3}) is None


def test_chosen_thresholds_cost_what_the_cheapest_of_every_threshold_costs():
    """The one-pass choice against trying every threshold, on random overlapping boxes of two classes, objects
    refined from the prediction under their first click included."""
    rng = np.random.default_rng(3)

    def random_box() -> np.ndarray:
        x, y = rng.integers(0, 70, 2)
        w, h = rng.integers(10, 30, 2)
        return box(x, y, x + w, y + h)

    def random_seeds(truths, predicted) -> dict:
        """As holdout does: the best-scored prediction of the label under the object's first click seeds it."""
        seeds = {}
        for j, truth in enumerate(truths):
            ys, xs = np.nonzero(truth.mask)
            y, x = int(ys.mean()), int(xs.mean())
            under = [i for i, q in enumerate(predicted) if q.label == truth.label and q.mask[y, x]]
            if under:
                seeds[j] = (max(under, key=lambda i: predicted[i].score), int(rng.integers(1, truth.clicks + 2)))
        return seeds

    for _ in range(20):
        photos = []
        for _ in range(3):
            truths = [Truth(str(rng.choice(["cat", "dog"])), random_box(), int(rng.integers(1, 6)))
                      for _ in range(4)]
            predicted = [Predicted(t.label, float(rng.choice([0.2, 0.5, 0.9])), t.mask) for t in truths[:2]]
            predicted += [Predicted(str(rng.choice(["cat", "dog"])), float(rng.random()), random_box())
                          for _ in range(4)]
            photos.append(Photo(truths, predicted, seeds=random_seeds(truths, predicted)))
        chosen = choose_thresholds(photos)
        for label, threshold in chosen.items():
            others = {"cat": NO_PREDICTIONS, "dog": NO_PREDICTIONS}
            candidates = [q.score for p in photos for q in p.predicted if q.label == label] + [NO_PREDICTIONS]
            cheapest = min(total(photos, {**others, label: s}).actions for s in candidates)
            assert total(photos, {**others, label: threshold}).actions == cheapest


def test_a_saving_only_the_photos_that_chose_the_threshold_see_is_not_sure():
    # One photo's right cat scores just above another photo's wrong one: the threshold chosen on all photos falls
    # between them, but one chosen without the first photo shows no cat, and one chosen without the second shows
    # its wrong cat.
    def photo(right: float | None, wrong: float | None) -> Photo:
        shown = [Predicted("cat", right, A)] if right else [Predicted("cat", wrong, B)]
        return Photo([Truth("cat", A, 5)], shown)
    luck = [photo(0.9, None), photo(None, 0.88), photo(None, 0.86)]
    assert total(luck, choose_thresholds(luck)).actions == total(luck).sam_only - 5  # "saves" where it chose
    sure = unseen(luck)
    assert sure["photos"] == 3 and sure["saved"] <= 0 and sure["lower"] <= 0
    steady = [Photo(objects((5, 5, 5)), [Predicted("cat", 0.9, A), Predicted("cat", 0.8, B)]) for _ in range(3)]
    sure = unseen(steady)
    assert sure["saved"] == 3 * 10 and sure["lower"] == 30  # the same saving on every photo: sure


def test_the_gate_refuses_a_saving_that_is_not_sure():
    unsure = {**_metrics(20, 30), "unseen": {"photos": 4, "saved": 3, "lower": -2.5}}
    refused = decide(unsure, None, False)
    assert not refused.publish and "not sure yet" in refused.why and "saves 3 action(s) on 4 photo(s)" in refused.why
    assert decide({**unsure, "unseen": {"photos": 4, "saved": 9, "lower": 4.1}}, None, False).publish
