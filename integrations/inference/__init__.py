"""Where models run: in this process (TorchScript) or on a Triton Inference Server."""
