#!/usr/bin/env bash
# Run a command with microvm.firecracker resolving to this checkout.
#
#   hack/with-collection.sh ansible-playbook -i hack/inventory-localhost.yml playbooks/quickstart.yml
#   hack/with-collection.sh ansible-lint --profile production
#
# - ANSIBLE_COLLECTIONS_PATH points at a tree made by hack/collection-tree.sh
#   (a copy of this checkout as .../ansible_collections/microvm/firecracker),
#   removed again when the command ends. Other collection paths are dropped,
#   so an installed microvm.firecracker cannot shadow the checkout.
# - ANSIBLE_HOME, ANSIBLE_LOCAL_TEMP and ANSIBLE_REMOTE_TMP live under
#   tests/output/.home (git-ignored), not in the user's home.
# - The development virtualenv (.venv, or $VENV) comes first on PATH.
# The command runs in the current directory, i.e. on the checkout's files.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}

if [[ $# -lt 1 ]]; then
    echo "usage: $0 COMMAND [ARGUMENTS...]" >&2
    exit 2
fi
[[ -x $venv/bin/ansible ]] || {
    echo "with-collection: $venv/bin/ansible not found (run: make venv)" >&2
    exit 1
}

state=$root/tests/output/.home
tree_name=cmd-$$
tmp=$state/tmp/$tree_name

# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
    "$root/hack/collection-tree.sh" --remove "$tree_name"
    rm -rf -- "$tmp"
}
trap cleanup EXIT

coll=$("$root/hack/collection-tree.sh" "$tree_name")
mkdir -p -- "$tmp"
export ANSIBLE_COLLECTIONS_PATH=${coll%/ansible_collections/*}
unset ANSIBLE_COLLECTIONS_PATHS
export ANSIBLE_HOME=$state/.ansible
export ANSIBLE_LOCAL_TEMP=$tmp/local
export ANSIBLE_REMOTE_TMP=$tmp/remote
export PATH=$venv/bin:$PATH

echo "+ ANSIBLE_COLLECTIONS_PATH=${ANSIBLE_COLLECTIONS_PATH#"$root"/} $*" >&2
rc=0
"$@" || rc=$?
exit "$rc"
