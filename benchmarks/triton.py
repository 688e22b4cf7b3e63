"""Segmentation of one 300-slice chest CT through three inference paths, side by side.

(a) in process: the TorchScript model in this process;
(b) radfusion: :class:`TritonPredictor` (gRPC, binary tensors, system shared memory when the
    server is on this host, patches in concurrent requests);
(c) SDK: MONAI Deploy's ``TritonRemoteModel`` (HTTP, input as JSON), on the same server and
    model.

Each path segments the same volume with the same sliding-window settings. Per path: the
segmentation's inference stage, the time spent inside predictor calls, the server's compute
time over the same calls (Triton statistics API: compute_input + compute_infer +
compute_output), and the transport overhead = predictor time - server compute. The last line
is ``triton overhead ratio sdk/radfusion: X.X``.

Goals (issue 4): radfusion's overhead <= 15 % of in-process inference time, and >= 5x less
than the SDK path's.

By default a local ``tritonserver`` (``make .triton``; CPU, Python backend) is started on a
fresh repository. ``--grpc-url``/``--http-url`` use a running server instead (e.g. a GPU
server with ``radfusion triton repo`` served); ``--gpu`` writes the local repository with
KIND_GPU.

    .venv/bin/python benchmarks/triton.py [--slices 300] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from radfusion.config import TritonConfig
from radfusion.integrations.inference.repository import write_repository
from radfusion.integrations.inference.triton import TritonPredictor
from radfusion.operators.segmentation_model import (
    SegmentationModelConfig,
    default_model_config_path,
    load_torchscript,
    segment,
)
from radfusion.synth.ct import make_phantom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/
from tests.triton_server import LocalTritonServer

MODEL = "lung_ct_seg"


class Timed:
    """Wraps a predictor; adds up the wall time spent inside its calls."""

    def __init__(self, predictor: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.predictor = predictor
        self.seconds = 0.0
        self.windows = 0
        self.windows_per_call = getattr(predictor, "windows_per_call", 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = self.predictor(batch)
        self.seconds += time.perf_counter() - t
        self.windows += batch.shape[0]
        return out


def server_compute_s(http_url: str) -> float:
    """Cumulative compute time (input + infer + output) of the model's executions on the
    server. Taken from ``batch_stats`` (one entry per executed batch): the per-request
    ``inference_stats`` charge every request in a dynamic batch the whole batch's time, which
    would count concurrent requests twice."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{MODEL}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"]
    total_ns = 0
    for model in stats:
        for batch in model.get("batch_stats") or []:
            total_ns += sum(
                int(batch[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output")
            )
    return total_ns / 1e9


def run_path(
    name: str,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    volume: tuple[object, tuple[float, float, float]],
    model: SegmentationModelConfig,
    runs: int,
    http_url: str | None,
) -> dict[str, float]:
    hu, spacing = volume
    timed = Timed(predictor)
    segment(hu, spacing, timed, model, windows_per_call=timed.windows_per_call)  # warm-up
    results = []
    for _ in range(runs):
        timed.seconds, timed.windows = 0.0, 0
        before = server_compute_s(http_url) if http_url else 0.0
        timings: dict[str, float] = {}
        segment(hu, spacing, timed, model, timings=timings, windows_per_call=timed.windows_per_call)
        time.sleep(0.3)  # Triton updates statistics just after each response
        compute = server_compute_s(http_url) - before if http_url else timed.seconds
        results.append(
            {
                "inference_s": timings["inference"],
                "predictor_s": timed.seconds,
                "server_compute_s": compute,
                "overhead_s": timed.seconds - compute,
                "windows": timed.windows,
            }
        )
    median = {k: statistics.median(r[k] for r in results) for k in results[0]}
    m = median
    print(
        f"{name:<11} inference {m['inference_s']:7.2f} s  predictor {m['predictor_s']:7.2f} s  "
        f"server compute {m['server_compute_s']:7.2f} s  overhead {m['overhead_s']:6.2f} s  "
        f"({int(m['windows'])} windows)",
        flush=True,
    )
    return median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=1, help="timed runs per path (median)")
    parser.add_argument("--grpc-url", help="a running server's gRPC host:port")
    parser.add_argument("--http-url", help="the same server's HTTP host:port")
    parser.add_argument("--gpu", action="store_true", help="local repository with KIND_GPU")
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--skip-sdk", action="store_true")
    args = parser.parse_args()

    model = SegmentationModelConfig.from_yaml(default_model_config_path())
    phantom = make_phantom(
        slices=args.slices,
        rows=args.size,
        columns=args.size,
        seed=11,
        pixel_spacing=0.7 * 512 / args.size,
        slice_thickness=1.0,
    )
    volume = (phantom.hu, (phantom.slice_thickness, *phantom.pixel_spacing))
    print(
        f"volume {phantom.hu.shape} at {volume[1]} mm; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cuda {torch.cuda.is_available()}",
        flush=True,
    )

    server = None
    if bool(args.grpc_url) != bool(args.http_url):
        parser.error("--grpc-url and --http-url go together (the statistics come over HTTP)")
    if args.grpc_url and args.http_url:
        grpc_url, http_url = args.grpc_url, args.http_url
    else:
        repo = Path(tempfile.mkdtemp(prefix="radfusion-bench-repo-"))
        write_repository(repo, cpu=not args.gpu, backend="python")
        t = time.perf_counter()
        server = LocalTritonServer(repo, [MODEL]).start()
        print(f"tritonserver ready in {time.perf_counter() - t:.1f} s", flush=True)
        grpc_url, http_url = server.grpc_url, server.http_url

    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        module = torch.jit.load(str(model.model_path), map_location=device).eval()

        def in_process(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(batch.to(device)).cpu()

        local = run_path(
            "in-process",
            in_process if device == "cuda" else load_torchscript(model.model_path),
            volume,
            model,
            args.runs,
            None,
        )
        config = TritonConfig(
            url=grpc_url, max_in_flight=args.max_in_flight, batch_size=args.batch_size
        )
        with TritonPredictor(config, MODEL) as predictor:
            ours = run_path("radfusion", predictor, volume, model, args.runs, http_url)
            print(f"  radfusion shared memory: {predictor._use_shm}", flush=True)
        sdk = None
        if not args.skip_sdk:
            from monai.deploy.core.models.triton_model import (
                TritonRemoteModel,
                parse_triton_config_pbtxt,
            )

            # The SDK reads the model's inputs and outputs from its config.pbtxt.
            configs = Path(tempfile.mkdtemp(prefix="radfusion-bench-cfg-"))
            write_repository(configs, cpu=True, backend="python")
            pbtxt = parse_triton_config_pbtxt(configs / MODEL / "config.pbtxt")
            remote = TritonRemoteModel(MODEL, http_url, pbtxt)
            sdk = run_path("SDK", remote, volume, model, args.runs, http_url)
    finally:
        if server is not None:
            server.close()

    base = local["predictor_s"]
    print(
        f"radfusion overhead: {ours['overhead_s']:.2f} s = "
        f"{100 * ours['overhead_s'] / base:.1f} % of in-process inference ({base:.2f} s); "
        "goal <= 15 %"
    )
    if sdk is None:
        return 0
    print(f"SDK overhead: {sdk['overhead_s']:.2f} s = {100 * sdk['overhead_s'] / base:.1f} %")
    ratio = sdk["overhead_s"] / max(ours["overhead_s"], 1e-3)
    print(f"triton overhead ratio sdk/radfusion: {ratio:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
