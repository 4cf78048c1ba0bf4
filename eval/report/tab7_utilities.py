"""Tab. 7: non-identity utilities kept by de-identification: dlib 68-point landmark error (all, eye,
mouth, nose; pixels) and L2CS gaze error (pitch, yaw; degrees) against the originals."""
from __future__ import annotations

from eval import landmarks
from eval.report import tools
from eval.report.context import Context
from eval.report.scoring import column_mean
from eval.report.table import Table, number, text

KEY = "tab7_landmark_gaze"
TITLE = "Tab. 7: landmark error (pixels) and gaze error (degrees)"
GROUPS = list(landmarks.LANDMARK_GROUPS)
COLUMNS = [*(f"landmark_{g}" for g in GROUPS), "gaze_pitch", "gaze_yaw"]   # per-image columns, in table order


def build(ctx: Context) -> Table:
    table = Table(KEY, TITLE, ["Method", "Rev", *[f"Landmark {g}" for g in GROUPS], "Gaze pitch", "Gaze yaw"],
                  [text, text, *[number(2)] * len(COLUMNS)], notes=ctx.notes.on(tools.LANDMARKS, tools.GAZE))
    for method in ctx.methods:
        per_image = ctx.deid(method).per_image
        table.rows.append([method.name, method.rev, *[column_mean(per_image, c) for c in COLUMNS]])
    no_face = [o.name for o in ctx.originals if o.name in ctx.base.boxes and ctx.base.boxes[o.name] is None]
    if no_face:
        table.notes.append(f"{len(no_face)} of {len(ctx.originals)} originals without a dlib face left out: "
                           f"{', '.join(no_face[:10])}{' ...' if len(no_face) > 10 else ''}.")
    return table
