# The two commands of the README: `make demo` and `make test`. Both bootstrap what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean

setup:
	@bash scripts/setup.sh

# Full suite, slow training checks included (what CI runs). pytest's exit 5 ("no tests
# collected") is turned into a failure with a message instead of passing silently.
test: setup
	@scripts/run_tests.sh $(PYTEST_ARGS)

# Everything but the few slow training checks.
test-fast: setup
	@scripts/run_tests.sh -m "not slow" $(PYTEST_ARGS)

demo: setup
	@$(VENV)/bin/ciae-demo $(DEMO_ARGS)

bench: setup
	@$(VENV)/bin/ciae-bench $(BENCH_ARGS)

clean:
	rm -rf build demo_out .pytest_cache
