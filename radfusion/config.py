"""radfusion configuration: one YAML file, validated on load.

Every section has embedded defaults, so an empty file (or no file) is a working configuration
for a single machine. Validation errors name the offending key with its full dotted path,
e.g. ``node.allowed_callers.0.ae_title``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from radfusion.app_index import known_apps
from radfusion.errors import RadfusionError
from radfusion.routing import Condition, parse_condition

__all__ = [
    "AllowedCaller",
    "AppsConfig",
    "CompletionConfig",
    "ConfigError",
    "DestinationTLS",
    "DicomDestination",
    "DicomWebAuth",
    "DicomWebDestination",
    "ExportConfig",
    "FhirAuth",
    "FhirConfig",
    "FolderDestination",
    "LungCTConfig",
    "NodeConfig",
    "NodeTLS",
    "PriorsConfig",
    "RadfusionConfig",
    "RadiomicsConfig",
    "RetryPolicy",
    "RouteRule",
    "RoutingConfig",
    "SpoolConfig",
    "StorageCommitment",
    "TritonConfig",
    "TritonTLS",
    "example_config",
    "load_config",
    "parse_config",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no controls


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value.strip()


class ConfigError(RadfusionError, ValueError):
    """The configuration file is unreadable or invalid; the message names each bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedCaller(_Section):
    """A calling AE title that may associate (``*``: any), optionally bound to source
    addresses."""

    ae_title: str
    addresses: list[str] = Field(
        default_factory=list,
        description="IP addresses or networks (CIDR) this AE may connect from; empty = any.",
    )
    quiet_period_s: float | None = Field(
        default=None, gt=0, description="Overrides completion.quiet_period_s for this AE."
    )

    _check_ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # raises ValueError naming the bad item
        return value

    def permits(self, address: str) -> bool:
        """True when ``address`` is one of this caller's allowed addresses (or none are set)."""
        if not self.addresses:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(a, strict=False) for a in self.addresses)


def _existing_file(value: Path | None) -> Path | None:
    if value is not None and not Path(value).is_file():
        raise ValueError(f"{value} is not a readable file")
    return value


class NodeTLS(_Section):
    """DICOM TLS on the node (PS3.15 Annex B, BCP 195: TLS 1.2 or later, forward-secret AEAD
    ciphers). With it, the node accepts TLS only: plain TCP callers are refused."""

    certificate: Path = Field(description="PEM certificate (chain) the node presents.")
    private_key: Path = Field(description="PEM private key of that certificate.")
    client_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle. When set, every caller must present a certificate that "
        "chains to it (mutual TLS); expired or foreign certificates are refused.",
    )

    _check_files = field_validator("certificate", "private_key", "client_ca")(_existing_file)


class DestinationTLS(_Section):
    """DICOM TLS to a C-STORE destination (BCP 195: TLS 1.2 or later). The peer's certificate
    must chain to ``ca_certificates`` and name the destination's host."""

    ca_certificates: Path | None = Field(
        default=None, description="PEM CA bundle for the peer; default: the system's."
    )
    certificate: Path | None = Field(
        default=None, description="PEM client certificate (mutual TLS)."
    )
    private_key: Path | None = Field(default=None, description="PEM client key (mutual TLS).")

    _check_files = field_validator("ca_certificates", "certificate", "private_key")(_existing_file)

    @model_validator(mode="after")
    def _pair(self) -> DestinationTLS:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate and private_key")
        return self


class NodeConfig(_Section):
    """The DICOM node (Storage SCP + Verification SCP)."""

    ae_title: str = "RADFUSION"
    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on: this host only unless configured (0.0.0.0 = all).",
    )
    port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=16, ge=1)
    max_associations_per_address: int = Field(
        default=8,
        ge=1,
        description="Open connections one IP address may hold; more are closed at once.",
    )
    associations_per_minute_per_address: int = Field(
        default=600,
        ge=1,
        description="New connections one IP address may open per minute (a scanner opening "
        "one association per image at 10/s fits); more are closed at once.",
    )
    maximum_pdu_size: int = Field(
        default=1 << 20,
        ge=4096,
        description="Maximum Length Received offered to peers (bytes). A PDU announcing more "
        "(or more than 256 KiB, for association requests) closes the connection unread.",
    )
    allowed_callers: list[AllowedCaller] = Field(
        default_factory=list,
        description="Calling AE titles (optionally bound to addresses) allowed to associate; "
        "every other caller is rejected. Empty (the default) rejects everyone; an entry with "
        "ae_title '*' admits any AE title (from its addresses, if it lists any).",
    )
    acse_timeout_s: float = Field(
        default=15,
        gt=0,
        description="From TCP connect to a complete A-ASSOCIATE-RQ, however slowly it comes; "
        "the connection is closed then.",
    )
    dimse_timeout_s: float = Field(default=60, gt=0)
    network_timeout_s: float = Field(
        default=60, gt=0, description="Longest wait for data on an open connection."
    )
    tls: NodeTLS | None = Field(default=None, description="DICOM TLS; without it, plain TCP.")

    _check_ae = field_validator("ae_title")(_check_ae_title)

    def caller(self, calling_ae_title: str) -> AllowedCaller | None:
        """The allowed_callers entry for ``calling_ae_title``: its own, else a '*' entry."""
        exact = [c for c in self.allowed_callers if c.ae_title == calling_ae_title]
        wildcard = [c for c in self.allowed_callers if c.ae_title == "*"]
        return next(iter(exact + wildcard), None)


class SpoolConfig(_Section):
    """Where received instances and the catalog live."""

    path: Path = Path("./radfusion-data")
    fsync: bool = Field(
        default=False,
        description="fsync each instance (and its directory) before acknowledging it. Survives "
        "power loss, not only process crashes, at a cost in throughput.",
    )
    min_free_mb: int = Field(
        default=1024,
        ge=0,
        description="Refuse new instances (status 0xA700) when free space falls below this.",
    )
    retention_days: float = Field(
        default=7, gt=0, description="Finished and unrouted studies are purged after this."
    )


class CompletionConfig(_Section):
    """When a study counts as complete."""

    quiet_period_s: float = Field(default=5.0, gt=0)
    after_restart_s: float = Field(
        default=30.0,
        gt=0,
        description="After a restart, a study that was still arriving waits at least this "
        "long for its sender to reconnect and resume before it counts as complete.",
    )
    late_arrival: Literal["rerun", "ignore"] = Field(
        default="rerun",
        description="Instances that arrive after a study was handed on: 'rerun' reopens the "
        "study (it is handed on again after a new quiet period); 'ignore' stores and logs them.",
    )


class RouteRule(_Section):
    """Run ``apps`` on studies that have a series matching ``when``."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str
    when: Condition
    apps: list[str] = Field(min_length=1)

    @field_validator("when", mode="before")
    @classmethod
    def _parse_when(cls, value: Any) -> Condition:
        return value if isinstance(value, Condition) else parse_condition(value)


class RoutingConfig(_Section):
    rules: list[RouteRule] = Field(default_factory=list)


class RetryPolicy(_Section):
    """Exponential backoff: attempt n waits min(initial * factor**(n-1), max) seconds."""

    attempts: int = Field(default=5, ge=1)
    initial_backoff_s: float = Field(default=2.0, ge=0)
    max_backoff_s: float = Field(default=60.0, ge=0)
    factor: float = Field(default=2.0, ge=1)

    def delays(self) -> list[float]:
        """The waits between attempts (one fewer than ``attempts``)."""
        return [
            min(self.initial_backoff_s * self.factor**n, self.max_backoff_s)
            for n in range(self.attempts - 1)
        ]


class JobsConfig(_Section):
    """How the service runs the apps' jobs."""

    retry: RetryPolicy = Field(
        default=RetryPolicy(attempts=4, initial_backoff_s=60.0, max_backoff_s=900.0),
        description="A job that failed because a server it needs is unavailable (Triton; FHIR "
        "under on_unavailable: hold) is queued again after these waits; after the last "
        "attempt it goes to the dead letters. Other failures go there at once.",
    )


class StorageCommitment(_Section):
    """DICOM Storage Commitment (push model, PS3.4 Annex J) towards a C-STORE destination:
    after the results are stored, radfusion asks the peer (N-ACTION) to take responsibility
    for them and keeps them in its spool until the peer's report (N-EVENT-REPORT, on a new
    association to the node) says so. The peer must know the node (AE title, host, port) to
    report back, and the node must admit the peer's AE title in ``node.allowed_callers``."""

    wait_s: float = Field(
        default=3600,
        gt=0,
        description="How long to wait for the report. Instances the peer reports as not "
        "committed, or all of them when no report came in time, go to the dead letters "
        "(files kept; `radfusion deadletter retry` sends them again and asks again).",
    )


class DicomDestination(_Section):
    """A DICOM peer that accepts C-STORE (a PACS, a viewer, another router)."""

    name: str
    type: Literal["dicom"] = "dicom"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(default=None, description="Default: node.ae_title.")
    timeout_s: float = Field(default=30, gt=0)
    tls: DestinationTLS | None = Field(default=None, description="DICOM TLS to this peer.")
    storage_commitment: StorageCommitment | None = Field(
        default=None, description="Ask this peer to commit to storing what it received."
    )

    _check_ae = field_validator("ae_title")(_check_ae_title)


class FolderDestination(_Section):
    """A local or mounted folder; files are written atomically (temp file + rename)."""

    name: str
    type: Literal["folder"] = "folder"
    path: Path


def _http_base_url(value: str, auth_section: str) -> str:
    """``value`` checked as an http(s) base URL without credentials (it appears in logs,
    status and reports: credentials go in ``auth_section``), trailing slash removed."""
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"{value!r} must be an http(s) URL")
    if "@" in value.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(f"must not hold credentials (user:password@); use {auth_section}")
    return value.rstrip("/")


def _refuse_plain_http_off_host(url: str, auth_type: str) -> None:
    """Credentials and patient data must not cross a network in the clear: plain http only
    to a server on this host when ``auth_type`` is not "none"."""
    match = re.match(r"^http://(\[[^\]]+\]|[^/:]+)", url)
    if auth_type != "none" and match and match.group(1) not in ("127.0.0.1", "localhost", "[::1]"):
        raise ValueError(f"{url} is plain http: use https with auth {auth_type!r}")


class DicomWebAuth(_Section):
    """Credentials for a DICOMweb destination. Secrets come from a file or an environment
    variable, read at each delivery (a rotated token is picked up), never from this file and
    never logged."""

    type: Literal["none", "basic", "bearer"] = "none"
    username: str | None = Field(default=None, description="basic: the user name.")
    password_file: Path | None = Field(default=None, description="basic: file with the password.")
    password_env: str | None = Field(
        default=None, description="basic: environment variable with the password."
    )
    token_file: Path | None = Field(default=None, description="bearer: file with the token.")
    token_env: str | None = Field(
        default=None, description="bearer: environment variable with the token."
    )

    @model_validator(mode="after")
    def _complete(self) -> DicomWebAuth:
        if self.type == "basic" and not self.username:
            raise ValueError("auth type 'basic' needs username")
        secret = {"basic": ("password_file", "password_env"), "bearer": ("token_file", "token_env")}
        for kind, (from_file, from_env) in secret.items():
            given = [k for k in (from_file, from_env) if getattr(self, k) not in (None, "")]
            if self.type == kind and len(given) != 1:
                raise ValueError(f"auth type {kind!r} needs exactly one of {from_file}, {from_env}")
            if self.type != kind and given:
                raise ValueError(f"{', '.join(given)} given for auth type {self.type!r}")
        return self

    def secret(self) -> str | None:
        """The password or token (None for type none).

        Raises:
            ValueError: the file cannot be read or the variable is unset or empty (the
                message names the file or variable, never the secret).
        """
        if self.type == "none":
            return None
        from_file = self.password_file if self.type == "basic" else self.token_file
        from_env = self.password_env if self.type == "basic" else self.token_env
        if from_file is not None:
            try:
                value = from_file.read_text(encoding="utf-8").strip()
            except OSError as err:
                raise ValueError(f"cannot read {from_file}: {err.strerror}") from None
            where = str(from_file)
        else:
            assert from_env is not None
            value = os.environ.get(from_env, "").strip()
            where = f"environment variable {from_env}"
        if not value:
            raise ValueError(f"{where} is empty or unset")
        return value


class DicomWebDestination(_Section):
    """A DICOMweb origin server that accepts STOW-RS (a PACS, a VNA, Orthanc's DICOMweb
    plugin). Instances are POSTed to ``{url}/studies/{StudyInstanceUID}``."""

    name: str
    type: Literal["dicomweb"] = "dicomweb"
    url: str = Field(description="DICOMweb base, e.g. https://pacs.hospital.local/dicom-web")
    auth: DicomWebAuth = DicomWebAuth()
    verify_tls: bool | Path = Field(
        default=True, description="true, false (never in production) or a CA bundle (PEM)."
    )
    client_certificate: Path | None = Field(
        default=None, description="PEM client certificate (mutual TLS)."
    )
    client_key: Path | None = Field(default=None, description="PEM client key (mutual TLS).")
    timeout_s: float = Field(default=60, gt=0, description="Per HTTP request.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _http_base_url(value, "auth")

    @model_validator(mode="after")
    def _secure(self) -> DicomWebDestination:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_certificate and client_key")
        _refuse_plain_http_off_host(self.url, self.auth.type)
        return self


Destination = Annotated[
    DicomDestination | DicomWebDestination | FolderDestination, Field(discriminator="type")
]


class ExportConfig(_Section):
    destinations: list[Destination] = Field(default_factory=list)
    retry: RetryPolicy = RetryPolicy()

    @model_validator(mode="after")
    def _unique_names(self) -> ExportConfig:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(dupes)}")
        return self

    def destination(self, name: str) -> DicomDestination | DicomWebDestination | FolderDestination:
        """The destination called ``name``; raises KeyError naming the known ones."""
        for d in self.destinations:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise KeyError(f"no export destination named {name!r} (known: {known})")


class TritonTLS(_Section):
    """TLS for the connection to Triton (gRPC: server authentication, optionally mutual TLS;
    HTTP: server authentication)."""

    root_certificates: Path | None = Field(
        default=None, description="PEM file of the CA(s) that signed the server's certificate."
    )
    private_key: Path | None = Field(default=None, description="PEM client key (mutual TLS).")
    certificate_chain: Path | None = Field(
        default=None, description="PEM client certificate chain (mutual TLS)."
    )

    @model_validator(mode="after")
    def _pair(self) -> TritonTLS:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain")
        return self


class TritonConfig(_Section):
    """A Triton Inference Server the apps run their models on. Without this section, models
    run in the radfusion process (the embedded default)."""

    url: str = Field(description="host:port of the server's gRPC (or HTTP) endpoint.")
    protocol: Literal["grpc", "http"] = Field(
        default="grpc", description="gRPC with binary tensors; HTTP (binary) as the option."
    )
    shared_memory: Literal["auto", "system", "off"] = Field(
        default="auto",
        description="Pass tensors through system shared memory when the server runs on this "
        "host. 'auto' tries and falls back to the network; 'system' insists; 'off' never.",
    )
    batch_size: int = Field(
        default=1,
        ge=1,
        description="Sliding-window patches per request (<= the model's max_batch_size).",
    )
    max_in_flight: int = Field(default=2, ge=1, le=64, description="Concurrent requests.")
    timeout_s: float = Field(default=120, gt=0, description="Per request.")
    connect_timeout_s: float = Field(
        default=10, ge=0, description="How long to wait for the server to be ready at start."
    )
    retry: RetryPolicy = Field(
        default=RetryPolicy(attempts=4, initial_backoff_s=1.0, max_backoff_s=10.0),
        description="Retries of a request on transient errors (unreachable, timed out).",
    )
    tls: TritonTLS | None = None

    @model_validator(mode="after")
    def _tls_protocol(self) -> TritonConfig:
        if self.protocol == "http" and self.tls is not None and self.tls.private_key:
            raise ValueError("client certificates (mutual TLS) are supported with gRPC only")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if "://" in value or not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", value):
            raise ValueError(f"{value!r} must be host:port (no scheme), e.g. triton.local:8001")
        return value


class FhirAuth(_Section):
    """How radfusion authenticates to the FHIR server."""

    type: Literal["none", "bearer", "smart-backend"] = "none"
    token: str | None = Field(
        default=None, description="bearer: the static access token (keep the file private)."
    )
    token_url: str | None = Field(default=None, description="smart-backend: token endpoint.")
    client_id: str | None = Field(default=None, description="smart-backend: registered client.")
    private_key: Path | None = Field(
        default=None, description="smart-backend: PEM private key (RSA or EC P-384)."
    )
    algorithm: Literal["RS384", "ES384"] = "RS384"
    key_id: str | None = Field(default=None, description="smart-backend: 'kid' of the key.")
    scope: str = Field(
        default="system/Patient.read system/Observation.read system/Condition.read "
        "system/DiagnosticReport.read system/ImagingStudy.read system/Consent.read",
        description="smart-backend: scopes requested.",
    )

    @model_validator(mode="after")
    def _complete(self) -> FhirAuth:
        need = {
            "none": (),
            "bearer": ("token",),
            "smart-backend": ("token_url", "client_id", "private_key"),
        }[self.type]
        missing = [k for k in need if getattr(self, k) in (None, "")]
        if missing:
            raise ValueError(f"auth type {self.type!r} needs {', '.join(missing)}")
        return self


class FhirConfig(_Section):
    """The hospital's FHIR server, where patient context (genomics, clinical) comes from."""

    base_url: str = Field(description="FHIR R4 base, e.g. https://fhir.hospital.local/R4")
    auth: FhirAuth = FhirAuth()
    verify_tls: bool | Path = Field(
        default=True, description="true, false (never in production) or a CA bundle (PEM)."
    )
    timeout_s: float = Field(default=15, gt=0, description="Per HTTP request.")
    retry: RetryPolicy = Field(
        default=RetryPolicy(attempts=3, initial_backoff_s=1.0, max_backoff_s=8.0),
        description="Retries on connection errors, timeouts, 429 and 5xx.",
    )
    page_size: int = Field(default=100, ge=1, le=1000, description="_count for searches.")
    max_pages: int = Field(default=50, ge=1, description="Stop following 'next' after this.")
    issuers: dict[str, str] = Field(
        default_factory=dict,
        description="Issuer of Patient ID (0010,0021) → FHIR identifier system, for studies "
        "without an Issuer of Patient ID Qualifiers Sequence.",
    )
    default_identifier_system: str | None = Field(
        default=None,
        description="Identifier system for studies with no issuer at all (single-issuer "
        "sites). Unset: such studies get no patient context.",
    )
    resolve_through_imaging_study: bool = Field(
        default=False,
        description="First look the study up as an ImagingStudy (identifier urn:dicom:uid) and "
        "take its subject.",
    )
    results_after_study_days: float = Field(
        default=0,
        ge=0,
        description="Keep results dated up to this many days after the study date (0: only "
        "results up to the study date, so later results never leak into an earlier study).",
    )
    consent_required: bool = Field(
        default=False,
        description="Fetch genomics only for patients with an active permitting privacy or "
        "treatment Consent (research consents do not count; any deny in force withholds).",
    )
    on_unavailable: Literal["imaging-only", "hold"] = Field(
        default="imaging-only",
        description="FHIR server unreachable: run imaging-only and say so in the SR, or fail "
        "the job so it is retried later.",
    )
    writeback: bool = Field(
        default=False,
        description="Write the fusion results back to the patient's record: a RiskAssessment, "
        "Observations (predicted EGFR, primary tumour volume and diameter) and a "
        "DiagnosticReport for an ImagingStudy of the study, each citing the fusion SR. "
        "Reprocessing updates them (found by identifier), never duplicates them.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_base(cls, value: str) -> str:
        return _http_base_url(value, "fhir.auth")

    @model_validator(mode="after")
    def _tokens_over_tls(self) -> FhirConfig:
        for url in (self.base_url, self.auth.token_url or ""):
            _refuse_plain_http_off_host(url, self.auth.type)
        return self


class RadiomicsConfig(_Section):
    """Per-tumour radiomics (operators/radiomics.py, RadiomicsSettings, same names); recorded
    with every result."""

    enabled: bool = Field(
        default=True, description="Compute radiomics of every reported tumour (mirp)."
    )
    resampling_mm: float | None = Field(
        default=1.0,
        gt=0,
        description="Isotropic voxel size each tumour is resampled to before intensity and "
        "texture features; null: as acquired (texture then depends on the slice spacing).",
    )
    interpolation_order: Literal[0, 1, 3] = Field(
        default=1, description="Spline order of the resampling (1: trilinear)."
    )
    intensity_range_hu: tuple[float, float] | None = Field(
        default=(-1000.0, 400.0),
        description="Voxels outside are left out of intensity and texture (re-segmentation); "
        "the lower end is the first bin's edge.",
    )
    discretisation: Literal["fixed_bin_size", "none"] = "fixed_bin_size"
    bin_width_hu: float = Field(default=25.0, gt=0, description="Fixed bin size for texture.")
    ground_glass_hu: tuple[float, float] = Field(
        default=(-700.0, -300.0), description="The HU range counted as ground glass."
    )

    @field_validator("intensity_range_hu", "ground_glass_hu")
    @classmethod
    def _increasing(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"{list(value)} is not an increasing pair")
        return value


class FusionConfig(_Section):
    """The fusion model (operators/fusion.py): imaging + clinical + genomic data → progression
    risk and EGFR probability, written as a second SR (series 903)."""

    enabled: bool = Field(
        default=True,
        description="Run the fusion model on every analysed study with tumour radiomics or a "
        "patient context.",
    )
    model: Path | None = Field(
        default=None,
        description="model.yaml of the fusion model. Default: the one shipped in "
        "packaging/models/lung_fusion/ (trained on synthetic patients only: a demonstration, "
        "not for clinical use).",
    )
    triton_model: str = Field(
        default="lung_fusion",
        description="The model's name on the Triton server (used when `triton:` is set).",
    )
    triton_model_version: str = Field(
        default="", pattern=r"^\d*$", description="A version number; empty = the latest ready."
    )


class PriorsConfig(_Section):
    """Comparison with the patient's prior chest CT (``apps.lung_ct.priors``)."""

    enabled: bool = False
    pacs: str = Field(
        default="pacs",
        description="Name of the export destination to ask for the patient's earlier studies "
        "and to retrieve the latest earlier CT from: a dicom one (C-FIND, Study Root; C-GET) "
        "or a dicomweb one (QIDO-RS; WADO-RS).",
    )
    max_age_days: int = Field(
        default=3650, ge=1, description="Earlier studies older than this are not compared."
    )
    retrieve: Literal["c-get", "c-move"] = Field(
        default="c-get",
        description="How a dicom PACS sends the prior: C-GET (on our association) or C-MOVE "
        "to the node's AE title (which the PACS must know with its host and port; the node "
        "keeps those images for the comparison, they start no job). A dicomweb PACS: WADO-RS.",
    )


class LungCTConfig(_Section):
    """The ``lung-ct`` app."""

    model: Path | None = Field(
        default=None,
        description="model.yaml of the segmentation model (TorchScript + preprocessing). "
        "Default: the reference model shipped in packaging/models/lung_ct_seg/ (a "
        "demonstration, not for clinical use).",
    )
    # Which series qualify, and which reconstruction is analysed: operators/series_selector.py
    # (SelectionRule), with the same names.
    min_z_coverage_mm: float = Field(
        default=150.0,
        gt=0,
        description="An axial CT series must cover at least this along the patient's long axis "
        "(first to last slice plus one spacing; a chest is about 250-300 mm).",
    )
    max_slice_spacing_mm: float = Field(
        default=10.0, gt=0, description="Slices further apart: the series is not analysed."
    )
    reconstruction_preference: list[
        Literal["thinnest", "thickest", "soft_kernel", "sharp_kernel"]
    ] = Field(
        default=["thinnest", "soft_kernel"],
        min_length=1,
        description="Which of several reconstructions of one acquisition (same frame of "
        "reference, overlapping slices, another kernel or slice thickness) is analysed: the "
        "criteria in order; the others are skipped, each with the reason.",
    )
    fallback_to_other_reconstructions: bool = Field(
        default=False,
        description="Keep the other reconstructions as fallbacks, tried in preference order when "
        "the chosen one cannot be assembled (one series per study is analysed either way).",
    )
    report_refusals: bool = Field(
        default=True,
        description="When no series qualifies, write an SR saying the study was received and "
        "not analysed and why (each series' reason), referencing its images; no SEG.",
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_slices" in data:
            raise ValueError(
                "min_slices was replaced by min_z_coverage_mm (default 150) and "
                "max_slice_spacing_mm (default 10): the coverage of a series decides, not its "
                "number of slices; remove min_slices"
            )
        return data

    @field_validator("reconstruction_preference")
    @classmethod
    def _each_criterion_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value!r} names a criterion twice")
        return value

    seg_type: Literal["binary", "labelmap"] = "binary"
    # The operating point of the nodule detector (operators/detection.py, DetectionSettings).
    detection_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Nodule candidates with a lower detection score are not reported. Lower "
        "finds more and reports more false positives.",
    )
    nodule_scorer: Path | None = Field(
        default=None,
        description="scorer.json of the nodules' false-positive stage. Default: the one shipped "
        "in packaging/models/lung_nodule_fp/ (fitted on synthetic phantoms only).",
    )
    max_findings: int = Field(
        default=10, ge=0, le=250, description="At most this many nodules, best score first."
    )
    min_nodule_diameter_mm: float = Field(
        default=4.0,
        ge=0.0,
        description="Smaller nodules are not reported; the series raises it to twice its slice "
        "thickness (what the slices can resolve), and the SR says so.",
    )
    radiomics: RadiomicsConfig = RadiomicsConfig()
    fusion: FusionConfig = FusionConfig()
    priors: PriorsConfig = Field(
        default=PriorsConfig(),
        description="Find the patient's latest earlier CT in the PACS, analyse it alike, "
        "register its lungs to this CT's and report each nodule's change (volume, doubling "
        "time, new, not found again) in the SR.",
    )
    threads: int = Field(default=0, ge=0, description="torch threads; 0 = all cores.")
    triton_model: str = Field(
        default="lung_ct_seg",
        description="The model's name on the Triton server (used when `triton:` is set).",
    )
    triton_model_version: str = Field(
        default="", pattern=r"^\d*$", description="A version number; empty = the latest ready."
    )


class AppsConfig(_Section):
    lung_ct: LungCTConfig = LungCTConfig()


class RadfusionConfig(_Section):
    """The whole configuration file."""

    node: NodeConfig = NodeConfig()
    spool: SpoolConfig = SpoolConfig()
    completion: CompletionConfig = CompletionConfig()
    routing: RoutingConfig = RoutingConfig()
    export: ExportConfig = ExportConfig()
    jobs: JobsConfig = JobsConfig()
    apps: AppsConfig = AppsConfig()
    triton: TritonConfig | None = Field(
        default=None, description="Run the apps' models on this Triton server."
    )
    fhir: FhirConfig | None = Field(
        default=None, description="Fetch patient context (genomics, clinical) from this server."
    )
    uid_root: str = Field(
        default="1.2.826.0.1.3680043.10.1234.",
        description="Root for every UID radfusion creates (results series/instances). Use your "
        "organisation's registered root.",
    )

    @field_validator("uid_root")
    @classmethod
    def _check_uid_root(cls, value: str) -> str:
        if not re.fullmatch(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*\.", value) or len(value) > 40:
            raise ValueError("must be a dotted numeric UID prefix ending in '.', at most 40 chars")
        return value

    @model_validator(mode="after")
    def _known_apps(self) -> RadfusionConfig:
        known = known_apps()
        for i, rule in enumerate(self.routing.rules):
            for j, app in enumerate(rule.apps):
                if app not in known:
                    raise ValueError(
                        f"routing.rules.{i}.apps.{j}: unknown app {app!r} "
                        f"(installed: {', '.join(sorted(known))})"
                    )
        return self

    @model_validator(mode="after")
    def _priors_pacs_is_a_dicom_destination(self) -> RadfusionConfig:
        priors = self.apps.lung_ct.priors
        if not priors.enabled:
            return self
        try:
            dest = self.export.destination(priors.pacs)
        except KeyError as err:
            raise ValueError(f"apps.lung_ct.priors.pacs: {err.args[0]}") from None
        if isinstance(dest, FolderDestination):
            raise ValueError(
                f"apps.lung_ct.priors.pacs: {priors.pacs!r} is a folder; priors are queried "
                "and retrieved from a dicom (C-FIND, C-GET) or dicomweb (QIDO-RS, WADO-RS) one"
            )
        if priors.retrieve == "c-move" and not isinstance(dest, DicomDestination):
            raise ValueError(
                f"apps.lung_ct.priors.retrieve: c-move needs a dicom PACS; {priors.pacs!r} is "
                "dicomweb (retrieved by WADO-RS)"
            )
        return self

    @model_validator(mode="after")
    def _commitment_reports_reach_the_node(self) -> RadfusionConfig:
        # The peer sends its report to the AE title that asked: it must be the node's.
        for i, dest in enumerate(self.export.destinations):
            if not isinstance(dest, DicomDestination) or dest.storage_commitment is None:
                continue
            if dest.calling_ae_title not in (None, self.node.ae_title):
                raise ValueError(
                    f"export.destinations.{i}: with storage_commitment, calling_ae_title must "
                    f"be the node's AE title {self.node.ae_title!r} (the peer reports to it)"
                )
            if self.node.caller(dest.ae_title) is None:
                raise ValueError(
                    f"export.destinations.{i}: with storage_commitment, node.allowed_callers "
                    f"must admit {dest.ae_title!r} (it reports on an association of its own)"
                )
        return self

    def quiet_period_for(self, calling_ae_title: str) -> float:
        """The completion quiet period for studies sent by ``calling_ae_title``."""
        caller = self.node.caller(calling_ae_title)
        if caller is not None and caller.quiet_period_s is not None:
            return caller.quiet_period_s
        return self.completion.quiet_period_s


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> RadfusionConfig:
    """Validate an already-parsed YAML mapping; raises ConfigError naming bad keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        return RadfusionConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: Path | None) -> RadfusionConfig:
    """Load and validate ``path``; ``None`` gives the embedded defaults.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation.
    """
    if path is None:
        return RadfusionConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read configuration {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(data, str(path))


def example_config() -> str:
    """A commented example configuration (valid as is)."""
    return (Path(__file__).parent / "example_config.yaml").read_text(encoding="utf-8")
