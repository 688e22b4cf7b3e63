"""TritonPredictor's own logic against a scripted client: shared-memory fallback, which errors
are retried, batch splitting. The same paths run against the real server in
tests/integration/test_triton.py."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from radfusion.config import TritonConfig
from radfusion.integrations.inference.triton import (
    TritonError,
    TritonPredictor,
    TritonUnavailable,
)


class _Result:
    def __init__(self, y: np.ndarray) -> None:
        self.y = y

    def as_numpy(self, name: str) -> np.ndarray:
        return self.y


class ScriptedClient:
    """Answers like a Triton gRPC client; ``failures`` are raised by the next infer calls."""

    def __init__(self, server: Scripted) -> None:
        # Weak, as a real client has no reference back to the predictor.
        self.server = weakref.proxy(server)

    def is_server_ready(self, **kw: Any) -> bool:
        return True

    def is_model_ready(self, name: str, version: str = "", **kw: Any) -> bool:
        return name == "m"

    def get_server_metadata(self, as_json: bool = False, **kw: Any) -> dict[str, Any]:
        return {"name": "triton", "version": "9.9.9"}

    def get_model_metadata(
        self, name: str, version: str = "", as_json: bool = False, **kw: Any
    ) -> Any:
        return {
            "versions": ["1", "2"],
            "inputs": [{"name": "IN", "datatype": "FP32", "shape": ["-1", "1", "-1", "-1", "-1"]}],
            "outputs": [{"name": "OUT", "datatype": "FP32", "shape": ["-1", "2", "-1", "-1"]}],
        }

    def get_model_config(
        self, name: str, version: str = "", as_json: bool = False, **kw: Any
    ) -> Any:
        return {"config": {"name": name, "max_batch_size": self.server.max_batch}}

    def register_system_shared_memory(self, name: str, key: str, size: int) -> None:
        self.server.registrations += 1
        if self.server.remote:
            raise InferenceServerException(
                "Unable to open shared memory region", status="StatusCode.INTERNAL"
            )

    def unregister_system_shared_memory(self, name: str) -> None:
        pass

    def infer(self, model: str, inputs: list[Any], **kw: Any) -> _Result:
        self.server.calls += 1
        if self.server.failures:
            raise self.server.failures.pop(0)
        (tensor,) = inputs
        x = np.frombuffer(tensor._get_content(), dtype=np.float32).reshape(tensor.shape())
        return _Result(np.concatenate([x, -x], axis=1))  # two "classes"

    def close(self) -> None:
        pass


class Scripted(TritonPredictor):
    remote = False
    max_batch = 4

    def __init__(self, config: TritonConfig, failures: list[BaseException] = ()) -> None:  # type: ignore[assignment]
        self.failures = list(failures)
        self.calls = 0
        self.registrations = 0
        super().__init__(config, "m")

    def _new_client(self) -> ScriptedClient:
        return ScriptedClient(self)


def _config(**kw: Any) -> TritonConfig:
    retry = {"attempts": 3, "initial_backoff_s": 0.0}
    return TritonConfig(url="triton.example:8001", retry=retry, **kw)


def test_identity_names_latest_version_and_server() -> None:
    p = Scripted(_config(shared_memory="off"))
    assert p.identity.describe() == "m/2 on Triton 9.9.9"


def test_batches_are_split_into_requests_and_reassembled_in_order() -> None:
    p = Scripted(_config(shared_memory="off", batch_size=2, max_in_flight=3))
    x = torch.arange(5 * 8, dtype=torch.float32).reshape(5, 1, 2, 2, 2)
    y = p(x)
    assert p.calls == 3  # 2 + 2 + 1 patches
    torch.testing.assert_close(y[:, :1], x)
    torch.testing.assert_close(y[:, 1:], -x)
    assert p.windows_per_call == 6


def test_remote_server_falls_back_to_the_network_in_auto_mode() -> None:
    class Remote(Scripted):
        remote = True

    p = Remote(_config(shared_memory="auto"))
    x = torch.ones(1, 1, 2, 2, 2)
    torch.testing.assert_close(p(x)[:, :1], x)
    assert p._use_shm is False and p.registrations == 1
    p(x)
    assert p.registrations == 1  # decided once, not per request
    p.close()


def test_shared_memory_required_but_unusable_is_an_error() -> None:
    class Remote(Scripted):
        remote = True

    p = Remote(_config(shared_memory="system"))
    with pytest.raises(TritonError, match="Unable to open shared memory region") as err:
        p(torch.ones(1, 1, 2, 2, 2))
    # A configuration error: not retried, not reported as a passing outage.
    assert not isinstance(err.value, TritonUnavailable) and p.registrations == 1


def test_batch_size_above_the_models_limit_is_refused_at_start() -> None:
    with pytest.raises(TritonError, match="at most 4 patches per request"):
        Scripted(_config(shared_memory="off", batch_size=8))


def test_an_unclosed_predictor_is_collected() -> None:
    import gc

    p = Scripted(_config(shared_memory="off"))
    p(torch.ones(1, 1, 2, 2, 2))
    ref = weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None  # its threads and connections go with it


def test_transient_errors_are_retried() -> None:
    failures = [
        InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"),
        InferenceServerException("overloaded", status="StatusCode.RESOURCE_EXHAUSTED"),
    ]
    p = Scripted(_config(shared_memory="off"), failures)
    p(torch.ones(1, 1, 2, 2, 2))
    assert p.calls == 3


@pytest.mark.parametrize(
    "failure",
    [
        InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"),
        InferenceServerException("Gateway Timeout", status="504"),
        type("Timeout", (Exception,), {})("network timeout"),  # geventhttpclient's
    ],
)
def test_a_timed_out_request_is_not_sent_again_at_once(failure: Exception) -> None:
    p = Scripted(_config(shared_memory="off"), [failure])
    with pytest.raises(TritonUnavailable, match="may still be computing it"):
        p(torch.ones(1, 1, 2, 2, 2))
    assert p.calls == 1  # the job fails as transient; jobs.retry runs it later


def test_retries_run_out_as_unavailable_naming_the_server() -> None:
    failures = [ConnectionRefusedError("refused")] * 3
    p = Scripted(_config(shared_memory="off"), failures)
    with pytest.raises(TritonUnavailable, match=r"Triton at triton\.example:8001.*3 attempts"):
        p(torch.ones(1, 1, 2, 2, 2))


def test_rejected_input_is_not_retried() -> None:
    failures = [InferenceServerException("bad shape", status="StatusCode.INVALID_ARGUMENT")]
    p = Scripted(_config(shared_memory="off"), failures)
    with pytest.raises(TritonError, match="bad shape") as err:
        p(torch.ones(1, 1, 2, 2, 2))
    assert not isinstance(err.value, TritonUnavailable) and p.calls == 1


def test_model_with_two_inputs_is_refused() -> None:
    class TwoInputs(ScriptedClient):
        def get_model_metadata(self, *a: Any, **kw: Any) -> Any:
            meta = super().get_model_metadata(*a, **kw)
            meta["inputs"] = meta["inputs"] * 2
            return meta

    class P(Scripted):
        def _new_client(self) -> ScriptedClient:
            return TwoInputs(self)

    with pytest.raises(TritonError, match="2 input"):
        P(_config())


def test_a_full_dev_shm_falls_back_to_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    class Tiny:
        f_bavail, f_frsize = 16, 4096  # 64 KiB free

    monkeypatch.setattr(os, "statvfs", lambda path: Tiny())
    p = Scripted(_config(shared_memory="auto"))
    x = torch.ones(1, 1, 2, 2, 2)
    torch.testing.assert_close(p(x)[:, :1], x)
    assert p._use_shm is False and p.registrations == 0  # nothing was written to /dev/shm
