#!/usr/bin/env bash
# CI: a headless Chromium for tests/test_page.py (Playwright drives it through executable_path:
# Playwright's own browser download needs the internet). npm's @sparticuz/chromium ships one.
set -euo pipefail
cd "$(dirname "$0")/.."
npm install --prefix .cache/browser --no-audit --no-fund --silent @sparticuz/chromium@153.0.0
cd .cache/browser  # node -e resolves require() from here
node -e "require('@sparticuz/chromium').default.executablePath().then((p) => console.log('chromium', p))"
