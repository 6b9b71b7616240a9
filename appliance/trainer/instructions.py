"""The project's instructions in Label Studio: how to label here, and the model loop as it stands.

Label Studio shows a project's ``expert_instruction`` behind the "Instructions" button of the labeling view (and,
with the project's "Show before labeling" setting, when a labeling stream starts). The trainer rewrites the
appliance's block of it when the loop's state changes: the serving version and its held-out metrics, annotations
until the next run, and a run's progress. So an annotator sees in the UI what `appliance status` says. Text the
project's managers wrote outside the block stays as they wrote it.
"""

from __future__ import annotations

import html
import logging
import threading
from typing import Any

from appliance.labelstudio import state as app_state
from appliance.models.detection.cost import saving
from appliance.settings import Settings

log = logging.getLogger("trainer")

# Label Studio cleans the instructions with bleach (comments dropped, a class attribute kept): the block is a div.
BEGIN, END = '<div class="appliance-model-loop">', "</div>"
REFRESH_S = 10  # how often the state is looked at; Label Studio is written only when the text changed

GUIDE = """<h3>How to label</h3>
<p>Once per browser: switch on <b>Auto-Annotation</b> (bottom bar) and, in <b>Settings</b> (bottom bar), <b>Keep label
selected after creating a region</b>.</p>
<ol>
<li>Pick the <b>smart keypoint</b> tool (the sparkle pop-out in the toolbar, or <b>M</b>), press a label's key (1-9)
and <b>click the object</b>: SAM draws its mask in a blink.</li>
<li><b>Refine</b>: a click on a missed part adds it; an <b>alt-click</b> on a wrong part removes it.</li>
<li><b>A second object</b>: click it; a click well away from the pending mask starts a new mask. Objects side by
side: accept the pending mask first, then click the next one.</li>
<li><b>Accept</b> the masks (the check mark beside "N suggestions"; with <i>Auto-Accept Suggestions</i> each click is
one finished object), then <b>Submit</b>. Big or thin objects: drag a smart box around them (shift+1-9).</li>
</ol>"""


def model_section(serving: Any, trainer: dict, settings: Settings) -> str:
    """The model loop in a few lines of HTML: what serves, what the trainer does, when it runs next."""
    lines = []
    if serving is None:
        lines.append("<b>No model yet</b>: pre-annotations appear once a model trained on your annotations proves "
                     "itself on held-out tasks.")
    else:
        metrics = serving.metrics or {}
        figures = ", ".join(f"{name} {metrics[key]:.2f}" for key, name in (
            ("segm_AP50", "mask AP50"), ("bbox_AP50", "box AP50")) if isinstance(metrics.get(key), (int, float)))
        held = metrics.get("holdout_images") or metrics.get("images")
        on = f" on {held} held-out image(s)" if held else ""
        lines.append(f"<b>Serving model {html.escape(serving.version)}</b>" + (f": {figures}{on}" if figures else ""))
        saves = saving(metrics)
        if saves:
            lines.append(f"Its pre-annotations {html.escape(saves)}.")
    state = trainer.get("state") or "not started"
    if state == "running":
        epoch = (f", epoch {trainer['epoch']}/{trainer['max_epochs']}" if trainer.get("epoch") is not None
                 and trainer.get("max_epochs") else "")
        eta = f", about {trainer['eta_s']:.0f} s left" if isinstance(trainer.get("eta_s"), (int, float)) else ""
        lines.append(f"<b>Training now</b> ({html.escape(str(trainer.get('stage') or 'starting'))}{epoch}{eta}).")
    else:
        pending = int(trainer.get("pending_changes") or 0)
        more = max(0, settings.train_min_new - pending)
        lines.append(f"Next training run after <b>{more}</b> more annotation(s)"
                     + (f", or {settings.train_quiet_seconds} s after the last one" if pending else "")
                     + " (or press <i>Start training</i> in the project's Model settings).")
    last = trainer.get("last") or {}
    if last.get("result") in ("rejected", "failed"):
        why = last.get("why") or last.get("error") or ""
        lines.append(f"Last run {html.escape(str(last.get('run')))}: {last['result']}: {html.escape(str(why))}")
    return "<h3>Model</h3>\n<p>" + "<br/>\n".join(lines) + "</p>"


def render(serving: Any, trainer: dict, settings: Settings) -> str:
    return GUIDE + "\n" + model_section(serving, trainer, settings)


def merge(existing: str, block: str) -> str:
    """``existing`` with the appliance's block replaced by ``block`` (appended when it has none)."""
    marked = f"{BEGIN}\n{block}\n{END}"
    start = existing.find(BEGIN)
    end = existing.find(END, start) if start >= 0 else -1
    if end > start:
        return existing[:start] + marked + existing[end + len(END):]
    return f"{existing.rstrip()}\n{marked}" if existing.strip() else marked


class InstructionsWriter:
    """Writes the instructions when they change, from a thread of the trainer (never blocks a run)."""

    def __init__(self, settings: Settings, read_trainer, registry) -> None:
        self.settings = settings
        self.read_trainer = read_trainer  # () -> the trainer's status dict
        self.registry = registry
        self.written: str | None = None

    def start(self, stop: threading.Event) -> None:
        threading.Thread(target=self._loop, args=(stop,), name="instructions", daemon=True).start()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.refresh()
            stop.wait(REFRESH_S)

    def refresh(self) -> bool:
        """Write the instructions if they changed; True when written. Label Studio being away is no error."""
        from appliance.labelstudio.client import Studio, StudioError

        project_id = app_state.project_id(self.settings)
        if not project_id:
            return False
        text = render(self.registry.current(), self.read_trainer(), self.settings)
        if text == self.written:
            return False
        try:
            studio = Studio(self.settings, timeout=10)
            existing = studio.project(project_id).get("expert_instruction") or ""
            studio.patch(f"/api/projects/{project_id}", "writing the instructions",
                         json={"expert_instruction": merge(existing, text)})
        except (StudioError, OSError) as error:
            log.info("instructions not updated yet: %s", error)
            return False
        self.written = text
        return True
