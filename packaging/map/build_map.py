#!/usr/bin/env python3
"""Build a radfusion app as a MONAI Application Package (MAP) image, and smoke-test one.

holoscan-cli >= 4.3 dropped MAP packaging (``monai-deploy package``), so this builds the image
to the MAP specification directly, without a Docker engine or registry:

1. the app's ``app.yaml`` → ``app.json`` + ``pkg.json`` + labels (``map_manifest.py``);
2. the radfusion wheel (``pip wheel --no-deps``) and a wheelhouse of everything it needs,
   resolved by this machine's pip with the CPU build of torch pinned (``pip wheel``);
3. a Debian bookworm minbase root filesystem with ``python3`` (``debootstrap``; cached as a
   tarball under the work folder);
4. ``buildah --storage-driver vfs``: base → venv at ``/opt/holoscan/venv`` installed offline
   from the wheelhouse → MAP layout (manifests, ``/var/holoscan/tools`` entry point, models,
   docs) → ``buildah commit`` → ``buildah push`` to an OCI archive (and/or a Docker archive,
   which every ``docker load`` reads).

``smoke`` loads such an archive with buildah, checks ``show`` and ``extract``, runs the app on
an input folder (``buildah run --isolation chroot``: the only runtime in this sandbox), and
checks every DICOM file it writes with ``dciodvfy``.

Run it with the repository's Python 3.11 (the image's Python is Debian bookworm's 3.11)::

    .venv/bin/python packaging/map/build_map.py build --app lung_ct
    .venv/bin/python packaging/map/build_map.py smoke build/map/radfusion-lung-ct-0.1.0.oci.tar \\
        --input CT_DIR --output OUT_DIR

Needs root, ``buildah`` and ``debootstrap`` (Debian packages), Debian's mirror and the package
index pip is configured with.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import map_manifest as mm

REPO = Path(__file__).resolve().parents[2]
TOOLS_SOURCE = Path(__file__).with_name("map_tools.py")
README_SOURCE = Path(__file__).with_name("README.md")
BUILDAH = ("buildah", "--storage-driver", "vfs")

PYTHON = (3, 11)  # Debian bookworm's python3: the wheelhouse must match it
VENV = "/opt/holoscan/venv"
SITE_PACKAGES = f"{VENV}/lib/python{PYTHON[0]}.{PYTHON[1]}/site-packages"
# Pinned extras. torch: the CPU build (an unpinned torch pulls a multi-GB CUDA build).
# nvidia-cuda-runtime: libcudart.so.13, which holoscan-cu13's extension modules link against
# even when no GPU is used (outside the image it comes from a system CUDA install).
PINNED = ("torch==2.13.0", "nvidia-cuda-runtime==13.0.96")
# Installed without their declared dependencies, as the Makefile does (mirp: its `itk`
# meta-package is 1.5 GB and unused; radfusion's own dependencies hold what it uses).
WITHOUT_DEPENDENCIES = ("mirp==2.7.0",)
CUDART_DIR = f"{SITE_PACKAGES}/nvidia/cu13/lib"
BASE_PACKAGES = ("python3", "python3-venv")
USER = "holoscan"
# Where smoke mounts the export folder: /var/run/holoscan/export is the specification's path,
# but /var/run is an absolute symlink to /run in Debian, and buildah 1.28's chroot isolation
# resolves a mount target's symlinks on the host (Docker and Podman resolve it in the image).
EXPORT_MOUNT = "/run/holoscan/export"
RADFUSION_CONFIG = f"{mm.APP_DIR}/radfusion.yaml"
IMAGE_ENV = {  # besides the manifest's environment
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": f"/home/{USER}",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
}
# Per app: the models (folders under packaging/models) it ships; the first is the app's model.
DEFAULT_MODELS = {"lung_ct": ("lung_ct_seg",)}


class BuildError(RuntimeError):
    """A build or smoke step failed; the message names the step and where its log is."""


@dataclass(frozen=True)
class BuildOptions:
    """What to build and where (see ``build --help``)."""

    app: str
    work: Path
    out_dir: Path | None = None  # where the archives go (default: the work folder)
    models: tuple[Path, ...] | None = None
    formats: tuple[str, ...] = ("oci-archive",)  # buildah push transports
    mirror: str = "http://deb.debian.org/debian"
    suite: str = "bookworm"
    uid: int = 1000
    gid: int = 1000
    timeout: int = 0
    keep_image: bool = False
    refresh_base: bool = False


@dataclass
class BuildResult:
    """What a build made: the image name, the archives, sizes in bytes and step seconds."""

    image: str
    archives: dict[Path, int]  # archive → bytes
    rootfs_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- processes


class CommandLog:
    """Runs a build's external commands, each logged to one file; failures quote its tail."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def run(self, cmd: Sequence[str], *, capture: bool = False) -> str:
        """Run ``cmd``; returns its stdout when ``capture`` (stripped), else "".

        Raises:
            BuildError: it exits non-zero (with the last lines of its output).
        """
        with self.path.open("a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(
                list(cmd),
                stdout=subprocess.PIPE if capture else log,
                stderr=log,
                text=True,
                check=False,
            )
        if proc.returncode != 0:
            tail = "".join(self.path.read_text().splitlines(keepends=True)[-15:])
            raise BuildError(
                f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} ... exited {proc.returncode} "
                f"(log: {self.path}):\n{tail}"
            )
        return (proc.stdout or "").strip() if capture else ""

    def buildah(self, *args: str, capture: bool = False) -> str:
        """``buildah --storage-driver vfs ARGS``."""
        return self.run((*BUILDAH, *args), capture=capture)

    def chroot(
        self, container: str, *cmd: str, volumes: Sequence[str] = (), capture: bool = False
    ) -> str:
        """Run ``cmd`` in ``container`` (``buildah run --isolation chroot``; ``volumes`` are
        ``HOST:CONTAINER[:ro]`` bind mounts)."""
        mounts = [f"--volume={v}" for v in volumes]
        return self.buildah(
            "run", "--isolation=chroot", *mounts, container, "--", *cmd, capture=capture
        )


@contextmanager
def step(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Time a step into ``seconds[name]`` and say on stderr when it starts and ends."""
    print(f"[map] {name} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    yield
    seconds[name] = round(time.monotonic() - start, 1)
    print(f"[map] {name}: {seconds[name]} s", file=sys.stderr, flush=True)


def require_tools(*names: str) -> None:
    """Raises BuildError naming the Debian package of a missing program, or when not root."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BuildError(f"missing programs: {', '.join(missing)} (apt-get install them)")
    if os.geteuid() != 0:
        raise BuildError("debootstrap and buildah --storage-driver vfs need root")


# --------------------------------------------------------------------------- inputs


def image_name(app: str, version: str) -> str:
    """``radfusion-<app>:<version>`` (the app folder name with ``-`` for ``_``)."""
    return f"radfusion-{app.replace('_', '-')}:{version}"


def git_revision(repo: Path) -> str | None:
    """The checked-out commit, with ``-dirty`` when the tree has changes; None without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def model_dirs(options: BuildOptions) -> tuple[Path, ...]:
    """The model folders to ship: ``--model`` ones, else the app's defaults.

    Raises:
        BuildError: a folder has no ``model.yaml``.
    """
    if options.models is not None:
        dirs = options.models
    else:
        names = DEFAULT_MODELS.get(options.app, ())
        dirs = tuple(REPO / "packaging" / "models" / n for n in names)
    for d in dirs:
        if not (d / "model.yaml").is_file():
            raise BuildError(f"model folder {d} has no model.yaml")
    return dirs


def radfusion_config(app: str, models: Sequence[Path]) -> str:
    """The radfusion configuration inside the image: the app uses the packaged model."""
    lines = [
        "# radfusion configuration of this MAP (RADFUSION_CONFIG points here). To change it,",
        "# mount your own file and set RADFUSION_CONFIG to its path; see /opt/holoscan/docs.",
    ]
    if models:
        model_yaml = f"{mm.MODELS_DIR}/{models[0].name}/model.yaml"
        lines += ["apps:", f"  {app}:", f"    model: {model_yaml}"]
    return "\n".join(lines) + "\n"


def check_python() -> None:
    """Raises BuildError unless this Python matches the image's (wheel tags must match)."""
    if sys.version_info[:2] != PYTHON:
        raise BuildError(
            f"run the builder with Python {PYTHON[0]}.{PYTHON[1]} (the image's Python); "
            f"this is {sys.version.split()[0]}"
        )


def build_wheel(commands: CommandLog, out: Path) -> Path:
    """The radfusion wheel built from the repository into ``out``; returns its path."""
    shutil.rmtree(out, ignore_errors=True)
    commands.run(
        (sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO))
    )
    wheels = sorted(out.glob("radfusion-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one radfusion wheel in {out}, found {len(wheels)}")
    return wheels[0]


def build_wheelhouse(commands: CommandLog, wheel: Path, out: Path) -> None:
    """Every wheel the image needs, into ``out``, resolved by this machine's pip."""
    out.mkdir(parents=True, exist_ok=True)
    commands.run((sys.executable, "-m", "pip", "wheel", "-q", "-w", str(out), *PINNED, str(wheel)))
    pip_wheel = (sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out))
    commands.run((*pip_wheel, *WITHOUT_DEPENDENCIES))


def base_tarball(commands: CommandLog, options: BuildOptions) -> Path:
    """A Debian minbase root filesystem with Python as a tarball, cached in the work folder.

    Trimmed of apt's package cache and lists, man pages and locales (about 130 MB).
    """
    tag = "-".join(BASE_PACKAGES)
    tarball = options.work / "cache" / f"debian-{options.suite}-minbase-{tag}.tar"
    if tarball.is_file() and not options.refresh_base:
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=options.work) as tmp:
        root = Path(tmp) / "rootfs"
        commands.run(
            (
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                options.suite,
                str(root),
                options.mirror,
            )
        )
        trim(root)
        partial = tarball.with_suffix(".part")
        commands.run(("tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."))
        partial.replace(tarball)
    return tarball


def trim(root: Path) -> None:
    """Drop what a container does not need: apt's downloaded packages and package lists (an
    ``apt-get update`` fetches them again), man pages and message translations."""
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (root / cache).glob("*"):
            if item.is_file():
                item.unlink()
    for folder in ("usr/share/man", "usr/share/locale"):
        shutil.rmtree(root / folder, ignore_errors=True)


# --------------------------------------------------------------------------- image


@dataclass(frozen=True)
class Plan:
    """A build's inputs, checked before anything runs."""

    app_dir: Path
    meta: mm.AppMetadata
    models: tuple[Path, ...]
    image: str
    archives: dict[str, Path]  # transport → archive file


def make_plan(options: BuildOptions) -> Plan:
    """Read the app's ``app.yaml`` and settle the image name, models and archive paths.

    Raises:
        BuildError: ``app.yaml`` is missing or invalid, or a model folder has no model.yaml.
    """
    app_dir = REPO / "apps" / options.app
    try:
        meta = mm.read_app_yaml(app_dir / "app.yaml")
    except mm.ManifestError as err:
        raise BuildError(str(err)) from None
    image = image_name(options.app, meta.version)
    out_dir = options.out_dir or options.work
    stem = image.replace(":", "-")
    archives = {f: out_dir / f"{stem}.{f.removesuffix('-archive')}.tar" for f in options.formats}
    return Plan(app_dir, meta, model_dirs(options), image, archives)


def installed_versions(commands: CommandLog, container: str) -> dict[str, str]:
    """``name → version`` of the venv's packages (names lower-case, ``-`` for ``_``)."""
    freeze = commands.chroot(container, f"{VENV}/bin/pip", "freeze", capture=True)
    versions = {}
    for line in freeze.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            versions[re.sub(r"[-_.]+", "-", name).lower()] = version
    return versions


def semantic_version(versions: dict[str, str], name: str) -> str:
    """An installed package's version as a semantic version (local/post parts dropped).

    Raises:
        BuildError: the package is not installed.
    """
    if name not in versions:
        raise BuildError(f"{name} is not installed in the image")
    match = re.match(r"\d+\.\d+\.\d+", versions[name])
    return match.group(0) if match else versions[name]


def install(
    commands: CommandLog, container: str, base: Path, wheel: Path, options: BuildOptions
) -> None:
    """Base filesystem, venv with radfusion installed offline, CUDA runtime path, user."""
    commands.buildah("add", container, str(base), "/")
    commands.chroot(container, "python3", "-m", "venv", VENV)
    wheelhouse = f"{options.work / 'wheelhouse'}:/tmp/wheelhouse:ro"
    offline = (
        f"{VENV}/bin/pip",
        "install",
        "--no-cache-dir",
        "--no-index",
        "--disable-pip-version-check",
        "--find-links=/tmp/wheelhouse",
    )
    commands.chroot(
        container,
        *offline,
        *PINNED,
        f"/tmp/radfusion/{wheel.name}",
        volumes=(wheelhouse, f"{wheel.parent}:/tmp/radfusion:ro"),
    )
    commands.chroot(container, *offline, "--no-deps", *WITHOUT_DEPENDENCIES, volumes=(wheelhouse,))
    script = (
        f"echo {CUDART_DIR} > /etc/ld.so.conf.d/nvidia-cuda-runtime.conf && ldconfig && "
        f"groupadd -g {options.gid} {USER} && "
        f"useradd -m -u {options.uid} -g {options.gid} -s /bin/bash {USER}"
    )
    commands.chroot(container, "sh", "-c", script)


def manifests(plan: Plan, versions: dict[str, str], options: BuildOptions) -> tuple[dict, dict]:
    """``app.json`` and ``pkg.json`` for the plan, with the SDK version installed."""
    app_json = mm.application_manifest(
        plan.meta,
        command=[f"{VENV}/bin/python3", "-m", f"radfusion.apps.{options.app}.app"],
        sdk="monai-deploy",
        sdk_version=semantic_version(versions, "monai-deploy-app-sdk"),
        timeout=options.timeout,
        extra_env={"RADFUSION_CONFIG": RADFUSION_CONFIG},
    )
    models = [mm.ModelEntry(m.name, m.name) for m in plan.models]
    return app_json, mm.package_manifest(plan.meta, models=models)


def copy_file(source: Path, target: Path, mode: int = 0o644) -> None:
    """Copy one file into the image's root filesystem (parents created)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def write_text(target: Path, text: str) -> None:
    """Write a text file into the image's root filesystem (parents created)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def inside(root: Path, path: str) -> Path:
    """``path`` (absolute, in the image) under the mounted root filesystem ``root``."""
    return root / path.lstrip("/")


def lay_out(
    root: Path,
    plan: Plan,
    wheel: Path,
    documents: tuple[dict, dict],
    freeze: str,
    options: BuildOptions,
) -> None:
    """Write the MAP layout into the mounted root filesystem ``root``."""
    mm.write_json(inside(root, mm.APP_MANIFEST_PATH), documents[0])
    mm.write_json(inside(root, mm.PKG_MANIFEST_PATH), documents[1])
    copy_file(plan.app_dir / "app.yaml", inside(root, mm.CONFIG_PATH))
    copy_file(TOOLS_SOURCE, inside(root, mm.TOOLS_PATH), mode=0o755)
    write_text(inside(root, RADFUSION_CONFIG), radfusion_config(options.app, plan.models))
    copy_file(wheel, inside(root, mm.APP_DIR) / wheel.name)
    docs = inside(root, mm.DOCS_DIR)
    copy_file(README_SOURCE, docs / "README.md")
    write_text(docs / "python-packages.txt", freeze + "\n")
    for model in plan.models:
        shutil.copytree(
            model,
            inside(root, mm.MODELS_DIR) / model.name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
        if (model / "MODEL_CARD.md").is_file():
            copy_file(model / "MODEL_CARD.md", docs / "models" / model.name / "MODEL_CARD.md")
    for folder in (mm.WORKDIR, mm.INPUT_DIR, mm.OUTPUT_DIR, mm.LOGS_DIR):
        inside(root, folder).mkdir(parents=True, exist_ok=True)
        os.chown(inside(root, folder), options.uid, options.gid)


def config_args(labels: dict[str, str], options: BuildOptions) -> list[str]:
    """``buildah config`` arguments: entry point, user, working folder, environment, labels."""
    args = [
        f"--entrypoint={json.dumps([mm.TOOLS_PATH])}",
        "--cmd=",
        f"--workingdir={mm.WORKDIR}",
        f"--user={options.uid}:{options.gid}",
        "--os=linux",
        "--arch=amd64",
        "--created-by=radfusion packaging/map/build_map.py",
    ]
    env = {**mm.environment({"RADFUSION_CONFIG": RADFUSION_CONFIG}), **IMAGE_ENV}
    args += [f"--env={name}={value}" for name, value in env.items()]
    for name, value in labels.items():
        args += [f"--label={name}={value}", f"--annotation={name}={value}"]
    return args


def labels_for(plan: Plan, versions: dict[str, str], options: BuildOptions) -> dict[str, str]:
    """The image's OCI labels, including the SDK versions installed."""
    return mm.image_labels(
        plan.meta,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        revision=git_revision(REPO),
        extra={
            "org.radfusion.base": f"debootstrap --variant=minbase {options.suite} "
            f"+ {' '.join(BASE_PACKAGES)}",
            "org.monai.deploy.app-sdk": semantic_version(versions, "monai-deploy-app-sdk"),
            "org.nvidia.holoscan": semantic_version(versions, "holoscan-cu13"),
        },
    )


def finish(
    commands: CommandLog, container: str, plan: Plan, wheel: Path, options: BuildOptions
) -> int:
    """Lay out the MAP in the container and configure it; returns the rootfs size in bytes."""
    versions = installed_versions(commands, container)
    freeze = "\n".join(f"{k}=={v}" for k, v in sorted(versions.items()))
    root = Path(commands.buildah("mount", container, capture=True))
    try:
        lay_out(root, plan, wheel, manifests(plan, versions, options), freeze, options)
        size = tree_bytes(root)
    finally:
        commands.buildah("umount", container)
    commands.buildah(
        "config", *config_args(labels_for(plan, versions, options), options), container
    )
    return size


def build(options: BuildOptions) -> BuildResult:
    """Build the app's MAP image and write its archive; see the module docstring.

    Raises:
        BuildError: a tool is missing, a step fails (the message quotes its log), or the
            app's ``app.yaml`` is invalid.
    """
    require_tools("buildah", "debootstrap", "tar")
    check_python()
    plan = make_plan(options)
    commands = CommandLog(options.work / "build.log")
    seconds: dict[str, float] = {}
    with step("wheel", seconds):
        wheel = build_wheel(commands, options.work / "wheels")
    with step("wheelhouse", seconds):
        build_wheelhouse(commands, wheel, options.work / "wheelhouse")
    with step("base", seconds):
        base = base_tarball(commands, options)
    container = commands.buildah("from", "scratch", capture=True)
    committed = False
    try:
        with step("install", seconds):
            install(commands, container, base, wheel, options)
        with step("layout", seconds):
            rootfs_bytes = finish(commands, container, plan, wheel, options)
        with step("commit", seconds):
            commands.buildah("commit", "--format=oci", "--rm", "--quiet", container, plan.image)
            container, committed = "", True
        with step("archive", seconds):
            for transport, archive in plan.archives.items():
                archive.parent.mkdir(parents=True, exist_ok=True)
                archive.unlink(missing_ok=True)
                commands.buildah(
                    "push", "--quiet", plan.image, f"{transport}:{archive}:{plan.image}"
                )
    finally:
        if container:
            commands.buildah("rm", container)
        if committed and not options.keep_image:
            commands.buildah("rmi", plan.image)
    sizes = {a: a.stat().st_size for a in plan.archives.values()}
    return BuildResult(plan.image, sizes, rootfs_bytes, seconds)


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            path = Path(dirpath) / f
            if not path.is_symlink():
                total += path.stat().st_size
    return total


# --------------------------------------------------------------------------- smoke test


@dataclass
class SmokeResult:
    """What a smoke run found: files written, dciodvfy errors per file, seconds."""

    outputs: list[Path]
    dciodvfy_errors: dict[str, int]
    run_seconds: float
    seconds: dict[str, float] = field(default_factory=dict)


def dciodvfy_errors(path: Path) -> int:
    """Number of ``Error`` lines dciodvfy reports for one DICOM file."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return sum(line.startswith("Error") for line in (proc.stdout + proc.stderr).splitlines())


def image_user(commands: CommandLog, container: str) -> tuple[int, int]:
    """The numeric ``uid:gid`` the image runs as (``0:0`` when none is set)."""
    user = commands.buildah("inspect", "--format={{.OCIv1.Config.User}}", container, capture=True)
    uid, _, gid = (user or "0:0").partition(":")
    return int(uid), int(gid or uid)


def check_show_and_extract(
    commands: CommandLog, container: str, work: Path, uid: int, gid: int
) -> None:
    """``tools show`` prints both manifests; ``tools extract`` copies the same ones out.

    Raises:
        BuildError: either disagrees with the other or a manifest is missing.
    """
    shown = commands.chroot(container, mm.TOOLS_PATH, "show", capture=True)
    if "app.json" not in shown or "pkg.json" not in shown:
        raise BuildError(f"'tools show' printed no manifests:\n{shown[:500]}")
    export = work / "export"
    shutil.rmtree(export, ignore_errors=True)
    (export / "config").mkdir(parents=True)
    os.chown(export / "config", uid, gid)
    commands.chroot(container, mm.TOOLS_PATH, "extract", volumes=(f"{export}:{EXPORT_MOUNT}",))
    for name in ("app.json", "pkg.json", "app.yaml"):
        if not (export / "config" / name).is_file():
            raise BuildError(f"'tools extract' did not export config/{name}")
    app_json = json.loads((export / "config" / "app.json").read_text())
    if json.dumps(app_json, indent=2, ensure_ascii=False) not in shown:
        raise BuildError("'tools show' and the extracted app.json differ")


def smoke(archive: Path, input_dir: Path, output_dir: Path, work: Path) -> SmokeResult:
    """Run the MAP in ``archive`` on ``input_dir`` and check what it writes to ``output_dir``.

    Loads the archive into buildah's storage (removed again afterwards unless it was there
    before), checks ``show`` and ``extract``, then runs the entry point with the input
    mounted read-only and an emptied ``output_dir`` owned by the image's user.

    Raises:
        BuildError: the image cannot be loaded or run, writes no DICOM file, or
            ``dciodvfy`` is missing.
    """
    require_tools("buildah", "dciodvfy")
    work.mkdir(parents=True, exist_ok=True)
    commands = CommandLog(work / "smoke.log")
    seconds: dict[str, float] = {}
    before = set(commands.buildah("images", "--quiet", "--no-trunc", capture=True).split())
    transport = "docker-archive" if archive.name.endswith(".docker.tar") else "oci-archive"
    with step("load", seconds):
        container = commands.buildah("from", f"{transport}:{archive}", capture=True)
    image = commands.buildah("inspect", "--format={{.FromImageID}}", container, capture=True)
    try:
        uid, gid = image_user(commands, container)
        with step("show+extract", seconds):
            check_show_and_extract(commands, container, work, uid, gid)
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
        os.chown(output_dir, uid, gid)
        with step("run", seconds):
            commands.chroot(
                container,
                mm.TOOLS_PATH,
                volumes=(
                    f"{input_dir.resolve()}:{mm.INPUT_DIR}:ro",
                    f"{output_dir.resolve()}:{mm.OUTPUT_DIR}",
                ),
            )
    finally:
        commands.buildah("rm", container)
        if image and not any(i.endswith(image) for i in before):
            commands.buildah("rmi", "--force", image)
    outputs = sorted(output_dir.glob("*.dcm"))
    if not outputs:
        raise BuildError(f"the app wrote no DICOM file to {output_dir} (log: {commands.path})")
    errors = {p.name: dciodvfy_errors(p) for p in outputs}
    return SmokeResult(outputs, errors, seconds["run"], seconds)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``build`` / ``smoke``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an app's MAP image and archive")
    b.add_argument("--app", default="lung_ct", help="folder under apps/ (default lung_ct)")
    b.add_argument("--work", type=Path, default=REPO / "build" / "map", help="work folder")
    b.add_argument("--out-dir", type=Path, help="where the archives go (default: --work)")
    b.add_argument("--model", type=Path, action="append", help="model folder (repeatable)")
    b.add_argument(
        "--format",
        choices=("oci-archive", "docker-archive"),
        action="append",
        help="archive format, repeatable (default oci-archive; docker-archive for docker load)",
    )
    b.add_argument("--mirror", default=BuildOptions.mirror, help="Debian mirror")
    b.add_argument("--uid", type=int, default=1000, help="uid of the image's user")
    b.add_argument("--gid", type=int, default=1000, help="gid of the image's user")
    b.add_argument("--timeout", type=int, default=0, help="app.json timeout, s (0: none)")
    b.add_argument("--keep-image", action="store_true", help="keep it in buildah's storage")
    b.add_argument("--refresh-base", action="store_true", help="debootstrap the base anew")
    s = sub.add_parser("smoke", help="run a MAP archive on a study folder and check its output")
    s.add_argument("archive", type=Path)
    s.add_argument("--input", type=Path, required=True, help="study folder (DICOM files)")
    s.add_argument("--output", type=Path, required=True, help="results folder (emptied)")
    s.add_argument("--work", type=Path, default=REPO / "build" / "map" / "smoke")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> BuildOptions:
    """``BuildOptions`` from the ``build`` command line."""
    return BuildOptions(
        app=args.app,
        work=args.work.resolve(),
        out_dir=args.out_dir.resolve() if args.out_dir else None,
        models=tuple(m.resolve() for m in args.model) if args.model else None,
        formats=tuple(dict.fromkeys(args.format or ["oci-archive"])),
        mirror=args.mirror,
        uid=args.uid,
        gid=args.gid,
        timeout=args.timeout,
        keep_image=args.keep_image,
        refresh_base=args.refresh_base,
    )


def build_summary(result: BuildResult) -> dict[str, object]:
    """The JSON summary ``build`` prints: image, archive sizes (MiB), step seconds."""
    return {
        "image": result.image,
        "archives_mb": {str(a): round(n / 2**20, 1) for a, n in result.archives.items()},
        "rootfs_mb": round(result.rootfs_bytes / 2**20, 1),
        "seconds": result.seconds,
        "total_seconds": round(sum(result.seconds.values()), 1),
    }


def smoke_summary(found: SmokeResult) -> dict[str, object]:
    """The JSON summary ``smoke`` prints: files written, dciodvfy errors, step seconds."""
    return {
        "outputs": [str(p) for p in found.outputs],
        "dciodvfy_errors": found.dciodvfy_errors,
        "seconds": found.seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints a JSON summary on stdout, errors on stderr (exit 1 on failure,
    including any dciodvfy error in a smoke run)."""
    args = parse_args(argv)
    failed = False
    try:
        if args.command == "build":
            summary = build_summary(build(options_from(args)))
        else:
            found = smoke(args.archive.resolve(), args.input, args.output, args.work.resolve())
            summary = smoke_summary(found)
            failed = any(found.dciodvfy_errors.values())
    except BuildError as err:
        print(f"[map] error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    if failed:
        print("[map] dciodvfy found errors", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
