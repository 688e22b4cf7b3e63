"""Train the reference lung / lung-tumour model on synthetic phantoms; export TorchScript.

A demonstration model, not for clinical use: it has only ever seen ``radfusion synth``
phantoms. Reproducible: phantom parameters come from the seed, training from ``--seed``.

    python packaging/models/lung_ct_seg/train.py --out packaging/models/lung_ct_seg

Training seeds are 1000..1000+N-1; evaluation uses held-out seeds from 5000 (never trained
on) through the same full-resolution pipeline the app runs (``segment``), and writes
``metrics.json``. Needs numpy, torch, monai, pydicom and pyyaml; runs on a GPU if there is one
(a few minutes on one H100), else on the CPU (hours).

``--style realistic`` trains on ``radfusion synth ct --style realistic`` phantoms instead
(vessels, airways, heart, fissures, sharp and soft kernels, 0.8-8 mm slices; every tumour
type, masses of 3-10 cm against the hilum, mediastinum or pleura included) from seeds 3000
up: apart from the false-positive stage's training phantoms (2000-2191), so that the model's
tumour share, one of that stage's features, is not judged on phantoms the model has seen.
Its evaluation adds ``--evaluate-masses`` phantoms with one mass each (seeds 7400 up) and
reports tumour Dice by type and by a mass's location. ``--init model.ts`` starts from a
TorchScript model's weights (fine-tuning the shipped one); ``--simple N`` mixes the first N
simple phantoms (the shipped model's training set) into a realistic run, so that what the
model did on them is kept in view; ``--crop`` sets the training patch (smaller patches, more
of them per minute on a CPU); ``--dice`` whether the Dice term is taken over the batch or per
patch (realistic runs: per patch, else a mass outweighs every nodule beside it).

The shipped model, 0.2.0, was made in four steps: 0.1.0 on simple phantoms (an H100), then
three fine-tunes on realistic phantoms on a 2-core CPU (no GPU was lent):

    python train.py --iterations 7250 --out /tmp/s0
    python train.py --style realistic --phantoms 90 --simple 30 --crop 48 128 128 \
        --dice batch --lr 1e-3 --iterations 4190 --seed 0 --init /tmp/s0/model.ts --out /tmp/s1
    python train.py ... (the same) --dice batch --lr 5e-4 --iterations 2495 --seed 1 \
        --init /tmp/s1/model.ts --out /tmp/s2
    python train.py ... (the same) --dice patch --lr 3e-4 --iterations 2255 --seed 2 \
        --init /tmp/s2/model.ts --evaluate 16 --evaluate-masses 12 --out /tmp/s3

The three fine-tunes ran with ``--minutes 58``, ``35`` and ``35`` (the learning rate's cosine
decay followed the clock; with ``--iterations`` it follows the steps: close, not bit-identical).
On a GPU, longer runs of the last step are the next thing to try.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from monai.networks.nets import UNet
from scipy import ndimage

from radfusion.operators.segmentation_model import (
    SegmentationModelConfig,
    preprocess,
    resample,
    segment,
)
from radfusion.synth.ct import LABELS, TUMOUR_LABEL_BASE, Phantom, make_phantom

HERE = Path(__file__).resolve().parent
CHANNELS = (16, 32, 64, 128, 256)
CROP = (64, 160, 160)  # training patch on the model grid (z, y, x): multiples of 16
MODEL_YAML: dict[str, Any] = {  # written as model.yaml
    "name": "radfusion-lung-ct",
    "version": "0.2.0",
    "model": "model.ts",
    "spacing_mm": [2.0, 1.5, 1.5],
    "intensity": {"hu_min": -1000, "hu_max": 500},
    "labels": {1: "lung", 2: "tumour"},
    "roi_size": [96, 256, 256],
    "overlap": 0.25,
    "demonstration": True,
}


class PhantomArgs(TypedDict, total=False):
    """Keyword arguments of :func:`make_phantom`."""

    slices: int
    slice_thickness: float
    pixel_spacing: float
    rows: int
    columns: int
    tumours: int
    chest: bool
    seed: int
    style: str
    kernel: str
    emphysema: bool
    effusion: bool
    tumour_types: list[str]


STYLES = ("simple", "realistic")
FIRST_TRAIN_SEED = {"simple": 1000, "realistic": 3000}
FIRST_EVAL_SEED = 5000
FIRST_MASS_SEED = 7400


def phantom_args(seed: int, style: str = "simple") -> PhantomArgs:
    """Varied but seed-determined acquisition: slice thickness, coverage, pixel size, tumours.

    Raises:
        ValueError: ``style`` is not one of :data:`STYLES`.
    """
    if style == "realistic":
        return _realistic_args(seed)
    if style != "simple":
        raise ValueError(f"style {style!r} is not one of {STYLES}")
    rng = np.random.default_rng([seed, 7])
    thickness = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]))
    coverage = float(rng.uniform(240, 400))
    return {
        "slices": max(24, round(coverage / thickness)),
        "slice_thickness": thickness,
        "pixel_spacing": round(float(rng.uniform(0.55, 0.95)), 3),
        "rows": 512,
        "columns": 512,
        "tumours": int(rng.integers(0, 6)),
        "chest": bool(rng.random() > 0.08),
        "seed": seed,
    }


def _realistic_args(seed: int, *, mass: bool = False) -> PhantomArgs:
    """Realistic anatomy with the acquisitions hospitals send; ``mass``: one 3-10 cm mass."""
    rng = np.random.default_rng([seed, 8])
    thickness = float(rng.choice([0.8, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0, 8.0]))
    coverage = float(rng.uniform(250, 340))
    args: PhantomArgs = {
        "slices": max(24, round(coverage / thickness)),
        "slice_thickness": thickness,
        "pixel_spacing": round(float(rng.uniform(0.6, 0.9)), 3),
        "rows": 512,
        "columns": 512,
        "tumours": 1 if mass else int(rng.integers(0, 6)),
        "seed": seed,
        "style": "realistic",
        "kernel": str(rng.choice(["soft", "sharp"])),
        "emphysema": not mass and bool(rng.random() < 0.15),
        "effusion": not mass and bool(rng.random() < 0.1),
    }
    if mass:
        args["tumour_types"] = ["mass"]
    return args


def classes_of(labels: np.ndarray) -> np.ndarray:
    """Ground-truth label map → the model's classes: 0 background, 1 lung, 2 tumour."""
    out = np.zeros(labels.shape, dtype=np.uint8)
    out[(labels == LABELS["right_lung"]) | (labels == LABELS["left_lung"])] = 1
    out[labels >= TUMOUR_LABEL_BASE] = 2
    return out


def make_phantom_safely(args: PhantomArgs) -> Phantom:
    while True:
        try:
            return make_phantom(**args)
        except ValueError as exc:  # tumours did not fit: ask for fewer
            if "tumours" not in str(exc) or not args["tumours"]:
                raise
            args = {**args, "tumours": args["tumours"] - 1}


def training_sample(seed_and_style: tuple[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """One phantom on the model grid: scaled input (float16) and soft targets (uint8 ×255)."""
    torch.set_num_threads(1)  # one phantom per worker process
    config = _config()
    p = make_phantom_safely(phantom_args(*seed_and_style))
    spacing = (p.spacing_z, p.pixel_spacing[0], p.pixel_spacing[1])
    x = preprocess(p.hu, spacing, config)[0].numpy().astype(np.float16)
    onehot = torch.from_numpy(np.eye(3, dtype=np.float32)[classes_of(p.labels)]).permute(3, 0, 1, 2)
    soft = resample(onehot, x.shape)  # partial-volume fractions per class
    return x, (soft.numpy() * 255).round().astype(np.uint8)


def _config() -> SegmentationModelConfig:
    return SegmentationModelConfig(
        name=MODEL_YAML["name"],
        version=MODEL_YAML["version"],
        model_path=HERE / "model.ts",
        spacing_mm=tuple(MODEL_YAML["spacing_mm"]),
        hu_min=MODEL_YAML["intensity"]["hu_min"],
        hu_max=MODEL_YAML["intensity"]["hu_max"],
        labels=MODEL_YAML["labels"],
        roi_size=tuple(MODEL_YAML["roi_size"]),
        overlap=MODEL_YAML["overlap"],
    )


def network() -> torch.nn.Module:
    # Batch norm, not instance norm: at inference its statistics do not depend on the window.
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        channels=CHANNELS,
        strides=(2,) * (len(CHANNELS) - 1),
        num_res_units=1,
        norm="BATCH",
    )


def crop(
    rng: np.random.Generator,
    x: torch.Tensor,
    t: torch.Tensor,
    tumours: list[np.ndarray],
    size: tuple[int, ...] = CROP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random training patch, centred on a tumour half of the time when there is one."""
    shape = x.shape
    pad = [max(0, c - n) for c, n in zip(size, shape, strict=True)]
    if any(pad):
        padding = [0, pad[2], 0, pad[1], 0, pad[0]]
        x = F.pad(x[None, None].float(), padding)[0, 0]  # 0 is air (hu_min)
        t = torch.cat(
            [
                F.pad(t[None, :1].float(), padding, value=255)[0],  # background
                F.pad(t[None, 1:].float(), padding)[0],
            ]
        )
        shape = x.shape
    if tumours and rng.random() < 0.5:
        # One list: no draw, so the shipped simple-style model's random stream is unchanged.
        voxels = tumours[rng.integers(len(tumours))] if len(tumours) > 1 else tumours[0]
        centre = voxels[rng.integers(len(voxels))]
        start = [
            int(np.clip(c - s // 2 + rng.integers(-s // 4, s // 4 + 1), 0, n - s))
            for c, s, n in zip(centre, size, shape, strict=True)
        ]
    else:
        start = [int(rng.integers(0, n - s + 1)) for s, n in zip(size, shape, strict=True)]
    sl = tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))
    return x[sl], t[(slice(None), *sl)]


def _tumour_voxels(tumour: np.ndarray, *, by_tumour: bool) -> list[np.ndarray]:
    """Where a tumour-centred patch may be centred: one array of voxels per tumour when
    ``by_tumour`` (each tumour as likely as another: a 10 cm mass has a thousand times a 10 mm
    nodule's voxels), else all in one (how the shipped simple-style model was trained). Short
    CPU fine-tunes lost the nodules either way (model card): it is no cure on its own."""
    if not tumour.any():
        return []
    if not by_tumour:
        return [np.argwhere(tumour)]
    labels, n = ndimage.label(tumour)
    return [np.argwhere(labels == i) for i in range(1, n + 1)]


def loss_fn(logits: torch.Tensor, target: torch.Tensor, *, per_patch: bool = False) -> torch.Tensor:
    """Soft cross-entropy plus soft Dice on lung and tumour (targets are class fractions).

    ``per_patch``: the Dice of each patch that holds the class, averaged, instead of one Dice
    over the batch. Over the batch, a patch with a 5 cm mass outweighs one with a 7 mm nodule
    some 360 to 1 and the nodule is not learnt; per patch, each counts alike."""
    log_p = F.log_softmax(logits.float(), dim=1)
    ce = -(target * log_p).sum(1).mean()
    p = log_p.exp()
    if not per_patch:
        dims = (0, 2, 3, 4)
        inter = (p * target).sum(dims)[1:]
        denom = (p + target).sum(dims)[1:]
        return ce + 1 - ((2 * inter + 1) / (denom + 1)).mean()
    dims = (2, 3, 4)
    inter = (p * target).sum(dims)[:, 1:]  # (patch, class)
    denom = (p + target).sum(dims)[:, 1:]
    present = target.sum(dims)[:, 1:] >= 1.0  # at least a voxel's worth of the class
    if not present.any():
        return ce
    dice = (2 * inter + 1) / (denom + 1)
    return ce + 1 - dice[present].mean()


def train(args: argparse.Namespace) -> torch.nn.Module:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    first = FIRST_TRAIN_SEED[args.style]
    seeds = [(seed, args.style) for seed in range(first, first + args.phantoms)]
    if args.style != "simple":  # the simple phantoms the shipped model learnt from, kept in view
        seeds += [
            (seed, "simple")
            for seed in range(FIRST_TRAIN_SEED["simple"], FIRST_TRAIN_SEED["simple"] + args.simple)
        ]
    t0 = time.time()
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        samples = pool.map(training_sample, seeds, chunksize=1)
    print(f"{len(samples)} phantoms on the model grid in {time.time() - t0:.0f} s", flush=True)
    xs = [torch.from_numpy(x).to(device) for x, _ in samples]
    ts = [torch.from_numpy(t).to(device) for _, t in samples]
    tumour_voxels = [
        _tumour_voxels(t[2] > 127, by_tumour=args.style == "realistic") for _, t in samples
    ]
    del samples

    model = network()
    if args.init is not None:  # a traced UNet keeps the module's parameter names
        model.load_state_dict(torch.jit.load(str(args.init), map_location="cpu").state_dict())
    model = model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    amp = device.type == "cuda"
    t0 = time.time()
    step = 0
    while True:
        # Cosine decay over the iterations, or over the time budget when --minutes is given.
        done = (time.time() - t0) / (60 * args.minutes) if args.minutes else step / args.iterations
        if done >= 1:
            break
        step += 1
        warm = min(1.0, step / 100)
        for group in optimiser.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * done))
        batch_x, batch_t = [], []
        for _ in range(args.batch):
            i = int(rng.integers(len(xs)))
            x, t = crop(rng, xs[i], ts[i], tumour_voxels[i], tuple(args.crop))
            x = x.float()
            x = x * float(rng.uniform(0.95, 1.05)) + float(rng.uniform(-0.02, 0.02))
            x = x + torch.randn_like(x) * float(rng.uniform(0, 0.015))
            if rng.random() < 0.5:  # left-right mirror: both lungs are one class
                x, t = x.flip(-1), t.flip(-1)
            batch_x.append(x)
            batch_t.append(t.float() / 255)
        bx = torch.stack(batch_x)[:, None]
        bt = torch.stack(batch_t)
        bt = bt / bt.sum(1, keepdim=True).clamp_min(1e-6)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(bx)
        loss = loss_fn(logits, bt, per_patch=args.dice == "patch")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == 1:
            rate = step / (time.time() - t0)
            print(f"step {step} loss {loss.item():.4f} ({rate:.1f} it/s)", flush=True)
    print(f"trained {step} iterations in {time.time() - t0:.0f} s", flush=True)
    args.iterations_done = step
    return model.eval()


def export(model: torch.nn.Module, out: Path) -> Path:
    model = model.float().cpu().eval()
    example = torch.zeros(1, 1, *MODEL_YAML["roi_size"])
    with torch.inference_mode():
        traced = torch.jit.trace(model, example)
    path = out / "model.ts"
    traced.save(str(path))
    (out / "model.yaml").write_text(_yaml_text())
    return path


def _yaml_text() -> str:
    header = (
        "# The reference lung CT segmentation model: a DEMONSTRATION, NOT FOR CLINICAL USE.\n"
        "# Trained on synthetic phantoms only (train.py beside this file); see MODEL_CARD.md.\n"
    )
    return header + yaml.safe_dump(MODEL_YAML, sort_keys=False)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def evaluate(model_path: Path, cases: list[PhantomArgs], device: str) -> dict[str, object]:
    """Held-out phantoms through the app's own pipeline at full resolution."""
    config = SegmentationModelConfig.from_yaml(model_path.parent / "model.yaml")
    module = torch.jit.load(str(model_path), map_location=device).eval()

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(batch.to(device)).cpu()

    lungs: list[float] = []
    tumours: list[dict[str, float]] = []
    per_case: list[dict[str, object]] = []
    for args in cases:
        seed = args["seed"]
        p = make_phantom_safely(args)
        spacing = (p.spacing_z, p.pixel_spacing[0], p.pixel_spacing[1])
        started = time.perf_counter()
        classes = segment(p.hu.astype(np.float32), spacing, predictor, config)
        case_seconds = time.perf_counter() - started
        truth = classes_of(p.labels)
        case: dict[str, object] = {
            "seed": seed,
            **{k: args.get(k, True) for k in ("slices", "slice_thickness", "chest")},
        }
        if args.get("chest", True):
            lung_dice = dice(classes == 1, truth == 1)
            case["lung_dice"] = lung_dice
            lungs.append(lung_dice)
        else:
            case["false_lung_ml"] = float((classes == 1).sum()) * p.voxel_volume_mm3 / 1000
        found, _ = ndimage.label(classes == 2)
        for tumour in p.tumours:
            mask = p.labels == tumour.label
            overlapping = np.unique(found[mask])
            predicted = np.isin(found, overlapping[overlapping > 0])
            entry: dict[str, Any] = {
                "type": tumour.type,
                "location": tumour.location,
                "diameter_mm": 2 * tumour.radius_mm,
                "dice": dice(predicted, mask),
                "volume_error": float(predicted.sum() - mask.sum()) / float(mask.sum()),
            }
            tumours.append(entry)
        case["segment_seconds"] = round(case_seconds, 2)
        per_case.append(case)
        print(json.dumps(case), flush=True)
    big = [t for t in tumours if t["diameter_mm"] >= 10]
    small = [t for t in tumours if t["diameter_mm"] < 10]

    def stat(f, values: list[float]) -> float:
        return float(f(values)) if values else math.nan

    groups: dict[str, list[float]] = {}
    for t in big:
        groups.setdefault(t["type"], []).append(t["dice"])
        if t["type"] == "mass":
            groups.setdefault(f"mass, {t['location']}", []).append(t["dice"])
    return {
        "held_out_seeds": [args["seed"] for args in cases],
        "tumour_dice_mean_ge_10mm_by_type": {
            k: {"tumours": len(v), "dice_mean": stat(np.mean, v), "dice_min": stat(np.min, v)}
            for k, v in sorted(groups.items())
        },
        "lung_dice_mean": stat(np.mean, lungs),
        "lung_dice_min": stat(np.min, lungs),
        "tumours_ge_10mm": len(big),
        "tumour_dice_mean_ge_10mm": stat(np.mean, [t["dice"] for t in big]),
        "tumour_dice_min_ge_10mm": stat(np.min, [t["dice"] for t in big]),
        "tumour_abs_volume_error_max_ge_10mm": stat(np.max, [abs(t["volume_error"]) for t in big]),
        "tumours_lt_10mm": len(small),
        "tumour_dice_mean_lt_10mm": stat(np.mean, [t["dice"] for t in small]),
        "cases": per_case,
        "tumours": tumours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--phantoms", type=int, default=160)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="train for this long instead of --iterations (records the count)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=max(1, (multiprocessing.cpu_count())))
    parser.add_argument("--style", choices=STYLES, default="simple")
    parser.add_argument(
        "--simple", type=int, default=0, help="simple phantoms mixed into a realistic run"
    )
    parser.add_argument(
        "--crop", type=int, nargs=3, default=list(CROP), help="training patch (z y x voxels)"
    )
    parser.add_argument("--init", type=Path, help="start from this TorchScript model's weights")
    parser.add_argument(
        "--dice",
        choices=("batch", "patch"),
        help="Dice over the batch or per patch (see loss_fn); default: batch for the simple "
        "style (the 0.1.0 recipe), patch for the realistic one",
    )
    parser.add_argument("--evaluate", type=int, default=12, help="held-out phantoms (0: none)")
    parser.add_argument(
        "--evaluate-masses", type=int, default=0, help="held-out phantoms with one mass each"
    )
    parser.add_argument("--evaluate-only", action="store_true")
    args = parser.parse_args()
    if args.simple and args.style == "simple":
        parser.error("--simple mixes simple phantoms into a --style realistic run")
    if any(n <= 0 or n % 16 for n in args.crop):  # the UNet halves each axis four times
        parser.error(f"--crop {' '.join(map(str, args.crop))}: each must be a multiple of 16")
    if args.dice is None:
        args.dice = "patch" if args.style == "realistic" else "batch"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.evaluate_only:
        model = train(args)
        export(model, args.out)
        if args.out.resolve() != HERE:
            shutil.copy(__file__, args.out / "train.py")
    if args.evaluate or args.evaluate_masses:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cases = [
            phantom_args(seed, args.style)
            for seed in range(FIRST_EVAL_SEED, FIRST_EVAL_SEED + args.evaluate)
        ] + [
            _realistic_args(seed, mass=True)
            for seed in range(FIRST_MASS_SEED, FIRST_MASS_SEED + args.evaluate_masses)
        ]
        metrics = evaluate(args.out / "model.ts", cases, device)
        if not args.evaluate_only:  # else the model's own metrics.json says how it was made
            metrics["training"] = {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("out", "workers", "evaluate_only")
            }
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("cases", "tumours")}))


if __name__ == "__main__":
    main()
