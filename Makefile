# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs medclip, runs the main job (run_medclip.sh) on its embedded default
#   make test   creates .venv, installs medclip with the test and parity extras, runs the test suite
#   make app    (after make demo) serves the demo app on the demo's model and index
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test app clean

$(VENV)/.core: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -e '.[app]'
	touch $@

$(VENV)/.dev: $(VENV)/.core requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt -e '.[test,parity,app]'
	touch $@

demo: $(VENV)/.core
	PATH="$(abspath $(VENV))/bin:$$PATH" ./run_medclip.sh

# Two pytest-xdist workers: much of the suite is single-threaded XLA compilation and trainer start-up, so two
# workers fill a 2-core machine (TEST_WORKERS=0 runs in one process; more suits bigger machines).
TEST_WORKERS ?= 2
test: $(VENV)/.dev
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS)) $(PYTEST_ARGS)

# No prompt and no browser tab however it is started (a terminal, the background, CI); APP_ARGS="--port 8600"
app: $(VENV)/.core
	$(VENV)/bin/medclip app $(APP_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# make golden   regenerates the parity fixtures in tests/golden/ with the PyTorch references (open_clip, timm) in
#               their own venv (.venv-ref: torchvision does not load against the test venv's torch build)
REF_PYTHON ?= python3.11
REF_VENV ?= .venv-ref

.PHONY: golden

$(REF_VENV)/.ref: tests/golden/requirements-ref.txt
	test -x $(REF_VENV)/bin/python || $(REF_PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q -r tests/golden/requirements-ref.txt
	touch $@

golden: $(REF_VENV)/.ref
	$(REF_VENV)/bin/python tests/golden/make_golden.py
