# Quick start: `make demo` (set up, build, train the digits ResNet with optimize() and with PyTorch) and
# `make test` (set up, build, run the tests). `make bench` runs the full per-layer benchmarks.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PY_DEPS := torch==$(TORCH_VERSION) ninja pytest hypothesis numpy tqdm matplotlib scikit-learn pillow setuptools wheel
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup xbyak build test test-slow cpp-test demo bench clean

setup: $(VENV)/.deps xbyak build

# Made again when the Makefile changes, so that a new dependency reaches existing venvs.
$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet $(PY_DEPS)
	echo "$(CURDIR)" > "$$($(VPY) -c 'import site; print(site.getsitepackages()[0])')/torch_directconv.pth"
	touch $@

# Xbyak is header-only and comes from the system package (or XBYAK_INCLUDE_DIR).
xbyak:
	@if [ -n "$$XBYAK_INCLUDE_DIR" ] && [ -f "$$XBYAK_INCLUDE_DIR/xbyak/xbyak.h" ]; then exit 0; fi; \
	if [ -f /usr/include/xbyak/xbyak.h ] || [ -f /usr/local/include/xbyak/xbyak.h ]; then exit 0; fi; \
	echo "Xbyak is missing: installing libxbyak-dev with apt-get"; \
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libxbyak-dev

build: $(VENV)/.deps xbyak
	MAX_JOBS=2 $(VPY) setup.py -q build_ext --inplace

cpp-test: xbyak
	cmake -S . -B build/core -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/core
	cd build/core && ctest --output-on-failure

test: setup cpp-test
	$(VPY) -m pytest -q tests

# The heavier sweeps, run before resolving an issue.
test-slow: setup cpp-test
	$(VPY) -m pytest -q -m slow tests

# The training script on real images, twice (48 s at 2 threads on an idle 2-core machine), then
# the whole ResNet-50 against PyTorch, inference and a training step (about 3 minutes).
demo: setup
	$(VPY) examples/digits_demo.py
	$(VPY) bench/resnet50_optimize.py --iters 5

# The full per-layer and whole-network benchmarks: about 12 minutes on 2 cores.
bench: setup
	$(VPY) bench/bench_fwd.py
	$(VPY) bench/bench_bwd.py
	$(VPY) bench/resnet50_inference.py
	$(VPY) bench/resnet50_training.py --batch latency
	$(VPY) bench/resnet50_optimize.py

clean:
	rm -rf build torch_directconv/*.so
