"""A :data:`~radfusion.operators.segmentation_model.Predictor` that runs on a Triton server.

The operators call a predictor with a batch of sliding-window patches ``[B, 1, D, H, W]``
and get logits ``[B, C, D, H, W]`` back; they do not know where the model runs. This one
sends the patches to a Triton Inference Server:

- gRPC with binary tensors (default) or HTTP;
- system shared memory when the server shares this host's ``/dev/shm`` (``auto`` finds out by
  registering a region: a remote server cannot open it, and the tensors then go over the wire);
- the batch split into requests of ``batch_size`` patches, up to ``max_in_flight`` of them at
  once, each with its own connection and shared-memory regions;
- a readiness check when it is created, and errors that name the server, model and version;
- retries with backoff on transient errors (server unreachable, restarted, overloaded); a
  request that timed out is not sent again at once (it may still be running on the server).

Raises from calls: :class:`TritonUnavailable` when the server could not be reached after the
retries (a transient condition: the job may succeed later), :class:`TritonError` for
everything a retry cannot fix (unknown model, rejected input).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radfusion.config import TritonConfig
from radfusion.errors import RadfusionError, Unavailable

__all__ = [
    "TritonError",
    "TritonIdentity",
    "TritonModelNotReady",
    "TritonPredictor",
    "TritonUnavailable",
]

log = logging.getLogger("radfusion.inference.triton")

# Status strings of tritonclient's InferenceServerException (gRPC codes, HTTP status codes)
# for conditions that can pass: the server is starting, restarting, overloaded or slow.
_TRANSIENT = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED",
    "StatusCode.CANCELLED",
    "502",
    "503",
    "504",
}
# The Python backend answers INTERNAL when its stub process died (e.g. killed for memory);
# a server operator must reload the model, which may happen while we back off.
_DEAD_STUB = "is not healthy"
# A request that ran past its timeout may still be computing on the server: sending it again at
# once doubles the load on a server that is already too slow. It fails the job as unavailable
# (Unavailable: the service queues the job again later, jobs.retry) without an immediate retry.
_TIMED_OUT = {"StatusCode.DEADLINE_EXCEEDED", "504"}
# The server no longer knows a region we registered (it restarted): register again and retry.
# Other shared-memory errors (cannot open, too small, /dev/shm full) are configuration errors.
_SHM_LOST = "unable to find system shared memory region"


class TritonError(RadfusionError, RuntimeError):
    """Inference on Triton failed in a way a retry cannot fix (the message says which server,
    model and version, and what the server answered)."""


class TritonUnavailable(TritonError, Unavailable):
    """The Triton server could not be reached or did not answer in time, after all retries
    (the service queues the job again later, ``jobs.retry``)."""


class TritonModelNotReady(TritonError):
    """The server is up but the model (or that version) is missing or not loaded."""


@dataclass(frozen=True)
class TritonIdentity:
    """What results say about where their model ran (algorithm identification)."""

    url: str
    server_version: str
    model_name: str
    model_version: str
    weights_sha256: str | None = None  # config parameter model_sha256, when the repo has it

    def describe(self) -> str:
        return f"{self.model_name}/{self.model_version} on Triton {self.server_version}"


def _is_transient(err: BaseException) -> bool:
    from tritonclient.utils import InferenceServerException

    if isinstance(err, InferenceServerException):
        text = str(err.message() or "")
        return (err.status() or "") in _TRANSIENT or _DEAD_STUB in text
    # The HTTP client raises plain socket errors (refused, reset, closed mid-response).
    return isinstance(err, OSError | ConnectionError) or type(err).__name__ in {
        "HTTPConnectionClosed",
        "Timeout",
    }


def _timed_out(err: BaseException) -> bool:
    from tritonclient.utils import InferenceServerException

    if isinstance(err, InferenceServerException):
        return (err.status() or "") in _TIMED_OUT
    # The HTTP client's network timeout (geventhttpclient); a socket TimeoutError may be a
    # connect timeout, before anything was sent, and is retried like any connection error.
    return type(err).__name__ == "Timeout"


class _ShmFull(OSError):
    """/dev/shm has too little room for a region."""


def _check_shm_space(nbytes: int) -> None:
    """Refuse a region /dev/shm cannot hold: tmpfs allocates on write, and a full tmpfs kills
    the writing process with SIGBUS instead of raising (Docker's default /dev/shm is 64 MiB)."""
    stat = os.statvfs("/dev/shm")
    free = stat.f_bavail * stat.f_frsize
    if free < nbytes + (64 << 20):
        raise _ShmFull(f"/dev/shm has {free >> 20} MiB free, a region needs {nbytes >> 20} MiB")


class _Slot:
    """One request in flight: a client connection and, with shared memory, its regions."""

    def __init__(self, owner: TritonPredictor, index: int) -> None:
        # Weak: the predictor's finalizer holds the slots, and a strong reference back would
        # keep the predictor (its threads, connections and regions) alive until exit.
        self._owner = weakref.ref(owner)
        self.index = index
        self.client: Any = None
        self.regions: dict[str, tuple[str, Any, int]] = {}  # role → (name, handle, bytes)

    @property
    def owner(self) -> TritonPredictor:
        owner = self._owner()
        if owner is None:
            raise TritonError("the predictor was closed")
        return owner

    def connect(self) -> Any:
        if self.client is None:
            self.client = self.owner._new_client()
        return self.client

    def region(self, role: str, nbytes: int) -> str | None:
        """Name of a registered region of at least ``nbytes`` for ``role``, or None when
        tensors go over the wire."""
        if not self.owner._use_shm:
            return None
        have = self.regions.get(role)
        if have is not None and have[2] >= nbytes:
            return have[0]
        import tritonclient.utils.shared_memory as shm

        self.drop_region(role)
        owner = self.owner
        name = f"radfusion-{owner._token}-{self.index}-{role}"
        handle = None
        try:
            _check_shm_space(nbytes)
            handle = shm.create_shared_memory_region(name, f"/{name}", nbytes)
            self.connect().register_system_shared_memory(name, f"/{name}", nbytes)
        except Exception as err:
            if handle is not None:
                shm.destroy_shared_memory_region(handle)
            if _is_transient(err) and not isinstance(err, _ShmFull):
                raise
            if owner._shm_mode == "auto":
                owner._shm_unusable(err)
                return None
            raise TritonError(
                f"{owner._where()}: system shared memory is configured but unusable: {err}"
            ) from err
        self.regions[role] = (name, handle, nbytes)
        return name

    def drop_region(self, role: str) -> None:
        import tritonclient.utils.shared_memory as shm

        have = self.regions.pop(role, None)
        if have is None:
            return
        name, handle, _ = have
        with contextlib.suppress(Exception):
            self.client.unregister_system_shared_memory(name)
        with contextlib.suppress(Exception):
            shm.destroy_shared_memory_region(handle)

    def reset(self) -> None:
        """Forget the connection and regions (after an error: the server may have restarted
        and lost its registrations)."""
        for role in list(self.regions):
            self.drop_region(role)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        self.client = None


def _release(pool: ThreadPoolExecutor, slots: list[_Slot]) -> None:
    pool.shutdown(wait=True)
    for slot in slots:
        slot.reset()


class TritonPredictor:
    """Runs a model on a Triton server; callable like the in-process TorchScript predictor.

    Args:
        config: server connection (``triton:`` in the configuration).
        model_name: the model's name in the server's repository.
        model_version: a version number, or ``""`` for the server's choice (latest ready).

    Raises:
        TritonUnavailable: the server is not reachable (within ``config.connect_timeout_s``).
        TritonModelNotReady: the model or version is not loaded; the message lists what the
            server does have.
        TritonError: the model's inputs and outputs are not one FP32 input and one FP32
            output.
    """

    def __init__(self, config: TritonConfig, model_name: str, model_version: str = "") -> None:
        self.config = config
        self.model_name = model_name
        self.model_version = model_version
        self._token = uuid.uuid4().hex[:12]
        self._shm_mode = config.shared_memory
        self._use_shm = config.shared_memory != "off"
        self._lock = threading.Lock()
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._all_slots = [_Slot(self, i) for i in range(config.max_in_flight)]
        for slot in self._all_slots:
            self._slots.put(slot)
        self._pool = ThreadPoolExecutor(config.max_in_flight, thread_name_prefix="triton")
        # Shared-memory regions outlive the process unless destroyed: release them at exit
        # even when nobody calls close().
        self._finalizer = weakref.finalize(self, _release, self._pool, self._all_slots)
        self.identity = self._check_ready()

    # -- set-up -----------------------------------------------------------------------------

    @property
    def windows_per_call(self) -> int:
        """How many sliding-window patches to hand over per call, to keep every slot busy."""
        return self.config.batch_size * self.config.max_in_flight

    def _where(self) -> str:
        version = self.model_version or "latest"
        return f"model {self.model_name!r} version {version} on Triton at {self.config.url}"

    def _new_client(self) -> Any:
        c = self.config
        if c.protocol == "http":
            import tritonclient.http as httpclient

            return httpclient.InferenceServerClient(
                c.url,
                connection_timeout=max(1.0, c.connect_timeout_s),
                network_timeout=c.timeout_s,
                ssl=c.tls is not None,
                ssl_options=(
                    {"ca_certs": str(c.tls.root_certificates)}
                    if c.tls is not None and c.tls.root_certificates
                    else None
                ),
            )
        import tritonclient.grpc as grpcclient

        tls = c.tls
        return grpcclient.InferenceServerClient(
            c.url,
            ssl=tls is not None,
            root_certificates=str(tls.root_certificates) if tls and tls.root_certificates else None,
            private_key=str(tls.private_key) if tls and tls.private_key else None,
            certificate_chain=(
                str(tls.certificate_chain) if tls and tls.certificate_chain else None
            ),
        )

    def _check_ready(self) -> TritonIdentity:
        try:
            client = self._new_client()
        except (OSError, ValueError) as err:  # e.g. a TLS file that cannot be read
            raise TritonError(f"{self._where()}: cannot set up the client: {err}") from err
        try:
            deadline = time.monotonic() + self.config.connect_timeout_s
            while True:
                try:
                    if client.is_server_ready(**self._timeout()):
                        break
                    problem = "the server is not ready"
                except Exception as err:
                    if not _is_transient(err):
                        raise TritonError(f"{self._where()}: {err}") from err
                    problem = f"cannot connect: {err}"
                if time.monotonic() >= deadline:
                    raise TritonUnavailable(f"{self._where()}: {problem}")
                time.sleep(0.5)
            try:
                server_version = str(self._server_metadata(client).get("version", "unknown"))
                ready = client.is_model_ready(
                    self.model_name, self.model_version, **self._timeout()
                )
                if not ready:
                    raise TritonModelNotReady(
                        f"{self._where()} is not ready; the server has: {self._inventory(client)}"
                    )
                metadata = self._model_metadata(client)
                model_config = self._model_config(client)
            except TritonError:
                raise
            except Exception as err:
                kind = TritonUnavailable if _is_transient(err) else TritonError
                raise kind(f"{self._where()}: {err}") from err
        finally:
            with contextlib.suppress(Exception):
                client.close()
        max_batch = int(model_config.get("max_batch_size", 0) or 0)
        if max_batch and self.config.batch_size > max_batch:
            raise TritonError(
                f"{self._where()} takes at most {max_batch} patches per request; "
                f"triton.batch_size is {self.config.batch_size}"
            )
        inputs, outputs = metadata.get("inputs", []), metadata.get("outputs", [])
        if len(inputs) != 1 or len(outputs) != 1:
            raise TritonError(
                f"{self._where()} has {len(inputs)} input(s) and {len(outputs)} output(s); "
                "a segmentation predictor needs exactly one of each"
            )
        for tensor in (*inputs, *outputs):
            if tensor.get("datatype") != "FP32":
                raise TritonError(
                    f"{self._where()}: tensor {tensor.get('name')} is {tensor.get('datatype')}, "
                    "expected FP32"
                )
        self._input_name = str(inputs[0]["name"])
        self._output_name = str(outputs[0]["name"])
        out_dims = [int(d) for d in outputs[0].get("shape", [])]
        # [-1 (batch), C, D, H, W]: with C known, outputs can go to shared memory.
        self._channels = out_dims[1] if len(out_dims) == 5 and out_dims[1] > 0 else None
        versions = [str(v) for v in metadata.get("versions", [])]
        identity = TritonIdentity(
            url=self.config.url,
            server_version=server_version,
            model_name=self.model_name,
            model_version=self.model_version or (max(versions, key=int) if versions else "?"),
            weights_sha256=(
                (model_config.get("parameters") or {}).get("model_sha256", {}).get("string_value")
                or None
            ),
        )
        log.info("inference on %s (%s)", identity.describe(), self.config.protocol)
        return identity

    def _timeout(self) -> dict[str, float]:
        """Keyword arguments bounding one start-up call (the HTTP client is bounded by its
        connection timeout instead)."""
        if self.config.protocol == "grpc":
            return {"client_timeout": max(1.0, self.config.connect_timeout_s)}
        return {}

    def _server_metadata(self, client: Any) -> dict[str, Any]:
        if self.config.protocol == "grpc":
            return dict(client.get_server_metadata(as_json=True, **self._timeout()))
        return dict(client.get_server_metadata())

    def _model_metadata(self, client: Any) -> dict[str, Any]:
        if self.config.protocol == "grpc":
            return dict(
                client.get_model_metadata(
                    self.model_name, self.model_version, as_json=True, **self._timeout()
                )
            )
        return dict(client.get_model_metadata(self.model_name, self.model_version))

    def _model_config(self, client: Any) -> dict[str, Any]:
        """The served model's configuration (as JSON)."""
        if self.config.protocol == "grpc":
            config = client.get_model_config(
                self.model_name, self.model_version, as_json=True, **self._timeout()
            )
            return dict(config.get("config", config))
        return dict(client.get_model_config(self.model_name, self.model_version))

    def _inventory(self, client: Any) -> str:
        try:
            if self.config.protocol == "grpc":
                index = client.get_model_repository_index(as_json=True).get("models", [])
            else:
                index = client.get_model_repository_index()
        except Exception as err:  # the listing is a courtesy in an error message
            return f"(cannot list models: {err})"
        items = [
            f"{m.get('name')}/{m.get('version', '?')} ({m.get('state', 'UNKNOWN')})" for m in index
        ]
        return ", ".join(items) or "no models"

    def _shm_unusable(self, err: BaseException) -> None:
        with self._lock:
            if self._use_shm:
                self._use_shm = False
                log.info(
                    "Triton at %s cannot use this host's shared memory (%s); tensors go over "
                    "the network",
                    self.config.url,
                    getattr(err, "message", lambda: str(err))(),
                )

    # -- inference --------------------------------------------------------------------------

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for ``batch`` ``[B, 1, D, H, W]``, as ``[B, C, D, H, W]`` float32 on CPU."""
        x = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        if x.shape[0] == 0:
            raise ValueError("an empty batch has nothing to infer")
        size = self.config.batch_size
        parts = [x[i : i + size] for i in range(0, x.shape[0], size)]
        results = list(self._pool.map(self._infer_with_retries, parts))
        y = results[0] if len(results) == 1 else np.concatenate(results)
        # Tensors decoded from a response are read-only views of its buffer; torch needs to own
        # writable memory (the sliding window adds into it).
        return torch.from_numpy(y if y.flags.writeable else y.copy())

    @contextlib.contextmanager
    def _slot(self) -> Iterator[_Slot]:
        slot = self._slots.get()
        try:
            yield slot
        finally:
            self._slots.put(slot)

    def _infer_with_retries(self, x: np.ndarray) -> np.ndarray:
        delays = self.config.retry.delays()
        with self._slot() as slot:
            for attempt in range(len(delays) + 1):
                try:
                    return self._infer(slot, x)
                except TritonError:
                    slot.reset()
                    raise
                except Exception as err:
                    slot.reset()
                    lost_shm = _SHM_LOST in str(err).lower()
                    if not (_is_transient(err) or lost_shm):
                        raise TritonError(f"{self._where()}: {err}") from err
                    if _timed_out(err):
                        raise TritonUnavailable(
                            f"{self._where()}: no answer within {self.config.timeout_s:g} s "
                            f"({err}); not sent again now, as the server may still be "
                            "computing it"
                        ) from err
                    if attempt == len(delays):
                        raise TritonUnavailable(
                            f"{self._where()}: {err} (after {attempt + 1} attempts)"
                        ) from err
                    log.warning(
                        "Triton request failed (%s); retry %d of %d in %.1f s",
                        err,
                        attempt + 1,
                        len(delays),
                        delays[attempt],
                    )
                    time.sleep(delays[attempt])
        raise AssertionError("unreachable")

    def _infer(self, slot: _Slot, x: np.ndarray) -> np.ndarray:
        protocol = self.config.protocol
        if protocol == "grpc":
            import tritonclient.grpc as client_module
        else:
            import tritonclient.http as client_module
        client = slot.connect()
        request = client_module.InferInput(self._input_name, list(x.shape), "FP32")
        output = client_module.InferRequestedOutput(self._output_name)
        in_region = slot.region("in", x.nbytes)
        out_bytes = x.nbytes * (self._channels or 0) // max(1, x.shape[1])
        out_region = slot.region("out", out_bytes) if in_region and out_bytes else None
        if in_region:
            import tritonclient.utils.shared_memory as shm

            shm.set_shared_memory_region(slot.regions["in"][1], [x])
            request.set_shared_memory(in_region, x.nbytes)
        elif protocol == "http":
            request.set_data_from_numpy(x, binary_data=True)
        else:
            request.set_data_from_numpy(x)
        if out_region:
            output.set_shared_memory(out_region, out_bytes)
        kwargs: dict[str, Any] = {"model_version": self.model_version, "outputs": [output]}
        if protocol == "grpc":
            kwargs["client_timeout"] = self.config.timeout_s
        result = client.infer(self.model_name, [request], **kwargs)
        if out_region:
            import tritonclient.utils.shared_memory as shm

            meta = result.get_output(self._output_name)
            shape = [int(d) for d in (meta["shape"] if isinstance(meta, dict) else meta.shape)]
            # A view into the region, which the next request overwrites: copy it out.
            return np.array(
                shm.get_contents_as_numpy(slot.regions["out"][1], np.float32, shape), copy=True
            )
        y = result.as_numpy(self._output_name)
        if y is None:
            raise TritonError(f"{self._where()}: the response has no {self._output_name}")
        return y

    def close(self) -> None:
        """Release connections and shared-memory regions."""
        self._finalizer()

    def __enter__(self) -> TritonPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
