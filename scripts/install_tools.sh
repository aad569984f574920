#!/usr/bin/env bash
# Deployment tools for the tests, from Debian's packages, unpacked into the venv (no root, no
# service, nothing on the system changes): prometheus + promtool (package prometheus) and kubectl
# with its built-in kustomize (package kubernetes-client). Idempotent; `make setup` runs it.
#   usage: scripts/install_tools.sh VENV
set -euo pipefail
VENV=${1:-.venv}
TOOLS="$VENV/tools"
ROOT="$TOOLS/root"
mkdir -p "$TOOLS/debs" "$ROOT" "$VENV/bin"
need=()
for pkg in prometheus kubernetes-client; do
  ls "$TOOLS/debs/${pkg}_"*.deb >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  # apt-get download needs package lists; a fresh machine may have none
  (cd "$TOOLS/debs" && apt-get download "${need[@]}" 2>/dev/null) || {
    apt-get update -qq
    (cd "$TOOLS/debs" && apt-get download "${need[@]}")
  }
fi
for deb in "$TOOLS/debs/"*.deb; do
  stamp="$TOOLS/$(basename "$deb").unpacked"
  [ -f "$stamp" ] || { dpkg -x "$deb" "$ROOT"; touch "$stamp"; }
done
for bin in prometheus promtool kubectl; do
  ln -sf "$(cd "$ROOT/usr/bin" && pwd)/$bin" "$VENV/bin/$bin"
done
"$VENV/bin/prometheus" --version 2>&1 | head -1
"$VENV/bin/kubectl" version --client --short 2>/dev/null || "$VENV/bin/kubectl" version --client | head -1
