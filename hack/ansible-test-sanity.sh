#!/usr/bin/env bash
# Run `ansible-test sanity --venv` on this collection without Docker and
# without internet access beyond the package index.
#
#   hack/ansible-test-sanity.sh                  # all sanity tests
#   hack/ansible-test-sanity.sh --test pylint    # extra arguments go to ansible-test
#
# How:
# - ansible-test needs the collection at .../ansible_collections/microvm/firecracker:
#   hack/collection-tree.sh lays out a copy there (see that script for why
#   not a symlink), and ANSIBLE_TEST_CONTENT_ROOT pins ansible-test to it (the
#   copy lies inside this git checkout; without the pin ansible-test would
#   take the checkout's .git for the copy's and find no files).
# - HOME (and so ANSIBLE_HOME, ~/.ansible/test/{cache,venv}), TMPDIR,
#   ANSIBLE_LOCAL_TEMP and ANSIBLE_REMOTE_TMP point into tests/output/.home
#   (git-ignored): nothing lands in the user's home, and the sanity virtual
#   environments ansible-test builds are reused by later runs.
# - `--venv` bootstraps pip into each new environment with get-pip.py, which
#   ansible-test downloads from the internet. hack/get_pip_stub.py is put at
#   its cache path instead (ensurepip, then pip from the package index).
# - The controller is the development virtualenv's Python (.venv, or $VENV).
#   The multi-version tests (compile, import) also run on every other Python
#   >= 3.9 that ansible-test supports as a target and that is on PATH with
#   venv/ensurepip (managed hosts have Python >= 3.9). On a stock Debian 12
#   that is none; they cost a few seconds each once cached.
#
# No sanity test is skipped: none of the collection's tests needs Docker or
# the internet once get-pip is stubbed. `shellcheck` must be installed (make
# deps); ansible-test would otherwise only warn and skip that test.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
python=$venv/bin/python
started=$SECONDS

fail() {
    echo "SANITY: FAILED: $*" >&2
    exit 1
}

[[ -x $venv/bin/ansible-test ]] || fail "$venv/bin/ansible-test not found (run: make venv)"
command -v shellcheck >/dev/null || fail "shellcheck not found (run as root: make deps)"

state=$root/tests/output/.home
mkdir -p -- "$state"

# One run at a time: runs share the tree, the temp dir and the venv cache.
exec 9>"$state/.sanity.lock"
if ! flock -n 9; then
    echo "SANITY: waiting for another sanity run in this checkout to finish..." >&2
    flock 9
fi

# Keep using the user's pip download cache (a cache, not configuration):
# a fresh checkout then builds its sanity venvs without downloading again.
if [[ -z ${PIP_CACHE_DIR:-} ]]; then
    if [[ -n ${XDG_CACHE_HOME:-} ]]; then
        PIP_CACHE_DIR=$XDG_CACHE_HOME/pip
    elif [[ -n ${HOME:-} ]]; then
        PIP_CACHE_DIR=$HOME/.cache/pip
    else
        PIP_CACHE_DIR=$state/.cache/pip
    fi
fi
export PIP_CACHE_DIR
export HOME=$state
export ANSIBLE_HOME=$state/.ansible
export TMPDIR=$state/tmp/sanity
export ANSIBLE_LOCAL_TEMP=$TMPDIR/ansible-local
export ANSIBLE_REMOTE_TMP=$TMPDIR/ansible-remote
export PATH=$venv/bin:$PATH
unset ANSIBLE_COLLECTIONS_PATH ANSIBLE_COLLECTIONS_PATHS ANSIBLE_CONFIG

tree_removed=false
# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
    rm -rf -- "$TMPDIR"
    if ! $tree_removed; then
        "$root/hack/collection-tree.sh" --remove sanity
    fi
}
trap cleanup EXIT
rm -rf -- "$TMPDIR"
mkdir -p -- "$TMPDIR"

# What this ansible-test wants: the pip version its get-pip bootstrap installs
# (the cache file name) and the Python versions it supports.
read -r pip_version controller_version supported_versions < <(
    "$python" - <<'EOF'
import sys
import types

from ansible_test._internal.constants import SUPPORTED_PYTHON_VERSIONS
from ansible_test._internal.python_requirements import get_venv_packages

version = '%d.%d' % sys.version_info[:2]
pip = get_venv_packages(types.SimpleNamespace(version=version))['pip']
print(pip, version, ','.join(SUPPORTED_PYTHON_VERSIONS))
EOF
) || fail "cannot read ansible-test's settings with $python"

cache_dir=$ANSIBLE_HOME/test/cache
mkdir -p -- "$cache_dir"
cp -- "$root/hack/get_pip_stub.py" "$cache_dir/get_pip_${pip_version//./_}.py"

# Other target Pythons (>= 3.9) on PATH that can create virtual environments.
extra_targets=()
extra_versions=()
IFS=, read -r -a versions <<<"$supported_versions"
for v in "${versions[@]}"; do
    [[ $v == "$controller_version" ]] && continue
    [[ $(printf '%s\n3.9\n' "$v" | sort -V | head -n1) == 3.9 ]] || continue
    interpreter=$(command -v "python$v" 2>/dev/null) || continue
    if "$interpreter" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        extra_targets+=(--target-python "$v@$interpreter")
        extra_versions+=("$v")
    fi
done

if [[ ${#extra_targets[@]} -eq 0 ]]; then
    env_args=(--venv --python "$controller_version")
else
    env_args=(--controller "origin:python=venv/$controller_version"
        --target-python "$controller_version" "${extra_targets[@]}")
fi

coll=$("$root/hack/collection-tree.sh" sanity)
export ANSIBLE_TEST_CONTENT_ROOT=$coll
cd -- "$coll"

echo "SANITY: ansible-test $("$venv/bin/ansible-test" --version | awk '{print $NF}')," \
    "controller Python $controller_version," \
    "extra target Pythons: ${extra_versions[*]:-none}"
echo "+ ansible-test sanity ${env_args[*]} --color no $*"

rc=0
ansible-test sanity "${env_args[@]}" --color no "$@" || rc=$?

elapsed=$((SECONDS - started))
if [[ $rc -eq 0 ]]; then
    echo "SANITY: PASSED in ${elapsed}s"
else
    # Keep the tree (with its tests/output/ results) for inspection.
    tree_removed=true
    echo "SANITY: FAILED (ansible-test exit $rc) in ${elapsed}s;" \
        "results in ${coll#"$root"/}/tests/output/" >&2
fi
exit "$rc"
