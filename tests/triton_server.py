"""Start the real ``tritonserver`` binary on this host, for tests, benchmarks and trials.

A hospital runs NVIDIA's Triton container on a GPU server (see packaging/triton/README.md);
this module is for machines without it. The ``nvidia-pytriton`` wheel carries a complete
``tritonserver`` (2.51) with the Python backend; ``make .triton`` unpacks it (no dependencies)
into ``.triton/``. The Python backend's stub runs this interpreter's environment, so the
models' ``model.py`` find torch where radfusion finds it.

Why the start-up looks the way it does (each point was checked by leaving it out):

- The stub is copied beside ``libtriton_python.so`` in a private backend directory, and
  ``nvidia_pytriton.libs`` goes on ``LD_LIBRARY_PATH`` because the copy's RPATH no longer
  resolves. The interpreter's own ``libpython`` directory goes first: otherwise the stub may
  link Debian's libpython while loading another interpreter's standard library.
- The stub ignores ``PYTHONPATH`` (isolated mode) and finds its environment through the
  ``python3`` first on ``PATH``: this interpreter's ``bin`` goes first.
- The server runs in its own session from a neutral working directory; stopping it kills the
  whole process group, because Python stubs outlive a killed server and ignore SIGTERM.
- A unique shared-memory prefix lets :meth:`LocalTritonServer.stop` delete the regions a
  killed server leaves in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LocalTritonServer", "TritonServerNotFound", "find_tritonserver"]

_DEFAULT_HOME = Path(__file__).resolve().parents[1] / ".triton"


class TritonServerNotFound(FileNotFoundError):
    """No ``tritonserver`` installation where one was expected."""


def find_tritonserver(home: Path | None = None) -> Path:
    """The ``pytriton/tritonserver`` folder of an unpacked ``nvidia-pytriton`` wheel.

    Looked for in ``home``, else ``$RADFUSION_TRITON_HOME``, else ``.triton/`` in the source
    tree (what ``make .triton`` writes).

    Raises:
        TritonServerNotFound: there is no ``tritonserver`` binary there.
    """
    base = Path(home or os.environ.get("RADFUSION_TRITON_HOME") or _DEFAULT_HOME)
    root = base / "pytriton" / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonServerNotFound(
            f"no tritonserver under {base} (run `make .triton`, or set RADFUSION_TRITON_HOME "
            "to a folder where `pip install --no-deps --target DIR nvidia-pytriton==0.7.0` ran)"
        )
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalTritonServer:
    """One ``tritonserver`` process serving ``repository`` on 127.0.0.1.

    Args:
        repository: a model repository (``radfusion triton repo --cpu --backend python``).
        models: the models to load (explicit model control, so a model can be reloaded).
        home: where the ``nvidia-pytriton`` wheel was unpacked (see :func:`find_tritonserver`).
        grpc_port, http_port: fixed ports; by default free ones are picked.
        extra_args: more ``tritonserver`` options (e.g. ``--grpc-use-ssl=true`` and its
            certificate files).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        repository: Path,
        models: list[str],
        *,
        home: Path | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.root = find_tritonserver(home)
        self.extra_args = list(extra_args)
        self.repository = Path(repository).resolve()
        self.models = list(models)
        self.grpc_port = grpc_port or _free_port()
        self.http_port = http_port or _free_port()
        self.shm_prefix = f"radfusion-triton-{uuid.uuid4().hex[:8]}-"
        self._work = Path(tempfile.mkdtemp(prefix="radfusion-triton-"))
        self._backends = self._backend_dir()
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = self._work / "tritonserver.log"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _backend_dir(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonServerNotFound(f"no Python {version} backend stub in {self.root}")
        backends = self._work / "backends"
        shutil.copytree(self.root / "backends" / "python", backends / "python")
        shutil.copy2(stub, backends / "python" / stub.name)
        return backends

    def command(self) -> list[str]:
        """The ``tritonserver`` command line."""
        return [
            str(self.root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backends}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            # The configs are complete; auto-completion would start an extra stub per model.
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        libpython = sysconfig.get_config_var("LIBDIR") or ""
        libs = self.root.parent.parent / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libpython, str(libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env.pop("PYTHONPATH", None)
        return env

    def start(self, timeout_s: float = 60) -> LocalTritonServer:
        """Start the server and wait until it reports ready.

        Raises:
            RuntimeError: it exited or was not ready within ``timeout_s``; the message ends
                with the tail of its log.
        """
        if self._process is not None and self._process.poll() is None:
            return self
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child process owns it
        try:
            self._process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                cwd=self._work,  # the stub puts its cwd first on sys.path
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                status = self._process.returncode
                self.stop(kill=True)  # its Python stubs may outlive it
                raise RuntimeError(f"tritonserver exited with status {status}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout_s} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """True when the server answers ready (all its models loaded)."""
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM and a graceful drain, or SIGKILL of the whole process group
        (``kill=True``, or when the drain takes too long). Leaked shared memory is removed."""
        process, self._process = self._process, None
        if process is not None:
            if not kill and process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=20)
            # Also after a clean exit: Python stubs share the group and may outlive the server.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the server and delete its working folder."""
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
