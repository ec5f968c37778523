# diaglab: `make lab` opens the suite, `make test` runs every test.
# Both create .venv on first use and install everything the project needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU build by default (small, installs from a local wheel where one exists).
# GPU users: make TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128" lab
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP  := $(VENV)/.diaglab-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export KINETO_LOG_LEVEL := 6
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: lab test install bench html clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	bash scripts/install_browser.sh
	touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

# The notebooks run from a copy outside the repository, as a learner's download would: they
# find data/ through the package (diaglab.paths), never through the working directory.
test: $(STAMP)
	$(VENV)/bin/pytest -q tests
	copy=$$(mktemp -d) && cp -r notebooks "$$copy/" && cd "$$copy/notebooks" && \
	  $(abspath $(VENV))/bin/pytest -q -p no:cacheprovider --nbval --nbval-sanitize-with sanitize.cfg \
	  --nbval-cell-timeout=300 . ; rc=$$?; rm -rf "$$copy"; exit $$rc

bench: $(STAMP)
	$(PY) -m diaglab.bench --preset tiny --json bench-out/cpu_tiny.json

html: $(STAMP)
	bash scripts/export_html.sh

clean:
	rm -rf $(VENV) build bench-out test-output .pytest_cache
