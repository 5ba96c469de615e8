#!/usr/bin/env bash
# Installs kubernetes-validate (the Kubernetes API's JSON schemas, checked
# offline) into deploy/kubernetes/.venv, for the manifest checks of
# tests/integration/kubernetes.rs. Running it again installs only what is
# missing. Validate edited manifests by hand with:
#   deploy/kubernetes/.venv/bin/kubernetes-validate --strict deploy/kubernetes/*.yaml
set -euo pipefail
cd "$(dirname "$0")"

VERSION=1.37.0
venv=.venv
validator="$venv/bin/kubernetes-validate"

if [ -x "$validator" ] && [ "$("$validator" --version 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi

# Debian packages, only those missing.
apt_packages=()
command -v python3 >/dev/null 2>&1 || apt_packages+=(python3)
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_packages+=(python3-venv)
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
  echo "installing from Debian: ${apt_packages[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${apt_packages[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "creating deploy/kubernetes/$venv"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "kubernetes-validate==$VERSION"; then
  echo "pip could not install kubernetes-validate==$VERSION from PyPI into deploy/kubernetes/$venv" >&2
  exit 1
fi
echo "kubernetes-validate $("$validator" --version) in deploy/kubernetes/$venv"
