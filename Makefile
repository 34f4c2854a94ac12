# Two commands do everything:  `make quickstart` (install + main job)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on local disk here; on a GPU cluster keep the torch you have
# (make TORCH_SPEC="torch" or pre-install it into the venv).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install quickstart test

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	OMP_NUM_THREADS=1 $(VENV)/bin/mllama-train configs/tiny-cpu-3d.yaml

test: install
	$(VENV)/bin/pytest -q
