"""Triton Python-backend model: the reference lung fusion model (TorchScript).

A DEMONSTRATION, NOT FOR CLINICAL USE: trained on synthetic patients only (see
packaging/models/lung_fusion/MODEL_CARD.md).

Runs inside Triton's ``triton_python_backend_stub``: it imports only torch and
``triton_python_backend_utils``. ``INPUT__0`` [B, F + 3] float32 → ``OUTPUT__0`` [B, K]
float32 (model.yaml lists the columns). The TorchScript file is the config parameter
``model_file`` (default ``model.ts``), relative to this version directory unless absolute.
"""

import json
import os

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

INPUT = "INPUT__0"
OUTPUT = "OUTPUT__0"


def _parameter(config, key, default):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        path = _parameter(config, "model_file", "model.ts")
        if not os.path.isabs(path):
            path = os.path.join(args["model_repository"], args["model_version"], path)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(
                f"{self.name}: TorchScript file {path} not found (config parameter model_file)"
            )
        threads = int(_parameter(config, "torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        # A few hundred multiply-adds per patient: the CPU is the right place whatever the
        # instance kind, and no CUDA context is created for it.
        self.module = torch.jit.load(path, map_location="cpu").eval()
        pb_utils.Logger.log_info(f"{self.name}: loaded {path} (torch {torch.__version__})")

    def execute(self, requests):
        responses = []
        for request in requests:
            x = from_dlpack(pb_utils.get_input_tensor_by_name(request, INPUT).to_dlpack())
            if x.dim() != 2:
                responses.append(_error(f"{INPUT} must be [B, F + 3], got {list(x.shape)}"))
                continue
            try:
                with torch.inference_mode():
                    y = self.module(x.to("cpu", torch.float32)).contiguous()
            except RuntimeError as exc:
                responses.append(_error(f"{self.name}: inference failed: {exc}"))
                continue
            out = pb_utils.Tensor.from_dlpack(OUTPUT, to_dlpack(y))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        self.module = None


def _error(message):
    error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
