# Quick start: `make demo` (set up + run the main job), `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aigc_rt-installed
NATIVE := $(wildcard setup.py pyproject.toml requirements-dev.txt csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

.PHONY: demo test build bench clean

$(STAMP): $(NATIVE)
	bash tools/bootstrap.sh $(VENV)
	touch $@

demo: $(STAMP)
	$(VENV)/bin/aigc-rt demo

test: $(STAMP)
	$(PY) -m pytest -q

# incremental rebuild of the C++ extension in place (ninja keeps build/ between runs)
build:
	flock /tmp/aigc_rt-build.lock $(PY) setup.py -q build_ext --inplace

bench: $(STAMP)
	$(PY) -m pytest bench -q --benchmark-enable

clean:
	rm -rf build $(VENV) aigc_rt/*.so
