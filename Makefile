# radfusion — two commands for a fresh machine:
#   make demo   run the whole path on embedded defaults (synthetic CT → node → route → results)
#   make test   lint and run every test (integration tests need dcmtk, dicom3tools, orthanc:
#               see .ci/run for the Debian packages)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch on disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

# Radiomics (mirp) without its declared dependencies: it requires the `itk` meta-package
# (about 1.5 GB) and imports `itk` only to read image files, which radfusion never asks of it;
# itk-core (in pyproject, about 450 MB) satisfies the import, and pyproject lists the rest of
# what it needs. The MAP builder installs it the same way (packaging/map/build_map.py).
MIRP := mirp==2.7.0

# The real tritonserver (2.51, Python backend) the tests serve models with: the nvidia-pytriton
# wheel unpacked without its dependencies (its Python API, which pins numpy<2, is not used).
TRITON := .triton
PYTRITON := nvidia-pytriton==0.7.0

# The test FHIR server (tests/fhir_server: Medplum's FHIR router on Node, pinned by its lock).
FHIR_SERVER := tests/fhir_server

.PHONY: demo test lint clean map map-smoke

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(MIRP)
	touch $@

.venv: $(VENV)/.ready

$(TRITON)/.ready: $(VENV)/.ready
	rm -rf $(TRITON)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --target $(TRITON) $(PYTRITON)
	touch $@

.triton: $(TRITON)/.ready

$(FHIR_SERVER)/node_modules/.ready: $(FHIR_SERVER)/package.json $(FHIR_SERVER)/package-lock.json
	npm ci --prefix $(FHIR_SERVER) --no-audit --no-fund --loglevel=error
	touch $@

demo: $(VENV)/.ready
	$(BIN)/radfusion demo

# lint-imports checks the layers (pyproject [tool.importlinter]) and mypy the types (pyproject
# [tool.mypy]). Both walk a package's folder, and the editable install maps operators/,
# integrations/, apps/ into radfusion only through an import hook, so they read a plain
# installed copy of the package in .lint/ instead (mypy's cache lands in .lint/ too).
lint: $(VENV)/.ready
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf .lint build  # build/lib would carry deleted modules into the copy
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation --target .lint .
	cd .lint && PYTHONPATH=. ../$(BIN)/lint-imports --config ../pyproject.toml
	cd .lint && ../$(BIN)/mypy --config-file ../pyproject.toml -p radfusion

test: $(VENV)/.ready $(TRITON)/.ready $(FHIR_SERVER)/node_modules/.ready lint
	$(BIN)/pytest

# Release artefact: lung-ct as a MONAI Application Package (packaging/map/README.md). Needs
# root and Debian's buildah + debootstrap; ~2.5-4 min; writes build/map/*.tar. Not part of CI.
map: $(VENV)/.ready
	$(BIN)/python packaging/map/build_map.py build --app lung_ct --format oci-archive \
		--format docker-archive

map-smoke: map
	rm -rf build/map/ct && $(BIN)/radfusion synth ct --out build/map/ct --slices 120
	$(BIN)/python packaging/map/build_map.py smoke $$(ls build/map/radfusion-lung-ct-*.oci.tar) \
		--input build/map/ct --output build/map/smoke-out

clean:
	rm -rf $(VENV) $(TRITON) $(FHIR_SERVER)/node_modules build *.egg-info .pytest_cache .ruff_cache .mypy_cache .lint
