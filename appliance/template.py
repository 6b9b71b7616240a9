"""The labeling template: a user's file or string, or the default built from the label list.

Default: the image on the left and, beside it, the smart-only KeyPointLabels ``point`` (a click; keys 1-9) and
RectangleLabels ``box`` (a box; shift+1-9) that carry SAM prompts (and the detector's boxes), then BrushLabels
``mask`` (alt+1-9), which holds the output masks (SAM's and the detector's); a Header per metadata field.
"""

from __future__ import annotations

from importlib.resources import files
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from appliance.settings import Settings

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe",
           "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075")


class TemplateError(ValueError):
    pass


def default_template(labels: list[str], metadata_fields: list[str]) -> str:
    raw = (files("appliance") / "templates" / "default.xml").read_text()
    raw = "\n".join(line for line in raw.splitlines() if "<!--" not in line and "-->" not in line)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(labels))]

    def lines(prefix: str, smart: bool) -> str:
        out = []
        for i, (label, color) in enumerate(zip(labels, colors)):
            # One key per label and tool; Label Studio invents keys (5-8, 9/0/q/w, ...) for labels without one.
            hotkey = f' hotkey="{prefix}{i + 1}"' if i < 9 else ""
            out.append(f'        <Label value={quoteattr(label)}{hotkey} background="{color}"'
                       + (' smart="true"' if smart else "") + "/>")
        return "\n".join(out)

    headers = "\n".join(f'  <Header value={quoteattr("$" + f)} size="5"/>' for f in metadata_fields)
    return raw.format(headers=headers, labels=lines("alt+", False), point_labels=lines("", True),
                      box_labels=lines("shift+", True))


def label_config(settings: Settings) -> str:
    if settings.label_config:
        xml, origin = settings.label_config, "APPLIANCE_LABEL_CONFIG"
    elif settings.label_config_file:
        try:
            xml, origin = settings.label_config_file.read_text(), "APPLIANCE_LABEL_CONFIG_FILE"
        except OSError as error:
            raise TemplateError(f"APPLIANCE_LABEL_CONFIG_FILE: cannot read {settings.label_config_file}: "
                                f"{error.strerror}. Point it at a readable XML file.") from None
    else:
        return default_template(settings.labels, settings.metadata_fields)
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise TemplateError(f"{origin}: the labeling template is not valid XML ({error}). Fix the XML.") from None
    if root.tag != "View":
        raise TemplateError(f"{origin}: the labeling template must have <View> as its root element, not "
                            f"<{root.tag}>. Wrap it in <View>...</View>.")
    return xml
