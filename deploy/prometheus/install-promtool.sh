#!/usr/bin/env bash
# Installs promtool, which tests/integration/ops_kit.rs runs to check the
# alerting rules and their unit tests, when it is missing: only the promtool
# binary, taken from Debian's prometheus package, into /usr/local/bin. The
# package itself is not installed: it would bring a Prometheus server (and
# its service) that nothing here needs.
# Running it again does nothing once promtool is on PATH.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "promtool is missing; as root, run this script again, or: apt-get install prometheus" >&2
  exit 1
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# apt's download user must be able to write there.
chmod 755 "$scratch"
cd "$scratch"
if ! apt-get -o DPkg::Lock::Timeout=600 download -qq prometheus >/dev/null 2>&1; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 download -qq prometheus
fi
dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool
install -m 0755 usr/bin/promtool /usr/local/bin/promtool
promtool --version | head -n 1
