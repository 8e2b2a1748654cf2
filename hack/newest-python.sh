#!/usr/bin/env bash
# Print an interpreter (>= 3.12) that can run the newest ansible-core, or nothing.
# Looks on PATH first, then in pyenv's versions when pyenv is installed.
set -uo pipefail

works() {
    "$@" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

for candidate in python3.14 python3.13 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && works "$candidate"; then
        command -v "$candidate"
        exit 0
    fi
done
if command -v pyenv >/dev/null 2>&1; then
    root=$(pyenv root)
    for version in $(pyenv versions --bare --skip-aliases 2>/dev/null | sort -rV); do
        interpreter="$root/versions/$version/bin/python3"
        if [[ -x $interpreter ]] && works "$interpreter"; then
            echo "$interpreter"
            exit 0
        fi
    done
fi
exit 0
