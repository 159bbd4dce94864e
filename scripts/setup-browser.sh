#!/bin/sh
# Set up what tests/browser needs: Debian's Chromium (apt) and the pinned Jupyter +
# Playwright packages from scripts/browser-requirements.txt, pip-installed into the
# CURRENT Python environment (the one `python3` runs, or $PYTHON), so the kernel
# sees the project's package installed there too. No venv, no `playwright install`
# (the test drives /usr/bin/chromium), never installs or upgrades torch.
#
# Usage: scripts/setup-browser.sh        (as root, or with sudo available for apt)
#        PYTHON=/path/to/python scripts/setup-browser.sh
# Idempotent: when chromium is there and every pin is already satisfied it only
# checks and returns (about a second).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REQS="$HERE/browser-requirements.txt"
PYTHON=${PYTHON:-python3}
CHROMIUM=${CHROMIUM_PATH:-/usr/bin/chromium}

say() { echo "setup-browser: $*"; }

# ---- 1. Chromium from Debian ------------------------------------------------ #
if [ -x "$CHROMIUM" ]; then
    say "chromium present ($CHROMIUM)"
else
    if [ "$(id -u)" -eq 0 ]; then SUDO=""
    elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"
    else say "chromium missing and not root (no sudo): run as root"; exit 1
    fi
    say "installing chromium with apt-get"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi

# ---- 2. Python packages into the current environment ------------------------ #
# Which pins are not yet satisfied? (prints them; empty output: nothing to do)
missing=$("$PYTHON" - "$REQS" <<'PY'
import re, sys
from importlib import metadata
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    try:
        have = metadata.version(norm(name.strip()))
    except metadata.PackageNotFoundError:
        have = None
    if have != want.strip():
        print(f"{name.strip()}=={want.strip()} (have {have})")
PY
)

if [ -z "$missing" ]; then
    say "all pinned packages already installed in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
else
    say "to install:"; echo "$missing" | sed 's/^/    /'
    PIP_EXTRA=""
    # Debian's own /usr/bin/python3 is "externally managed" (PEP 668); the test
    # needs these packages in the same environment as the project, so allow it.
    if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not (sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))'; then
        PIP_EXTRA="--break-system-packages"
    fi
    # Guard: resolve first, refuse if the resolution would install/upgrade torch
    # (or CUDA wheels): an unpinned torch pulls a multi-GB CUDA build.
    report=$(mktemp)
    trap 'rm -f "$report"' EXIT
    "$PYTHON" -m pip install $PIP_EXTRA --dry-run --quiet --report "$report" -r "$REQS"
    heavy=$("$PYTHON" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(" ".join(i["metadata"]["name"] for i in r.get("install", [])
               if i["metadata"]["name"].lower().replace("_", "-") in ("torch", "triton")
               or i["metadata"]["name"].lower().startswith("nvidia-")))' "$report")
    if [ -n "$heavy" ]; then
        say "refusing: installing $REQS would pull: $heavy"; exit 1
    fi
    "$PYTHON" -m pip install $PIP_EXTRA -r "$REQS"
fi

# ---- 3. Check ----------------------------------------------------------------- #
# (Debian's chromium wrapper may print "[: ...: unexpected operator" from
# /etc/chromium.d/dev-shm when findmnt lists /dev/shm twice; harmless.)
"$CHROMIUM" --version 2>/dev/null
"$PYTHON" -c 'import playwright.sync_api, jupyterlab, ipykernel, ipywidgets, jupyterlab_widgets, matplotlib, nbformat, nbclient; print("setup-browser: python packages ok (jupyterlab", jupyterlab.__version__ + ", ipywidgets", ipywidgets.__version__ + ")")'
