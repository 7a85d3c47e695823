#!/usr/bin/env bash
# Headless Chromium and ChromeDriver from the system packages, for the results page's browser test
# (tests/evaluate/test_report.py), installed quietly where either is missing. A failed install is only a warning: that
# one test then skips and says why.
set -uo pipefail
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
command -v apt-get >/dev/null 2>&1 || { echo "warning: no apt-get here; the browser test of the results page will be skipped" >&2; exit 0; }
if ! { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq \
       && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
     } >/tmp/autoseg_apt.log 2>&1; then
  echo "warning: could not install chromium and chromium-driver with apt-get (log: /tmp/autoseg_apt.log);" \
       "the browser test of the results page will be skipped" >&2
fi
exit 0
