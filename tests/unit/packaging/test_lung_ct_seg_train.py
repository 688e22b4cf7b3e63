"""The segmentation network's training loss (``packaging/models/lung_ct_seg/train.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def train() -> ModuleType:
    path = ROOT / "packaging" / "models" / "lung_ct_seg" / "train.py"
    spec = importlib.util.spec_from_file_location("lung_ct_seg_train", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _target(tumour_voxels: int) -> torch.Tensor:
    """One patch of 8×16×16 soft targets: background, no lung, ``tumour_voxels`` tumour."""
    t = torch.zeros(3, 8, 16, 16)
    t[0] = 1.0
    flat = t.view(3, -1)
    flat[0, :tumour_voxels] = 0.0
    flat[2, :tumour_voxels] = 1.0
    return t


def _logits(target: torch.Tensor) -> torch.Tensor:
    return (target * 20.0 - 10.0)[None]  # confident and right


def test_per_patch_dice_counts_a_missed_small_tumour_like_a_missed_large_one(
    train: ModuleType,
) -> None:
    big, small = _target(1000), _target(8)
    target = torch.stack([big, small])
    right = torch.cat([_logits(big), _logits(small)])
    small_missed = torch.cat([_logits(big), _logits(_target(0))])
    big_missed = torch.cat([_logits(_target(0)), _logits(small)])

    def dice_cost(logits: torch.Tensor, per_patch: bool) -> float:
        """The loss less its cross-entropy (the same either way)."""
        ce = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
        return float(train.loss_fn(logits, target, per_patch=per_patch) - ce)

    # Over the batch, the 8-voxel tumour barely registers beside the 1000-voxel one.
    assert dice_cost(small_missed, False) - dice_cost(right, False) < 0.01
    assert dice_cost(big_missed, False) - dice_cost(right, False) > 0.4
    # Per patch, each is half of the tumour Dice term (the lung term is absent: no lung).
    missed_small = dice_cost(small_missed, True) - dice_cost(right, True)
    missed_big = dice_cost(big_missed, True) - dice_cost(right, True)
    assert missed_small > 0.4
    # Not equal: the Dice's +1 smoothing weighs on 8 voxels.
    assert missed_small == pytest.approx(missed_big, abs=0.1)


def test_per_patch_dice_leaves_out_patches_without_the_class(train: ModuleType) -> None:
    empty = _target(0)
    # Nothing to find and nothing predicted: only the cross-entropy, no Dice penalty.
    loss = float(train.loss_fn(_logits(empty), empty[None], per_patch=True))
    assert loss < 0.01
