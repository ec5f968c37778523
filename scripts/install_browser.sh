#!/usr/bin/env bash
# Installs what the real-browser test needs: Debian's chromium (the test drives it with
# Playwright; Playwright's own browser download is not used). Skips quietly when
# chromium is already there; says clearly what to do when it cannot install.
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null \
    && exit 0
fi
echo "note: /usr/bin/chromium is missing and could not be installed here;" \
     "install it (Debian: apt-get install chromium) to run the browser test." >&2
exit 0
