# Two commands do all set-up on a fresh machine:  make demo  |  make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := espeak-ng libespeak-ng1 ffmpeg portaudio19-dev sox chromium
EXTRAS := train,mic,serve,livekit,pipecat,dev

.PHONY: demo test test-all lint bench clean-venv apt

# apt packages, only those missing; needs root (CI and these machines run as root) or sudo.
apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "[setup] apt-get install$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# A new virtualenv takes about 2.2 GB (torch CPU, onnxruntime, OpenCV, dlib, ...): say so up front
# instead of failing half-way through pip with "No space left on device".
$(STAMP): pyproject.toml constraints.txt | apt
	@if [ ! -x $(PY) ]; then \
	  avail=$$(df -Pk $$(dirname $(VENV)) 2>/dev/null | awk 'NR==2 {print $$4}'); \
	  if [ -n "$$avail" ] && [ "$$avail" -lt 3000000 ]; then \
	    echo "[setup] only $$((avail / 1024)) MB free on $$(df -P $$(dirname $(VENV)) | awk 'NR==2 {print $$6}'); the virtualenv needs about 3 GB: free some space (or set VENV=/other/disk/venv) and run make again" >&2; \
	    exit 1; \
	  fi; \
	  python3 -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=68,<82" wheel
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	@# setuptools notes that an editable install maps folders: that is this layout, on purpose.
	PYTHONWARNINGS="ignore::UserWarning" $(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# The shipped starter weights (src/avatar_stream/starter/onnx) on the bundled photo and espeak-ng speech.
demo: apt $(STAMP)
	$(PY) -m avatar_stream.engine.cli --face src/avatar_stream/assets/face.jpg --audio src/avatar_stream/assets/speech.wav --out demo.mp4

# The suite, then the linter: CI runs `make test` alone, so ruff runs there too.
test: apt $(STAMP)
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check src tests demos scripts

test-all: apt $(STAMP)
	$(PY) -m pytest -q -m "" --timeout 7200

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests demos scripts

clean-venv:
	rm -rf $(VENV)
