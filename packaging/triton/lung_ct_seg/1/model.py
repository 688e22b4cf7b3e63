"""Triton Python-backend model: the reference lung CT segmentation model (TorchScript).

A DEMONSTRATION, NOT FOR CLINICAL USE: trained on synthetic phantoms only (see
packaging/models/lung_ct_seg/MODEL_CARD.md).

Runs inside Triton's ``triton_python_backend_stub``, not inside radfusion: it imports only
torch, numpy and ``triton_python_backend_utils`` (which the stub provides). The TorchScript
file is the config parameter ``model_file`` (default ``model.ts``), relative to this version
directory unless absolute. ``INPUT__0`` [B, 1, D, H, W] float32 → ``OUTPUT__0`` [B, 3, D, H, W]
float32 logits; D, H and W must be multiples of 16.
"""

import json
import os

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

INPUT = "INPUT__0"
OUTPUT = "OUTPUT__0"
CLASSES = 3  # background, lung, tumour
MULTIPLE = 16  # the UNet halves each spatial axis four times


def _parameter(config, key, default):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _shape_error(shape):
    """Why a request's input shape cannot go through the model, or None."""
    if len(shape) != 5 or shape[1] != 1:
        return f"{INPUT} must be [B, 1, D, H, W], got {list(shape)}"
    spatial = list(shape[2:])
    if any(n <= 0 or n % MULTIPLE for n in spatial):
        return (
            f"{INPUT} spatial shape {spatial} (D, H, W) must be positive multiples of "
            f"{MULTIPLE}; pad the window on the client"
        )
    return None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        path = _parameter(config, "model_file", "model.ts")
        if not os.path.isabs(path):
            path = os.path.join(version_dir, path)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(
                f"{self.name}: TorchScript file {path} not found (config parameter model_file; "
                f"the repository writer copies packaging/models/lung_ct_seg/model.ts there)"
            )

        threads = _parameter(config, "torch_threads", "0")
        try:
            threads = int(threads)
        except ValueError:
            raise pb_utils.TritonModelException(
                f"{self.name}: config parameter torch_threads must be an integer, got {threads!r}"
            ) from None
        if threads > 0:
            torch.set_num_threads(threads)

        if args["model_instance_kind"] == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
        try:
            self.module = torch.jit.load(path, map_location=self.device).eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise pb_utils.TritonModelException(
                f"{self.name}: {path} is not a loadable TorchScript model: {exc}"
            ) from exc
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {path} on {self.device} "
            f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
        )

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}  # spatial shape -> [(request index, tensor)]
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
            if tensor is None:  # Triton checks required inputs; kept for clarity
                responses[i] = _error(
                    f"request has no input {INPUT}", pb_utils.TritonError.INVALID_ARG
                )
                continue
            x = from_dlpack(tensor.to_dlpack())
            problem = _shape_error(tuple(x.shape))
            if problem:
                responses[i] = _error(problem, pb_utils.TritonError.INVALID_ARG)
                continue
            groups.setdefault(tuple(x.shape[2:]), []).append((i, x))

        for spatial, members in groups.items():
            inputs = [x for _, x in members]
            batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
            try:
                with torch.inference_mode():
                    logits = self.module(batch.to(self.device, torch.float32))
            except RuntimeError as exc:
                for i, _ in members:
                    responses[i] = _error(f"{self.name}: inference failed: {exc}")
                continue
            expected = (batch.shape[0], CLASSES, *spatial)
            if tuple(logits.shape) != expected:
                for i, _ in members:
                    responses[i] = _error(
                        f"{self.name}: model gave {list(logits.shape)}, expected {list(expected)}"
                    )
                continue
            logits = logits.to("cpu").contiguous()
            start = 0
            for i, x in members:
                part = logits[start : start + x.shape[0]]
                start += x.shape[0]
                out = pb_utils.Tensor.from_dlpack(OUTPUT, to_dlpack(part))
                responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses

    def finalize(self):
        self.module = None


def _error(message, code=None):
    """An error response; Triton reports ``code`` (default INTERNAL) as the gRPC/HTTP status."""
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
