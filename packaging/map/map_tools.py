#!/usr/bin/env python3
"""The MAP's entry point, installed in the image as ``/var/holoscan/tools``.

What a MONAI Application Package answers when started (MAP specification, "Container Behavior
and Interaction"; the same commands as the reference packager's ``tools`` script):

``show [app|pkg]``
    print the manifests ``/etc/holoscan/app.json`` and ``/etc/holoscan/pkg.json``.
``extract``
    copy the package's parts to a mounted ``/var/run/holoscan/export/``: its sub-folder
    ``app``, ``config``, ``models`` or ``docs`` when one of those is mounted, else all four.
``env``
    print the environment.
``help``
    print this usage.
anything else (or nothing)
    run the application: the command in ``app.json``, with the arguments given appended.

Standard library only: it runs with the image's Python before anything else is imported.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

EXPORT_ROOT = Path("/var/run/holoscan/export")
STACK_BYTES = 32 * 1024 * 1024  # Holoscan warns below 32 MiB of stack (rare deep-graph crashes)

USAGE = """\
USAGE: /var/holoscan/tools [command] [arguments]...
 Commands:
    (none)   run the application on HOLOSCAN_INPUT_PATH, writing HOLOSCAN_OUTPUT_PATH
    show     print the manifests: show [app|pkg]
    extract  copy parts of the package to the mounted folder /var/run/holoscan/export:
               .../export/app     the application (/opt/holoscan/app)
               .../export/config  app.json, pkg.json and the application's app.yaml
               .../export/models  the models (/opt/holoscan/models)
               .../export/docs    documentation and licences (/opt/holoscan/docs)
               .../export         all of the above
             create the host folder first, writable by the image's user
    env      print the environment
    help     print this text
"""


class ToolError(RuntimeError):
    """A command cannot be carried out; the message says why and what to do."""


def env_path(name: str, default: str) -> Path:
    """The path in environment variable ``name`` (the package default when unset)."""
    return Path(os.environ.get(name) or default)


def app_manifest_path() -> Path:
    """Where ``app.json`` is (``HOLOSCAN_APP_MANIFEST_PATH``)."""
    return env_path("HOLOSCAN_APP_MANIFEST_PATH", "/etc/holoscan/app.json")


def pkg_manifest_path() -> Path:
    """Where ``pkg.json`` is (``HOLOSCAN_PKG_MANIFEST_PATH``)."""
    return env_path("HOLOSCAN_PKG_MANIFEST_PATH", "/etc/holoscan/pkg.json")


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest as a mapping.

    Raises:
        ToolError: it is missing or not a JSON object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ToolError(f"cannot read manifest {path}: {err.strerror}") from None
    except ValueError as err:
        raise ToolError(f"manifest {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ToolError(f"manifest {path} is not a JSON object")
    return data


def command_argv(manifest: dict[str, Any]) -> list[str]:
    """The application's argument list from ``app.json#command``.

    The packager writes a JSON-encoded list in a string; a plain shell-style string and a JSON
    list are accepted too.

    Raises:
        ToolError: no usable command.
    """
    command = manifest.get("command")
    if isinstance(command, str):
        text = command.strip()
        argv = json.loads(text) if text.startswith("[") else shlex.split(text)
    else:
        argv = command
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ToolError(f"app.json#command {command!r} is not a command")
    return argv


def show(which: Sequence[str]) -> str:
    """The text ``show`` prints: the manifests selected by ``which`` (``app``, ``pkg``)."""
    selected = [w for w in which if w in ("app", "pkg")] or ["app", "pkg"]
    parts = []
    for name in selected:
        path = app_manifest_path() if name == "app" else pkg_manifest_path()
        parts.append(f"{'=' * 30} {name}.json {'=' * 30}")
        parts.append(json.dumps(read_manifest(path), indent=2, ensure_ascii=False))
    return "\n".join(parts) + "\n"


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a folder's contents into ``target`` (created when missing)."""
    if not source.is_dir():
        raise ToolError(f"{source} is not in this package")
    shutil.copytree(source, target, dirs_exist_ok=True)


def _copy_config(target: Path) -> None:
    """Copy app.json, pkg.json and the application's configuration file into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    config = env_path("HOLOSCAN_CONFIG_PATH", "/var/holoscan/app.yaml")
    for source in (app_manifest_path(), pkg_manifest_path(), config):
        if source.is_file():
            shutil.copy2(source, target / source.name)


def extract(export_root: Path = EXPORT_ROOT) -> list[str]:
    """Copy the parts of the package whose folder is mounted under ``export_root``.

    Returns the names of the parts copied.

    Raises:
        ToolError: nothing is mounted there, or the mounted folder is not writable.
    """
    if not export_root.is_dir():
        raise ToolError(
            f"no folder is mounted at {export_root}: e.g. docker run -v DIR:{export_root} "
            "IMAGE extract"
        )
    parts = {
        "app": lambda t: _copy_tree(env_path("HOLOSCAN_APPLICATION", "/opt/holoscan/app"), t),
        "config": _copy_config,
        "models": lambda t: _copy_tree(env_path("HOLOSCAN_MODEL_PATH", "/opt/holoscan/models"), t),
        "docs": lambda t: _copy_tree(env_path("HOLOSCAN_DOCS", "/opt/holoscan/docs"), t),
    }
    mounted = [name for name in parts if (export_root / name).is_dir()]
    chosen = mounted[:1] or list(parts)
    for name in chosen:
        target = export_root / name
        writable = target if target.is_dir() else export_root
        if not os.access(writable, os.W_OK):
            raise ToolError(f"{writable} is not writable by uid {os.getuid()}")
        parts[name](target)
    return chosen


def raise_stack_limit(wanted: int = STACK_BYTES) -> None:
    """Raise the soft stack limit to ``wanted`` bytes where the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_STACK, (target, hard))


def check_folders() -> None:
    """Fail early, with the fix, when the input is missing or the output is not writable.

    Raises:
        ToolError: naming the folder and what to mount.
    """
    input_dir = env_path("HOLOSCAN_INPUT_PATH", "/var/holoscan/input")
    output_dir = env_path("HOLOSCAN_OUTPUT_PATH", "/var/holoscan/output")
    if not input_dir.is_dir():
        raise ToolError(f"input folder {input_dir} is missing: mount the study folder there")
    output_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise ToolError(
            f"output folder {output_dir} is not writable by uid {os.getuid()}: make the host "
            "folder writable for that uid, or run the container as the folder's owner "
            "(docker run --user $(id -u):$(id -g) ...)"
        )


def ensure_identity() -> None:
    """Give an arbitrary uid (``docker run --user``, OpenShift) a name and a writable home.

    Such a uid has no ``/etc/passwd`` entry, and libraries that ask for the user name
    (``getpass.getuser()``, which MONAI calls on import) then fail; HOME may not be writable.
    """
    try:
        pwd.getpwuid(os.getuid())
    except KeyError:
        for name in ("USER", "LOGNAME"):
            os.environ.setdefault(name, f"uid{os.getuid()}")
    home = os.environ.get("HOME")
    if not home or not os.access(home, os.W_OK):
        os.environ["HOME"] = "/tmp"


def launch(args: Sequence[str]) -> NoReturn:
    """Replace this process with the application (``app.json#command`` + ``args``).

    Raises:
        ToolError: no command, missing input, or unwritable output.
    """
    argv = command_argv(read_manifest(app_manifest_path())) + list(args)
    check_folders()
    ensure_identity()
    raise_stack_limit()
    print(f"[MAP] launching: {shlex.join(argv)}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch the command line; returns the exit status (the application's when it runs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    try:
        if command == "show":
            sys.stdout.write(show(args[1:]))
        elif command == "env":
            sys.stdout.write("".join(f"{k}={v}\n" for k, v in sorted(os.environ.items())))
        elif command == "extract":
            for name in extract():
                print(f"[MAP] extracted {name} to {EXPORT_ROOT}", file=sys.stderr)
        elif command in ("help", "-h", "--help"):
            sys.stdout.write(USAGE)
        else:
            launch(args)
    except ToolError as err:
        print(f"[MAP] error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
