"""MAP manifests from an app's ``app.yaml``: ``app.json``, ``pkg.json``, image labels, environment.

A MONAI Application Package (MAP) is an OCI image that describes itself (MONAI Deploy MAP
specification, the same as the Holoscan Application Package): ``/etc/holoscan/app.json`` says
how to run the application, ``/etc/holoscan/pkg.json`` what the package holds (application
root, models, resources), and the image labels ``org.opencontainers.image.title`` /
``.version`` name it. This module turns the ``application`` and ``resources`` groups of
``apps/<app>/app.yaml`` into those documents. It is pure (no I/O besides reading ``app.yaml``)
so the unit tests check it without building an image; ``build_map.py`` beside it writes the
results into the image.

Where the specification and the reference packager (holoscan-cli's ``package`` command, which
``monai-deploy package`` called) spell a field differently, both spellings are written, so
readers of either find it: ``output.format`` (specification) and ``output.formats``
(packager); ``HOLOSCAN_DOCS``/``HOLOSCAN_LOGS`` (specification) and ``HOLOSCAN_DOCS_PATH``/
``HOLOSCAN_LOGS_PATH`` (packager). ``command`` is a JSON-encoded argument list in a string, as
the packager writes it and its ``tools`` script reads it (``jq '.command | fromjson'``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "API_VERSION",
    "APP_DIR",
    "APP_MANIFEST_PATH",
    "CONFIG_PATH",
    "DOCS_DIR",
    "INPUT_DIR",
    "LOGS_DIR",
    "MODELS_DIR",
    "OUTPUT_DIR",
    "PKG_MANIFEST_PATH",
    "TOOLS_PATH",
    "WORKDIR",
    "AppMetadata",
    "ManifestError",
    "ModelEntry",
    "application_manifest",
    "environment",
    "image_labels",
    "package_manifest",
    "parse_app_metadata",
    "read_app_yaml",
    "write_json",
]

API_VERSION = "1.0.0"  # MAP manifest schema version (specification release 1.0.0)

# The specification's table of important paths.
WORKDIR = "/var/holoscan"
INPUT_DIR = "/var/holoscan/input"
OUTPUT_DIR = "/var/holoscan/output"
LOGS_DIR = "/var/holoscan/logs"
CONFIG_PATH = "/var/holoscan/app.yaml"
TOOLS_PATH = "/var/holoscan/tools"
APP_DIR = "/opt/holoscan/app"
MODELS_DIR = "/opt/holoscan/models"
DOCS_DIR = "/opt/holoscan/docs"
APP_MANIFEST_PATH = "/etc/holoscan/app.json"
PKG_MANIFEST_PATH = "/etc/holoscan/pkg.json"

_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
_MEMORY = re.compile(r"(0|[1-9]\d*)(\.\d)?(Mi|Gi)")
_DECIMAL_KEYS = ("cpu", "cpuLimit", "gpu", "gpuLimit")
_MEMORY_KEYS = (
    "memory",
    "memoryLimit",
    "gpuMemory",
    "gpuMemoryLimit",
    "sharedMemory",
    "sharedMemoryLimit",
)
_APPLICATION_KEYS = frozenset(
    {"title", "version", "inputFormats", "outputFormats", "input-formats", "output-formats"}
)


class ManifestError(ValueError):
    """``app.yaml`` cannot make a MAP manifest; the message names the file and the key."""


@dataclass(frozen=True)
class AppMetadata:
    """The MAP metadata of one app, as ``app.yaml`` states it (validated)."""

    title: str
    version: str
    input_formats: tuple[str, ...]
    output_formats: tuple[str, ...]
    resources: Mapping[str, Any]


@dataclass(frozen=True)
class ModelEntry:
    """A model in the package: ``name`` (no whitespace, at most 128 bytes) and its folder,
    relative to the model root ``/opt/holoscan/models``."""

    name: str
    path: str

    def __post_init__(self) -> None:
        _check_name(self.name, "models[].name")
        if not self.path or self.path.startswith("/") or ".." in Path(self.path).parts:
            raise ManifestError(f"models[].path: {self.path!r} must be relative to the model root")


def read_app_yaml(path: Path) -> AppMetadata:
    """Read and validate ``apps/<app>/app.yaml``.

    Raises:
        ManifestError: the file cannot be read, is not YAML, or a key is missing or invalid.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None
    return parse_app_metadata(data, str(path))


def parse_app_metadata(data: Any, source: str = "app.yaml") -> AppMetadata:
    """Validate an already-parsed ``app.yaml`` mapping.

    ``application.title`` and a semantic ``application.version`` are required, and so are the
    input and output formats (``inputFormats``/``outputFormats``; the packager's kebab-case
    ``input-formats``/``output-formats`` are accepted too). ``resources`` is optional; the
    keys it has must be the specification's, with CPU/GPU counts as decimals (at most one
    decimal place) and memory sizes as ``<number>Mi`` or ``<number>Gi``.

    Raises:
        ManifestError: naming ``source`` and the offending key.
    """
    if not isinstance(data, Mapping):
        raise ManifestError(f"{source}: the top level must be a mapping")
    app = data.get("application")
    if not isinstance(app, Mapping):
        raise ManifestError(f"{source}: application: missing (a mapping with title and version)")
    unknown = sorted(set(app) - _APPLICATION_KEYS)
    if unknown:
        raise ManifestError(f"{source}: application.{unknown[0]}: unknown key")
    title = app.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ManifestError(f"{source}: application.title: missing or empty")
    version = app.get("version")
    if not isinstance(version, str) or not _SEMVER.fullmatch(version):
        raise ManifestError(
            f"{source}: application.version: {version!r} is not a semantic version (e.g. 1.2.3)"
        )
    resources = data.get("resources", {})
    if not isinstance(resources, Mapping):
        raise ManifestError(f"{source}: resources: must be a mapping")
    return AppMetadata(
        title=title.strip(),
        version=version,
        input_formats=_formats(app, "inputFormats", "input-formats", source),
        output_formats=_formats(app, "outputFormats", "output-formats", source),
        resources=_check_resources(resources, f"{source}: resources", fragments_allowed=True),
    )


def _formats(app: Mapping[str, Any], key: str, kebab: str, source: str) -> tuple[str, ...]:
    """The list of formats under ``key`` (or its kebab-case spelling); raises ManifestError."""
    value = app.get(key, app.get(kebab))
    if value is None:
        raise ManifestError(f'{source}: application.{key}: missing (e.g. ["file"])')
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ManifestError(f"{source}: application.{key}: must be a non-empty list of strings")
    return tuple(value)


def _check_resources(raw: Mapping[str, Any], where: str, *, fragments_allowed: bool) -> dict:
    """A validated copy of a ``resources`` group (or of one fragment's); raises ManifestError."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _DECIMAL_KEYS:
            out[key] = _decimal(value, f"{where}.{key}")
        elif key in _MEMORY_KEYS:
            if not isinstance(value, str) or not _MEMORY.fullmatch(value):
                raise ManifestError(
                    f"{where}.{key}: {value!r} must be a size in Mi or Gi (e.g. 2048Mi, 1.5Gi)"
                )
            out[key] = value
        elif key == "fragments" and fragments_allowed:
            if not isinstance(value, Mapping):
                raise ManifestError(f"{where}.fragments: must be a mapping of fragment names")
            out[key] = {}
            for name, group in value.items():
                _check_name(name, f"{where}.fragments")
                if not isinstance(group, Mapping):
                    raise ManifestError(f"{where}.fragments.{name}: must be a mapping")
                out[key][name] = _check_resources(
                    group, f"{where}.fragments.{name}", fragments_allowed=False
                )
        else:
            raise ManifestError(f"{where}.{key}: unknown resource key")
    return out


def _decimal(value: Any, where: str) -> int | float:
    """A CPU/GPU count: a non-negative number with at most one decimal place."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ManifestError(f"{where}: {value!r} must be a non-negative number")
    if isinstance(value, float) and round(value, 1) != value:
        raise ManifestError(f"{where}: {value!r} must be rounded to the nearest tenth")
    return value


def _check_name(name: Any, where: str) -> None:
    """Model and fragment names: no whitespace or control characters, at most 128 bytes."""
    if (
        not isinstance(name, str)
        or not name
        or len(name.encode()) > 128
        or any(c.isspace() or not c.isprintable() for c in name)
    ):
        raise ManifestError(
            f"{where}: {name!r} must be 1-128 bytes without whitespace or control characters"
        )


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``HOLOSCAN_*`` variables the specification requires, with the package's paths.

    ``extra`` adds the application's own variables (e.g. ``RADFUSION_CONFIG``); it may not
    change a ``HOLOSCAN_*`` one.

    Raises:
        ManifestError: ``extra`` names a ``HOLOSCAN_*`` variable.
    """
    env = {
        "HOLOSCAN_APPLICATION": APP_DIR,
        "HOLOSCAN_INPUT_PATH": INPUT_DIR,
        "HOLOSCAN_OUTPUT_PATH": OUTPUT_DIR,
        "HOLOSCAN_WORKDIR": WORKDIR,
        "HOLOSCAN_MODEL_PATH": MODELS_DIR,
        "HOLOSCAN_CONFIG_PATH": CONFIG_PATH,
        "HOLOSCAN_APP_MANIFEST_PATH": APP_MANIFEST_PATH,
        "HOLOSCAN_PKG_MANIFEST_PATH": PKG_MANIFEST_PATH,
        "HOLOSCAN_DOCS": DOCS_DIR,
        "HOLOSCAN_DOCS_PATH": DOCS_DIR,
        "HOLOSCAN_LOGS": LOGS_DIR,
        "HOLOSCAN_LOGS_PATH": LOGS_DIR,
    }
    for name, value in (extra or {}).items():
        if name.startswith("HOLOSCAN_"):
            raise ManifestError(f"environment: {name} is set by the package layout")
        env[name] = value
    return env


def application_manifest(
    meta: AppMetadata,
    *,
    command: Sequence[str],
    sdk: str,
    sdk_version: str,
    timeout: int = 0,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``/etc/holoscan/app.json``: how a hosting service runs the application.

    ``command`` is the argument list that runs the application (written JSON-encoded, as the
    reference packager does); ``timeout`` is in seconds, 0 for none.

    Raises:
        ManifestError: an empty command, a negative timeout, a non-semantic SDK version, or
            ``extra_env`` naming a ``HOLOSCAN_*`` variable.
    """
    if not command or not all(isinstance(a, str) and a for a in command):
        raise ManifestError("command: must be a non-empty list of arguments")
    if timeout < 0:
        raise ManifestError(f"timeout: {timeout} must be 0 (none) or a number of seconds")
    if not _SEMVER.fullmatch(sdk_version):
        raise ManifestError(f"sdkVersion: {sdk_version!r} is not a semantic version")
    return {
        "apiVersion": API_VERSION,
        "type": "application",  # runs once over its input and exits (not a long-lived service)
        "command": json.dumps(list(command)),
        "environment": environment(extra_env),
        "input": {"path": "input/", "formats": list(meta.input_formats)},
        "output": {
            "path": "output/",
            "format": list(meta.output_formats),
            "formats": list(meta.output_formats),
        },
        "sdk": sdk,
        "sdkVersion": sdk_version,
        "timeout": timeout,
        "version": meta.version,
        "workingDirectory": WORKDIR,
    }


def package_manifest(meta: AppMetadata, *, models: Sequence[ModelEntry]) -> dict[str, Any]:
    """``/etc/holoscan/pkg.json``: where the application and models are, what it needs to run.

    Raises:
        ManifestError: two models share a name.
    """
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ManifestError(f"models: duplicate names in {names}")
    return {
        "apiVersion": API_VERSION,
        "applicationRoot": APP_DIR,
        "modelRoot": MODELS_DIR,
        "models": [{"name": m.name, "path": m.path} for m in models],
        "resources": dict(meta.resources),
        "version": meta.version,
    }


def image_labels(
    meta: AppMetadata,
    *,
    created: str,
    revision: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """OCI labels/annotations: the required title and version, and the predefined keys we know.

    ``created`` is an RFC 3339 date-time; ``revision`` the source revision (git commit) when
    known; ``extra`` adds keys such as SDK versions.
    """
    labels = {
        "org.opencontainers.image.title": meta.title,
        "org.opencontainers.image.version": meta.version,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.description": (
            f"MONAI Application Package: {meta.title}. "
            "Run it with the input folder mounted at /var/holoscan/input and the output "
            "folder at /var/holoscan/output."
        ),
        "org.opencontainers.image.vendor": "radfusion",
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    if revision:
        labels["org.opencontainers.image.revision"] = revision
    labels.update(extra or {})
    return labels


def write_json(path: Path, document: Mapping[str, Any]) -> Path:
    """Write a manifest as UTF-8 JSON (indented, LF line endings); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
