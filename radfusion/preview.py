"""A PNG preview of a segmentation over key CT slices, for people to look at (demo, QA)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["render_overview", "render_preview"]

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
    notes: Sequence[str] = (),
) -> Path:
    """Write ``out`` (PNG): up to four axial slices, lung window, segments overlaid, and
    ``notes`` (e.g. the fusion result) as lines of text under them.

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
        tile = Image.fromarray(base.astype(np.uint8)).resize(
            (panel, panel), Image.Resampling.BILINEAR
        )
        ImageDraw.Draw(tile).text((6, 6), f"slice {k + 1}", fill=(255, 255, 0))
        tiles.append(tile)
    line = 14
    sheet = Image.new("RGB", (panel * len(tiles), panel + 22 + line * len(notes)), (0, 0, 0))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * panel, 0))
    legend = "blue: lungs   red: tumours   (demonstration model, not for clinical use)"
    draw = ImageDraw.Draw(sheet)
    draw.text((6, panel + 5), legend, fill=(230, 230, 230))
    for i, text in enumerate(notes):
        draw.text((6, panel + 5 + line * (i + 1)), text, fill=(255, 220, 120))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


_SIDE_COLOURS = {"right lung": (60, 140, 255), "left lung": (60, 220, 120)}


def render_overview(
    hu: np.ndarray,
    labels: np.ndarray,
    names: dict[int, str],
    affine: np.ndarray,
    out: Path,
    *,
    panel: int = 360,
) -> Path:
    """Write ``out`` (PNG): an axial slice through the largest tumour (or the most lung) and a
    coronal slice through the lungs' centre, right lung blue, left lung green, tumours red,
    each panel marked with the patient's right (R) and left (L) from ``affine`` (c, r, k →
    LPS), so that a reader can check the sides without trusting array order."""
    tumours = [n for n, name in names.items() if name.lower().startswith("tumour")]
    lungs = np.isin(labels, [n for n in names if n not in tumours])
    if tumours:
        biggest = max(tumours, key=lambda n: int((labels == n).sum()))
        kk = np.flatnonzero((labels == biggest).any(axis=(1, 2)))
        k = int(kk[len(kk) // 2])
    else:
        k = int(np.argmax(lungs.sum(axis=(1, 2))))
    rows = np.flatnonzero(lungs.any(axis=(0, 2)))
    r = int(rows[len(rows) // 2]) if len(rows) else hu.shape[1] // 2
    column_right = float(affine[0, 0]) < 0  # +c goes to the patient's right (x < 0)
    views = [(hu[k], labels[k], f"axial, slice {k + 1}", 1.0)]
    # Coronal: [k, c] with the head up; k grows to +z (head) when affine[2, 2] > 0.
    coronal_hu, coronal_labels = hu[:, r, :], labels[:, r, :]
    if float(affine[2, 2]) > 0:
        coronal_hu, coronal_labels = coronal_hu[::-1], coronal_labels[::-1]
    aspect = abs(float(affine[2, 2])) / max(abs(float(affine[0, 0])), 1e-6)
    views.append((coronal_hu, coronal_labels, f"coronal, row {r + 1}", aspect))
    tiles = []
    for image, label, title, stretch in views:
        base = np.stack([_window(image)] * 3, axis=-1).astype(np.float32)
        for n, name in names.items():
            mask = label == n
            colour = _SIDE_COLOURS.get(name.lower(), _COLOURS["tumour"])
            base[mask] = 0.5 * base[mask] + 0.5 * np.asarray(colour, dtype=np.float32)
        tile = Image.fromarray(base.astype(np.uint8))
        height = max(1, round(tile.height * stretch))
        tile = tile.resize((panel, round(panel * height / tile.width)), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(tile)
        draw.text((6, 6), title, fill=(255, 255, 0))
        left_edge, right_edge = ("R", "L") if not column_right else ("L", "R")
        draw.text((6, tile.height // 2), left_edge, fill=(255, 255, 0))
        draw.text((tile.width - 14, tile.height // 2), right_edge, fill=(255, 255, 0))
        tiles.append(tile)
    height = max(t.height for t in tiles)
    sheet = Image.new("RGB", (sum(t.width for t in tiles), height + 22), (0, 0, 0))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    legend = (
        "blue: right lung   green: left lung   red: tumours   (demonstration, not for clinical use)"
    )
    ImageDraw.Draw(sheet).text((6, height + 5), legend, fill=(230, 230, 230))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
