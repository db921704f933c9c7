#!/usr/bin/env bash
# Set up what the test suite needs on a fresh machine, then run it (lint, types, pytest).
# Installs skopeo (the real registry client of the end-to-end tests) with apt when it is missing
# and we are root; everything Python goes into ./.venv. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v skopeo >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq skopeo >/dev/null
    else
        echo "tests/run.sh: skopeo is missing; install it (e.g. 'sudo apt-get install skopeo') and rerun" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check hubproxy tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
