# Every target sets itself up: a fresh clone needs only Python 3.10+, pip and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
STAMP_BENCH := $(VENV)/.installed-bench
# torch: this pair is what CI and the developers' machines carry on disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: bytecode demo test test-fast test-hosts lint bench bench-compare gpu-check constraints clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet uv || echo "uv not installed: pip installs everything" >&2

# Installs: uv installs what pip would (.ci/constraints.txt pins every package as pip's
# own resolution chose it; `make constraints` writes it again) in a third of the time: the
# test set-up of a fresh clone took 45 s against pip's 134 s, the same packages. Where uv
# cannot, pip does the same install. Bytecode is compiled at install, never skipped:
# these machines set PYTHONDONTWRITEBYTECODE, so Python never writes it at import, and
# without it every process (each Ray worker, each test's subprocess) compiled torch and
# Ray again: a fresh clone's suite took 1,228 s against 685 s (docs/testing.md).
install = $(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode \
	--constraint .ci/constraints.txt $(1) || $(PY) -m pip install --quiet $(1)

$(STAMP_RUN): pyproject.toml | $(PY)
	$(call install,$(TORCH_PINS) -e .)
	touch $@

$(STAMP_DEV): pyproject.toml | $(PY)
	$(call install,$(TORCH_PINS) -e '.[dev]')
	touch $@ $(STAMP_RUN)

$(STAMP_BENCH): $(STAMP_RUN)
	$(call install,$(TORCH_PINS) -e '.[bench]')
	touch $@

# .ci/constraints.txt again, from pip's own resolution of every extra the Makefile
# installs, in a fresh venv (after a change to pyproject.toml's dependencies).
constraints:
	rm -rf .constraints-venv && $(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/python -m pip install --quiet $(TORCH_PINS) -e '.[dev,bench]'
	.constraints-venv/bin/python -m pip freeze --exclude-editable | grep -v '^#' > .ci/constraints.txt
	rm -rf .constraints-venv

# rayline's own bytecode, before the tests: an editable install compiles nothing, and with
# PYTHONDONTWRITEBYTECODE (these machines set it) every Ray worker and `rayline`
# subprocess of a run compiled the package again at import (0.2-0.7 s of CPU each).
bytecode: $(STAMP_DEV)
	$(PY) -m compileall -q platform benchmarks >/dev/null

# Train DQN on CartPole to solved, promote the policy, serve it over HTTP (Ctrl-C stops).
demo: $(STAMP_RUN)
	$(VENV)/bin/rayline train pipelines/dqn-cartpole.yaml
	$(VENV)/bin/rayline models promote dqn-cartpole latest
	$(VENV)/bin/rayline serve || test $$? -eq 130  # Ctrl-C is the demo's clean stop

# Everything: the README's command and CI's. Two workers, each taking whole test files
# (a file's module fixtures, its Serve app or shared run, stay in one worker, each
# worker with a local Ray of its own): much of a test is waiting on a process start.
test: bytecode
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder -m "not hosts_long"

# The host cluster's tests, the lost training host included (as root; see docs/cluster.md).
test-hosts: bytecode
	$(PY) -m pytest -q --durations=5 tests/test_hosts.py

# The edit-test loop: what no tier marker names (no multi-process Ray run over ~20 s,
# no cluster, no GPU), in under 3 minutes on 2 cores.
test-fast: bytecode
	$(PY) -m pytest -q --durations=10 -m "not slow and not cluster and not gpu"

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check platform tests benchmarks
	$(VENV)/bin/ruff format --check platform tests benchmarks

# Every benchmark with its peers, a JSON line each. recommender.py needs MovieLens
# ml-latest-small in data/movielens/ (or $RAYLINE_MOVIELENS); nothing here writes a
# tracked file (choose_recommender_params.py, which rewrites the recommender's
# parameters, is run by hand).
bench: $(STAMP_BENCH)
	@for script in benchmarks/*.py; do \
		case "$$script" in benchmarks/common.py|benchmarks/compare.py|benchmarks/choose_recommender_params.py) continue;; esac; \
		echo "== $$script" >&2; \
		$(PY) $$script || exit $$?; \
	done

# A change's cost against BASE in the same run (benchmarks/compare.py): run it before
# landing a change to serving/, rl/ or store.py (docs/testing.md). Exit 1: a figure is
# worse by more than its spread and 10 %.
BASE ?= origin/main
BENCH ?= serve_load
bench-compare: $(STAMP_BENCH)
	$(PY) benchmarks/compare.py $(BASE) --bench $(BENCH)

# On a GPU machine: the learner, the vision pipelines and a Pong run, in under 9 minutes,
# into ./gpu-check (benchmarks/gpu_check.py; --dry-run tries it on any machine).
gpu-check: $(STAMP_DEV)
	$(PY) benchmarks/gpu_check.py --out gpu-check

clean:
	rm -rf $(VENV) artifacts .pytest_cache
