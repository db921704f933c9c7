#!/usr/bin/env bash
# Set up what the test suite needs on a fresh machine, then run it (lint, types, pytest).
# Installs the real tools the tests drive with apt when they are missing and we are root: skopeo
# (the registry client of the end-to-end tests), nginx, curl and wrk (the benchmark's smoke
# test), and chromium (the status page's browser test). Everything Python goes into ./.venv.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in skopeo:skopeo nginx:nginx-light curl:curl wrk:wrk chromium:chromium; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "tests/run.sh: missing ${missing[*]}; install them (e.g. 'sudo apt-get install ${missing[*]}') and rerun" >&2
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
