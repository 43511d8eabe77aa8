# user-dist: the two commands a new user needs.
#   make demo   builds the synthetic shards, trains 2 processes, evaluates
#   make test   runs the test suite (the cluster tests skip without Slurm,
#               munge, sshd and pdsh, naming the apt-get command; see README.md),
#               all but the few marked long; make test-all runs those too
# Both create .venv on first use and reuse it afterwards.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# DeepSpeed JIT-compiles a CPU op on first use: keep its cache in this venv so
# that venvs never overwrite each other's builds and a rebuild is not needed.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export PYTHONPATH := $(abspath .)
# The venv's tools first (its ninja builds DeepSpeed's op; see TORCH_EXTENSIONS_DIR).
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: venv test test-all test-fast demo shards clean-demo docs

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	@# Build DeepSpeed's CPU shared-memory op once, here, rather than racing in
	@# the first multi-process run (it is JIT-compiled on first use otherwise).
	$(VPY) -c "from deepspeed.accelerator import get_accelerator as g; b = g().create_op_builder('ShareMemCommBuilder'); b is None or b.load()"
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest tests -m "not long" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VPY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest tests -m "not cluster and not slow" $(PYTEST_ARGS)

DEMO_DATA := data/synthetic
shards: $(STAMP)
	@# 256-d region features: the demo model's size (configs/synthetic.yaml model.region_dim).
	$(VPY) -m data_shards synthetic --out $(DEMO_DATA) --region-dim 256 --skip-existing

demo: shards
	bash launch/demo.sh

clean-demo:
	rm -rf $(DEMO_DATA) runs/demo

docs: $(STAMP)
	$(VPY) docs/gen_configuration.py
