"""The pyproject package list must name every Python package folder (they are mapped by hand)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {
    "radfusion": "radfusion",
    "integrations": "radfusion.integrations",
    "operators": "radfusion.operators",
    "apps": "radfusion.apps",
}


def test_every_package_folder_is_listed() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for folder, name in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *rel)))
    data_only = {"radfusion.models", "radfusion.triton"}  # packaging/: data, no package code
    assert found == listed - data_only


def test_reference_model_ships_inside_the_package() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert data["package-dir"]["radfusion.models"] == "packaging/models"
    patterns = data["package-data"]["radfusion.models"]
    for name in ("model.yaml", "model.ts", "MODEL_CARD.md"):
        assert f"*/{name}" in patterns
        assert (REPO / "packaging" / "models" / "lung_ct_seg" / name).is_file()


def test_packaging_folder_does_not_shadow_the_packaging_library() -> None:
    assert not (REPO / "packaging" / "__init__.py").exists()
    import packaging.version

    assert "site-packages" in packaging.version.__file__


def test_triton_templates_ship_inside_the_package() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert data["package-dir"]["radfusion.triton"] == "packaging/triton"
    patterns = data["package-data"]["radfusion.triton"]
    for rel in ("config.pbtxt", "1/model.py"):
        assert f"*/{rel}" in patterns
        assert (REPO / "packaging" / "triton" / "lung_ct_seg" / rel).is_file()
