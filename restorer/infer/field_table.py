"""The field's JPEG-restoration benchmarks: the sets, the qualities, and the papers' published figures
(one table, copied from their sources, never recomputed). bench/field.py prints them beside ours; the
demo says where its network stands among them; restorer/weights/*.json cards carry ours.

The benchmarks folder is laid out like ../shared/benchmarks (its README.md says where each set comes
from): LIVE1_color/ is scored in RGB, LIVE1_gray/ and Classic5/ with evaluate's --gray protocol."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"  # beside the repository
QUALITIES = (10, 20, 30, 40)
SETS = {"LIVE1_color": False, "LIVE1_gray": True, "Classic5": True}  # set -> evaluate's --gray
SKIPPED = ("Real",)  # real-world JPEGs without originals: nothing to score against

FBCNN_GRAY_TABLE = ("FBCNN paper's gray table (Jiang et al., ICCV 2021; jiaxi-jiang/FBCNN) for JPEG, ARCNN, DnCNN, "
                    "QGAC, FBCNN; SwinIR and MambaIRv2 (per-quality models) q10 from their papers")
# The published figures, copied from ../shared/benchmarks/README.md (never recomputed here):
# set -> quality -> method -> (PSNR dB, SSIM, PSNR-B dB), None where the README gives no figure.
PUBLISHED = {
    "LIVE1_gray": {
        "source": FBCNN_GRAY_TABLE,
        10: {"JPEG": (27.77, 0.773, 25.33), "ARCNN": (28.96, None, None), "DnCNN": (29.19, None, None),
             "QGAC": (29.51, None, None), "FBCNN": (29.75, 0.827, 29.40), "SwinIR": (29.86, None, None),
             "MambaIRv2": (29.91, None, None)},
        20: {"JPEG": (30.07, 0.851, 27.57), "ARCNN": (31.29, None, None), "DnCNN": (31.59, None, None),
             "QGAC": (31.83, None, None), "FBCNN": (32.13, 0.889, 31.57)},
        30: {"JPEG": (31.41, 0.885, 28.92), "ARCNN": (32.67, None, None), "DnCNN": (32.98, None, None),
             "QGAC": (33.20, None, None), "FBCNN": (33.54, 0.916, 32.83)},
        40: {"JPEG": (32.35, 0.904, 29.96), "ARCNN": (33.61, None, None), "DnCNN": (33.96, None, None),
             "QGAC": (34.16, None, None), "FBCNN": (34.53, 0.931, 33.74)},
    },
    "Classic5": {
        "source": FBCNN_GRAY_TABLE,
        10: {"JPEG": (27.82, 0.760, 25.21), "ARCNN": (29.03, None, None), "DnCNN": (29.40, None, None),
             "QGAC": (29.84, None, None), "FBCNN": (30.12, 0.822, 29.80), "SwinIR": (30.27, None, None),
             "MambaIRv2": (30.37, None, None)},
        20: {"JPEG": (30.12, 0.834, 27.50), "ARCNN": (31.15, None, None), "DnCNN": (31.63, None, None),
             "QGAC": (31.98, None, None), "FBCNN": (32.31, 0.872, 31.74)},
        30: {"JPEG": (31.48, 0.867, 28.94), "ARCNN": (32.51, None, None), "DnCNN": (32.91, None, None),
             "QGAC": (33.22, None, None), "FBCNN": (33.54, 0.894, 32.78)},
        40: {"JPEG": (32.43, 0.885, 29.92), "ARCNN": (33.32, None, None), "DnCNN": (33.77, None, None),
             "QGAC": (34.05, None, None), "FBCNN": (34.35, 0.907, 33.48)},
    },
    "LIVE1_color": {
        "source": "README of ../shared/benchmarks: JPEG row measured there (matches the papers' colour tables); "
                  "SwinIR (one model per quality) from mmagic's SwinIR README; FBCNN q10 'about 27.77' from its "
                  "paper, not checked",
        10: {"JPEG": (25.69, None, None), "FBCNN": (27.77, None, None), "SwinIR": (28.07, None, None)},
        20: {"JPEG": (28.06, None, None), "SwinIR": (30.45, None, None)},
        30: {"JPEG": (29.37, None, None), "SwinIR": (31.82, None, None)},
        40: {"JPEG": (30.28, None, None), "SwinIR": (32.76, None, None)},
    },
}
METHODS = ("JPEG", "ARCNN", "DnCNN", "QGAC", "FBCNN", "SwinIR", "MambaIRv2")
