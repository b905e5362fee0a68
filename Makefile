# Both main targets work on a fresh machine with only Python 3.11: they create .venv and install.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test setup system-deps bench bench-compress schemas clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch 2.13.0 (on local disk here); installing it first keeps pip from a CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,examples,tune,cuda]'
	rm -f $(VENV)/.installed-*; touch $@
	@$(MAKE) --no-print-directory system-deps

# Debian tools GPU cross-compiles and image tests use; installed where missing when run as root,
# otherwise named (the tests that need them skip with the same hint).
SYSTEM_DEPS := lld-22 rocm-device-libs gcc-aarch64-linux-gnu skopeo umoci docker-registry
system-deps:
	@missing=$$(for p in $(SYSTEM_DEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $$missing"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || \
	  { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }; \
	else echo "note: missing Debian packages $$missing (sudo apt-get install $$missing); their tests skip"; fi

demo: $(STAMP)
	$(BIN)/mlopt compile examples/digits/recipe.yaml
	$(BIN)/mlopt manifest show out/digits/manifest.json

# the layers only point down and no files import each other in a cycle (pyproject.toml's import-linter
# contract); no unused or undefined names; then the suite
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check --select F --quiet mlopt tests bench
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/compare.py

bench-compress: $(STAMP)
	$(BIN)/python bench/compare.py --torch-compile --anchors --results bench/results-compress.json \
	  --recipes examples/digits/compress.yaml,examples/minilm/chain.yaml,examples/efficientnet/compress.yaml

# Regenerate the shipped JSON Schemas after changing mlopt/manifest.py (a test checks they match).
schemas: $(STAMP)
	$(BIN)/python -c "import json; from mlopt.manifest import manifest_schema, SCHEMA_FILE; SCHEMA_FILE.write_text(json.dumps(manifest_schema(), indent=2) + '\n')"

clean:
	rm -rf out .mlopt-store .pytest_cache
