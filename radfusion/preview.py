"""A PNG preview of a segmentation over key CT slices, for people to look at (demo, QA)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["render_preview"]

_COLOURS = {"lung": (60, 140, 255), "tumour": (255, 60, 60)}


def _window(hu: np.ndarray, centre: float = -600, width: float = 1500) -> np.ndarray:
    lo = centre - width / 2
    return (np.clip((hu - lo) / width, 0, 1) * 255).astype(np.uint8)


def render_preview(
    hu: np.ndarray,
    labels: np.ndarray,
    names: dict[int, str],
    out: Path,
    *,
    slices: Sequence[int] | None = None,
    panel: int = 320,
) -> Path:
    """Write ``out`` (PNG): up to four axial slices, lung window, segments overlaid.

    ``hu`` and ``labels`` are [k, r, c]; by default the slices shown are the centre of each of
    the three largest tumours and the slice with the most lung.
    """
    if slices is None:
        chosen: list[int] = []
        tumours = [n for n, name in names.items() if name.lower().startswith("tumour")]
        tumours.sort(key=lambda n: -int((labels == n).sum()))
        for n in tumours[:3]:
            kk = np.flatnonzero((labels == n).any(axis=(1, 2)))
            chosen.append(int(kk[len(kk) // 2]))
        lung_area = np.isin(labels, [n for n in names if n not in tumours]).sum(axis=(1, 2))
        chosen.append(int(np.argmax(lung_area)))
        slices = list(dict.fromkeys(chosen))[:4]
    tiles = []
    for k in slices:
        base = np.stack([_window(hu[k])] * 3, axis=-1).astype(np.float32)
        for n, name in names.items():
            mask = labels[k] == n
            colour = _COLOURS["tumour" if name.lower().startswith("tumour") else "lung"]
            base[mask] = 0.55 * base[mask] + 0.45 * np.asarray(colour, dtype=np.float32)
        tile = Image.fromarray(base.astype(np.uint8)).resize((panel, panel), Image.BILINEAR)
        ImageDraw.Draw(tile).text((6, 6), f"slice {k + 1}", fill=(255, 255, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (panel * len(tiles), panel + 22), (0, 0, 0))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * panel, 0))
    legend = "blue: lungs   red: tumours   (demonstration model, not for clinical use)"
    ImageDraw.Draw(sheet).text((6, panel + 5), legend, fill=(230, 230, 230))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
