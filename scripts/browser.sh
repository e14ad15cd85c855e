#!/usr/bin/env bash
# Headless Chromium and its driver from Debian's packages, for tests/e2e/test_view*.py and
# `ponder view`'s screenshots and timings (nothing is downloaded by Selenium).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
