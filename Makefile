# Entry points: `make quickstart` (the main job on the embedded default), `make test`, `make notebooks`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

NB_STAMP := $(VENV)/.notebook-installed

.PHONY: quickstart video-quickstart test test-slow notebooks install clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	# the CPU kernels (small-head attention, GEGLU), built ahead of time; without a C++ compiler attention uses
	# torch's SDPA and GEGLU torch's ops instead (the module says why)
	-$(PY) -m ldm.modules.cpu_kernels
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) scripts/quickstart.py

# the video default: the quickstart's image LDM learns motion on moving shapes (run `make quickstart` first)
video-quickstart: $(STAMP)
	$(PY) scripts/video_quickstart.py

test: $(STAMP)
	$(PY) -m pytest tests

# the tests marked slow (torch.compile forward + backward on the CPU, a few minutes); CI runs them after `make test`
test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow

$(NB_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -c constraints.txt -e ".[notebook]"
	touch $(NB_STAMP)

# Executes every notebook headless; the executed copies (with outputs) go to outputs/notebooks/.
notebooks: $(NB_STAMP)
	$(PY) scripts/run_notebooks.py

clean-venv:
	rm -rf $(VENV)
