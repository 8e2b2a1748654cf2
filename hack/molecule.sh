#!/usr/bin/env bash
# Run the Molecule scenarios of extensions/molecule/ (as root) and report each one's wall time.
#
#   hack/molecule.sh                   # molecule test, every scenario in turn
#   hack/molecule.sh default           # one scenario (or several)
#   MOLECULE_COMMAND=converge hack/molecule.sh default   # another molecule command (create, converge,
#                                                        # verify, login, destroy, ...) for development
#
# - The hosts are Debian bookworm trees booted with systemd-nspawn and reached over SSH (see
#   extensions/molecule/README.md). Root is needed: network namespaces, nspawn, cgroups.
# - Molecule runs in a copy of the collection (hack/collection-tree.sh) with ANSIBLE_COLLECTIONS_PATH
#   pointing at it, so microvm.firecracker.* is this checkout; the copy is removed at the end.
# - Per scenario, Molecule's ephemeral directory (inventory, the run's SSH key and ssh_config, the host
#   trees) is tests/output/molecule/<scenario>; ANSIBLE_HOME and Ansible's temp dirs are under
#   tests/output/molecule/.home; cached host trees, the stand-in's release archive and the golden image
#   are in tests/output/molecule-cache (MICROVM_MOLECULE_CACHE), reused by later runs.
# - If the run is interrupted, the EXIT trap removes whatever hosts a scenario left (by PID).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
command=${MOLECULE_COMMAND:-test}
out=$root/tests/output/molecule
helper=$root/tests/molecule_support/nspawn_hosts.py

fail() {
    echo "MOLECULE: FAILED: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "must run as root (network namespaces, systemd-nspawn)"
[[ -x $venv/bin/molecule ]] || fail "$venv/bin/molecule not found (run: make venv)"
for tool in systemd-nspawn mmdebstrap ssh ssh-keygen ip; do
    command -v "$tool" >/dev/null || fail "$tool not found (run as root: make deps)"
done

if [[ $# -gt 0 ]]; then
    scenarios=("$@")
else
    scenarios=()
    for file in "$root"/extensions/molecule/*/molecule.yml; do
        scenarios+=("$(basename -- "$(dirname -- "$file")")")
    done
fi
for scenario in "${scenarios[@]}"; do
    [[ -f $root/extensions/molecule/$scenario/molecule.yml ]] || fail "no scenario $scenario in extensions/molecule/"
done

mkdir -p -- "$out/.home"
# One run at a time per checkout: the scenarios' ephemeral directories are fixed paths.
exec 9>"$out/.lock"
flock -n 9 || fail "another hack/molecule.sh runs in this checkout"

tree_name=molecule
# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
    local rc=$? scenario
    if [[ $command == test ]]; then
        for scenario in "${scenarios[@]}"; do
            if [[ -f $out/$scenario/state.json ]]; then
                echo "MOLECULE: removing the hosts scenario $scenario left behind" >&2
                "$venv/bin/python" "$helper" down --state "$out/$scenario" >/dev/null || rc=1
            fi
        done
    fi
    "$root/hack/collection-tree.sh" --remove "$tree_name"
    exit "$rc"
}
trap cleanup EXIT

coll=$("$root/hack/collection-tree.sh" "$tree_name")
unset VIRTUAL_ENV ANSIBLE_COLLECTIONS_PATHS
export ANSIBLE_COLLECTIONS_PATH=${coll%/ansible_collections/*}
export ANSIBLE_HOME=$out/.home/.ansible
export ANSIBLE_LOCAL_TEMP=$out/.home/tmp/local
export ANSIBLE_REMOTE_TMP=$out/.home/tmp/remote
export MICROVM_MOLECULE_CACHE=${MICROVM_MOLECULE_CACHE:-$root/tests/output/molecule-cache}
export PATH=$venv/bin:$PATH

summary=()
failed=0
for scenario in "${scenarios[@]}"; do
    export MOLECULE_EPHEMERAL_DIRECTORY=$out/$scenario
    echo "MOLECULE: $command $scenario (ephemeral directory ${MOLECULE_EPHEMERAL_DIRECTORY#"$root"/})" >&2
    started=$SECONDS
    rc=0
    (cd -- "$coll" && molecule "$command" --scenario-name "$scenario") || rc=$?
    seconds=$((SECONDS - started))
    if [[ $rc -eq 0 ]]; then
        summary+=("$(printf '%-10s passed  %4d s' "$scenario" "$seconds")")
    else
        summary+=("$(printf '%-10s FAILED  %4d s (exit %d)' "$scenario" "$seconds" "$rc")")
        failed=1
    fi
done

echo "MOLECULE: $command, wall time per scenario:" >&2
printf '  %s\n' "${summary[@]}" >&2
exit "$failed"
