#!/usr/bin/env bash
# Installs DiRotQ Explorer's Python requirements; with --test also Debian's chromium for the
# browser test (Playwright drives it through executable_path; `playwright install` cannot
# download browsers offline). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "install.sh: chromium could not be installed; the browser test will skip and say why" >&2
  else
    echo "install.sh: no root apt-get here; install chromium yourself for the browser test" >&2
  fi
fi
