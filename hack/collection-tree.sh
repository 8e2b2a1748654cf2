#!/usr/bin/env bash
# Lay out this checkout as the collection microvm.firecracker inside an
# `ansible_collections` tree and print the collection's path.
#
#   coll=$(hack/collection-tree.sh NAME)   # .../NAME/ansible_collections/microvm/firecracker
#   ANSIBLE_COLLECTIONS_PATH=${coll%/ansible_collections/*}
#   ...
#   hack/collection-tree.sh --remove NAME  # when done
#
# Every tool that finds the collection by its place on disk (ansible-test,
# antsibull-docs, ansible-playbook resolving microvm.firecracker.*) goes
# through this one script.
#
# The tree holds a fresh *copy* of the files git would ship (tracked files and
# untracked files that are not ignored: no .git, .venv or tests/output), not a
# symlink to the checkout: `ansible-test --venv` re-runs itself from
# os.getcwd(), which resolves symlinks, and then finds no ansible_collections
# parent. A copy also tests exactly the files a collection build would contain.
#
# Trees live in tests/output/.trees/NAME/ (git-ignored, hidden so that test
# collectors do not descend into them; one NAME per user so that e.g. `make
# sanity` and `make quickstart` can run at the same time). Each call replaces
# the tree.
set -euo pipefail

usage="usage: $0 [--remove] NAME   (NAME: letters, digits, '-', '_')"
remove=false
if [[ ${1:-} == --remove ]]; then
    remove=true
    shift
fi
if [[ $# -ne 1 || ! $1 =~ ^[A-Za-z0-9_-]+$ ]]; then
    echo "$usage" >&2
    exit 2
fi
tree_name=$1

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
tree="$root/tests/output/.trees/$tree_name"

if $remove; then
    rm -rf -- "$tree"
    rmdir -- "$root/tests/output/.trees" 2>/dev/null || true
    exit 0
fi

namespace=$(sed -n 's/^namespace:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$root/galaxy.yml")
name=$(sed -n 's/^name:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$root/galaxy.yml")
if [[ -z $namespace || -z $name ]]; then
    echo "collection-tree: cannot read namespace/name from $root/galaxy.yml" >&2
    exit 1
fi
dest="$tree/ansible_collections/$namespace/$name"

# The files to copy, NUL-separated, relative to the checkout root.
list_files() {
    if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Tracked (committed or only added) and untracked-but-not-ignored
        # files; tracked files deleted from the work tree are skipped.
        git -C "$root" ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do
                if [[ -e $root/$f || -L $root/$f ]]; then
                    printf '%s\0' "$f"
                fi
            done
    else
        # Not a git checkout (e.g. an unpacked source archive).
        (cd -- "$root" && find . \
            \( -name .git -o -name .venv -o -name __pycache__ -o -name .pytest_cache \
            -o -path ./tests/output -o -path ./benchmarks/results \) -prune \
            -o \( -type f -o -type l \) ! -name '*.pyc' -print0)
    fi
}

rm -rf -- "$tree"
mkdir -p -- "$dest"
list_files | tar -C "$root" --no-recursion --null -cf - --files-from=- |
    tar -C "$dest" -xf -

if [[ ! -f $dest/galaxy.yml ]]; then
    echo "collection-tree: the copy in $dest has no galaxy.yml" >&2
    exit 1
fi
printf '%s\n' "$dest"
