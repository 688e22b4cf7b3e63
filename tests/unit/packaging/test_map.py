"""MAP packaging (packaging/map/): manifests from app.yaml, the image's entry point, builder parts.

The full image build (debootstrap + buildah, minutes, network) is a release step, described
in packaging/map/README.md. These tests check what it writes, fast.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from radfusion.config import parse_config

REPO = Path(__file__).resolve().parents[3]
MAP_DIR = REPO / "packaging" / "map"
APP_YAML = REPO / "apps" / "lung_ct" / "app.yaml"
SEMVER = re.compile(r"\d+\.\d+\.\d+([-+].*)?")
# The MAP specification's environment variables and their defaults (table of environment
# variables; manifest paths as in its manifests section).
SPEC_ENV = {
    "HOLOSCAN_INPUT_PATH": "/var/holoscan/input",
    "HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output",
    "HOLOSCAN_WORKDIR": "/var/holoscan",
    "HOLOSCAN_MODEL_PATH": "/opt/holoscan/models",
    "HOLOSCAN_CONFIG_PATH": "/var/holoscan/app.yaml",
    "HOLOSCAN_APP_MANIFEST_PATH": "/etc/holoscan/app.json",
    "HOLOSCAN_PKG_MANIFEST_PATH": "/etc/holoscan/pkg.json",
    "HOLOSCAN_DOCS": "/opt/holoscan/docs",
    "HOLOSCAN_LOGS": "/var/holoscan/logs",
}


def load(name: str) -> ModuleType:
    """Import packaging/map/<name>.py under its own name (packaging/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MAP_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


mm = load("map_manifest")
tools = load("map_tools")
builder = load("build_map")  # imports map_manifest, already registered above

COMMAND = ["/opt/holoscan/venv/bin/python3", "-m", "radfusion.apps.lung_ct.app"]


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(APP_YAML.read_text())


@pytest.fixture(scope="module")
def app_json() -> dict[str, Any]:
    meta = mm.read_app_yaml(APP_YAML)
    return mm.application_manifest(
        meta, command=COMMAND, sdk="monai-deploy", sdk_version="4.0.0", timeout=0
    )


@pytest.fixture(scope="module")
def pkg_json() -> dict[str, Any]:
    meta = mm.read_app_yaml(APP_YAML)
    return mm.package_manifest(meta, models=[mm.ModelEntry("lung_ct_seg", "lung_ct_seg")])


# ------------------------------------------------------------------ app.json


def test_app_json_has_the_required_fields(app_json: dict[str, Any]) -> None:
    for key in ("command", "input", "output", "environment"):
        assert key in app_json, key
    assert app_json["input"]["formats"]
    assert app_json["output"]["format"] and app_json["output"]["formats"]
    assert app_json["type"] in ("application", "service")
    assert SEMVER.fullmatch(app_json["apiVersion"])
    assert SEMVER.fullmatch(app_json["sdkVersion"])
    assert app_json["workingDirectory"].startswith("/")
    assert isinstance(app_json["timeout"], int) and app_json["timeout"] >= 0


def test_app_json_follows_app_yaml(app_json: dict[str, Any], raw: dict[str, Any]) -> None:
    application = raw["application"]
    assert app_json["version"] == application["version"]
    assert app_json["input"]["formats"] == application["inputFormats"]
    assert app_json["output"]["formats"] == application["outputFormats"]
    assert app_json["output"]["format"] == application["outputFormats"]


def test_command_is_a_json_encoded_argument_list(app_json: dict[str, Any]) -> None:
    """As the reference packager writes it, and its tools script reads it (jq fromjson)."""
    assert isinstance(app_json["command"], str)
    assert json.loads(app_json["command"]) == COMMAND
    assert tools.command_argv(app_json) == COMMAND


def test_environment_has_the_specification_variables(app_json: dict[str, Any]) -> None:
    env = app_json["environment"]
    for name, default in SPEC_ENV.items():
        assert env[name].rstrip("/") == default, name
    assert env["HOLOSCAN_APPLICATION"] == "/opt/holoscan/app"
    # input/output paths are relative to the working directory and agree with the variables
    workdir = app_json["workingDirectory"]
    assert f"{workdir}/{app_json['input']['path']}".rstrip("/") == env["HOLOSCAN_INPUT_PATH"]
    assert f"{workdir}/{app_json['output']['path']}".rstrip("/") == env["HOLOSCAN_OUTPUT_PATH"]


def test_extra_environment_is_added_but_cannot_move_the_layout() -> None:
    assert mm.environment({"RADFUSION_CONFIG": "/x.yaml"})["RADFUSION_CONFIG"] == "/x.yaml"
    with pytest.raises(mm.ManifestError, match="HOLOSCAN_INPUT_PATH"):
        mm.environment({"HOLOSCAN_INPUT_PATH": "/elsewhere"})


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"command": []}, "command"),
        ({"timeout": -1}, "timeout"),
        ({"sdk_version": "4"}, "sdkVersion"),
    ],
)
def test_bad_application_arguments_name_the_field(kwargs: dict[str, Any], key: str) -> None:
    args: dict[str, Any] = {"command": COMMAND, "sdk": "monai-deploy", "sdk_version": "4.0.0"}
    with pytest.raises(mm.ManifestError, match=key):
        mm.application_manifest(mm.read_app_yaml(APP_YAML), **{**args, **kwargs})


# ------------------------------------------------------------------ pkg.json, labels


def test_pkg_json_follows_app_yaml(pkg_json: dict[str, Any], raw: dict[str, Any]) -> None:
    assert pkg_json["version"] == raw["application"]["version"]
    assert pkg_json["resources"] == raw["resources"]
    assert pkg_json["applicationRoot"] == "/opt/holoscan/app"
    assert pkg_json["modelRoot"] == "/opt/holoscan/models"
    assert SEMVER.fullmatch(pkg_json["apiVersion"])


def test_pkg_json_models_are_the_shipped_model_folders(pkg_json: dict[str, Any]) -> None:
    for model in pkg_json["models"]:
        assert re.fullmatch(r"\S{1,128}", model["name"])
        assert not model["path"].startswith("/")
        assert (REPO / "packaging" / "models" / model["path"] / "model.yaml").is_file()
    assert [m.name for m in builder.model_dirs(builder.BuildOptions("lung_ct", REPO))] == [
        m["path"] for m in pkg_json["models"]
    ]


def test_labels_carry_the_required_title_and_version(raw: dict[str, Any]) -> None:
    labels = mm.image_labels(mm.read_app_yaml(APP_YAML), created="2026-11-23T12:00:00Z")
    assert labels["org.opencontainers.image.title"] == raw["application"]["title"]
    assert labels["org.opencontainers.image.version"] == raw["application"]["version"]


def test_manifests_are_written_as_utf8_json(tmp_path: Path, app_json: dict[str, Any]) -> None:
    path = mm.write_json(tmp_path / "etc" / "app.json", app_json)
    assert json.loads(path.read_text(encoding="utf-8")) == app_json


# ------------------------------------------------------------------ app.yaml validation

GOOD = {
    "application": {
        "title": "t",
        "version": "1.2.3",
        "inputFormats": ["file"],
        "outputFormats": ["file"],
    },
    "resources": {"cpu": 1.5, "gpu": 0, "memory": "1.5Gi", "sharedMemory": "64Mi"},
}


def with_change(section: str, key: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(GOOD))
    if value is None:
        del data[section][key]
    else:
        data[section][key] = value
    return data


def test_a_good_app_yaml_parses() -> None:
    meta = mm.parse_app_metadata(GOOD)
    assert meta.version == "1.2.3" and meta.resources["memory"] == "1.5Gi"


def test_packager_kebab_case_formats_are_accepted() -> None:
    data = json.loads(json.dumps(GOOD))
    data["application"]["input-formats"] = data["application"].pop("inputFormats")
    assert mm.parse_app_metadata(data).input_formats == ("file",)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (with_change("application", "title", None), "application.title"),
        (with_change("application", "title", "  "), "application.title"),
        (with_change("application", "version", "1.0"), "application.version"),
        (with_change("application", "inputFormats", None), "application.inputFormats"),
        (with_change("application", "outputFormats", []), "application.outputFormats"),
        (with_change("application", "tittle", "x"), "application.tittle"),
        (with_change("resources", "memory", "3GB"), "resources.memory"),
        (with_change("resources", "cpu", 1.25), "resources.cpu"),
        (with_change("resources", "gpu", -1), "resources.gpu"),
        (with_change("resources", "cpus", 2), "resources.cpus"),
        (with_change("resources", "fragments", {"a b": {}}), "resources.fragments"),
        ({"resources": {}}, "application"),
    ],
)
def test_bad_app_yaml_is_refused_naming_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(mm.ManifestError, match=re.escape(key)):
        mm.parse_app_metadata(data, "app.yaml")


def test_unreadable_app_yaml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(mm.ManifestError, match="cannot read"):
        mm.read_app_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("application: [")
    with pytest.raises(mm.ManifestError, match="not valid YAML"):
        mm.read_app_yaml(tmp_path / "bad.yaml")


@pytest.mark.parametrize(("name", "path"), [("a b", "x"), ("x" * 129, "x"), ("m", "/abs")])
def test_bad_model_entries_are_refused(name: str, path: str) -> None:
    with pytest.raises(mm.ManifestError):
        mm.ModelEntry(name, path)


def test_duplicate_model_names_are_refused() -> None:
    meta = mm.parse_app_metadata(GOOD)
    with pytest.raises(mm.ManifestError, match="duplicate"):
        mm.package_manifest(meta, models=[mm.ModelEntry("m", "a"), mm.ModelEntry("m", "b")])


# ------------------------------------------------------------------ the image's entry point


@pytest.fixture
def package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, app_json: dict, pkg_json: dict
) -> Path:
    """A fake MAP layout under tmp_path, with the HOLOSCAN_* variables pointing into it."""
    layout = {
        "HOLOSCAN_APP_MANIFEST_PATH": mm.write_json(tmp_path / "etc/app.json", app_json),
        "HOLOSCAN_PKG_MANIFEST_PATH": mm.write_json(tmp_path / "etc/pkg.json", pkg_json),
        "HOLOSCAN_CONFIG_PATH": tmp_path / "var/app.yaml",
        "HOLOSCAN_APPLICATION": tmp_path / "opt/app",
        "HOLOSCAN_MODEL_PATH": tmp_path / "opt/models",
        "HOLOSCAN_DOCS": tmp_path / "opt/docs",
        "HOLOSCAN_INPUT_PATH": tmp_path / "var/input",
        "HOLOSCAN_OUTPUT_PATH": tmp_path / "var/output",
    }
    layout["HOLOSCAN_CONFIG_PATH"].parent.mkdir(parents=True)
    layout["HOLOSCAN_CONFIG_PATH"].write_text("application: {}\n")
    for name in ("HOLOSCAN_APPLICATION", "HOLOSCAN_MODEL_PATH", "HOLOSCAN_DOCS"):
        layout[name].mkdir(parents=True)
        (layout[name] / f"{name.lower()}.txt").write_text(name)
    for name, path in layout.items():
        monkeypatch.setenv(name, str(path))
    return tmp_path


def test_show_prints_both_manifests(package: Path, app_json: dict) -> None:
    text = tools.show([])
    assert "app.json" in text and "pkg.json" in text
    assert json.dumps(app_json, indent=2) in text
    assert "= pkg.json =" not in tools.show(["app"])


def test_extract_copies_only_the_mounted_part(package: Path) -> None:
    export = package / "export"
    (export / "config").mkdir(parents=True)
    assert tools.extract(export) == ["config"]
    assert sorted(p.name for p in (export / "config").iterdir()) == [
        "app.json",
        "app.yaml",
        "pkg.json",
    ]
    assert not (export / "models").exists()


def test_extract_copies_everything_when_only_the_root_is_mounted(package: Path) -> None:
    export = package / "export"
    export.mkdir()
    assert tools.extract(export) == ["app", "config", "models", "docs"]
    assert (export / "models" / "holoscan_model_path.txt").is_file()
    assert (export / "docs" / "holoscan_docs.txt").is_file()


def test_extract_without_a_mount_says_how(package: Path) -> None:
    with pytest.raises(tools.ToolError, match="no folder is mounted"):
        tools.extract(package / "nothing-here")


def test_launch_refuses_a_missing_input_folder(
    package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tools.main([]) == 2
    assert "mount the study folder" in capsys.readouterr().err


def test_help_prints_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert tools.main(["help"]) == 0
    out = capsys.readouterr().out
    for command in ("show", "extract", "env"):
        assert command in out


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ('["python3", "-m", "x"]', ["python3", "-m", "x"]),
        ("python3 -m 'x y'", ["python3", "-m", "x y"]),
        (["python3"], ["python3"]),
    ],
)
def test_command_forms(command: Any, argv: list[str]) -> None:
    assert tools.command_argv({"command": command}) == argv


@pytest.mark.parametrize("command", [None, "", "[]", [1]])
def test_bad_commands_are_refused(command: Any) -> None:
    with pytest.raises(tools.ToolError):
        tools.command_argv({"command": command})


# ------------------------------------------------------------------ builder parts


def test_image_config_points_the_app_at_the_packaged_model() -> None:
    models = builder.model_dirs(builder.BuildOptions("lung_ct", REPO))
    config = parse_config(yaml.safe_load(builder.radfusion_config("lung_ct", models)))
    assert str(config.apps.lung_ct.model) == "/opt/holoscan/models/lung_ct_seg/model.yaml"


def test_image_config_runs_the_entry_point_as_the_unprivileged_user() -> None:
    options = builder.BuildOptions("lung_ct", REPO)
    args = builder.config_args({"org.opencontainers.image.title": "t"}, options)
    assert '--entrypoint=["/var/holoscan/tools"]' in args
    assert "--user=1000:1000" in args and "--workingdir=/var/holoscan" in args
    assert "--env=HOLOSCAN_INPUT_PATH=/var/holoscan/input" in args
    assert f"--env=RADFUSION_CONFIG={builder.RADFUSION_CONFIG}" in args
    assert "--annotation=org.opencontainers.image.title=t" in args


def test_torch_is_pinned_to_the_cpu_build() -> None:
    assert "torch==2.13.0" in builder.PINNED


def test_versions_are_read_as_semantic_versions() -> None:
    versions = {"torch": "2.13.0+cpu", "monai-deploy-app-sdk": "4.0.0"}
    assert builder.semantic_version(versions, "torch") == "2.13.0"
    with pytest.raises(builder.BuildError, match="holoscan"):
        builder.semantic_version(versions, "holoscan-cu13")


def test_image_name_follows_the_app_folder() -> None:
    assert builder.image_name("lung_ct", "0.1.0") == "radfusion-lung-ct:0.1.0"


def test_an_unknown_uid_gets_a_user_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker run --user UID: no passwd entry, and MONAI's import asks getpass.getuser()."""

    def no_entry(uid: int) -> None:
        raise KeyError(uid)

    monkeypatch.setattr(tools.pwd, "getpwuid", no_entry)
    for name in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "")
    tools.ensure_identity()
    assert getpass.getuser() == f"uid{tools.os.getuid()}"
    assert tools.os.environ["HOME"] == "/tmp"


def test_the_image_installs_what_the_makefile_installs_without_dependencies() -> None:
    """mirp goes in without its 1.5 GB itk meta-package, in the venv and in the image alike."""
    makefile = (REPO / "Makefile").read_text()
    for requirement in builder.WITHOUT_DEPENDENCIES:
        assert f"MIRP := {requirement}" in makefile
    assert "--no-deps $(MIRP)" in makefile
