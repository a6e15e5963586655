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

test: $(VENV)/.dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

app: $(VENV)/.core
	$(VENV)/bin/medclip app

clean:
	rm -rf $(VENV) build *.egg-info
