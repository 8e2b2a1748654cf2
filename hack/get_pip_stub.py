"""Offline stand-in for ansible-test's get-pip bootstrap script.

``ansible-test sanity --venv`` bootstraps pip into each new virtual environment
with ``get-pip.py``, which it downloads from the internet once and caches as
``~/.ansible/test/cache/get_pip_<version>.py``.  Where that download is not
possible, hack/ansible-test-sanity.sh puts this file at the cache path
instead.  It installs pip from the interpreter's own ``ensurepip`` and then
lets that pip install what get-pip was asked to install (for example
``pip==24.2``) from the package index the machine is configured with.

The get-pip options that ``pip install`` does not know (``--no-setuptools``,
``--no-wheel``) are dropped; with ``--no-setuptools`` the setuptools that
``ensurepip`` brings on Python < 3.12 is removed again, so the environment
ends up as get-pip would have left it.
"""

from __future__ import annotations

import subprocess
import sys

GET_PIP_ONLY_OPTIONS = ('--no-setuptools', '--no-wheel')


def run(args: list[str], quiet: bool = False) -> None:
    """Run the current interpreter with the given arguments, exit if it fails."""
    result = subprocess.run(
        [sys.executable] + args,
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        check=False,
    )

    if result.returncode:
        if quiet:
            sys.stdout.write(result.stdout.decode(errors='replace'))

        sys.exit(result.returncode)


def main() -> None:
    """Bootstrap pip, then install the packages get-pip was asked for."""
    argv = sys.argv[1:]
    pip_args = [arg for arg in argv if arg not in GET_PIP_ONLY_OPTIONS]

    run(['-m', 'ensurepip', '--upgrade', '--default-pip'], quiet=True)
    run(['-m', 'pip', 'install', '--quiet'] + pip_args)

    if '--no-setuptools' in argv:
        run(['-m', 'pip', 'uninstall', '--yes', '--quiet', 'setuptools'], quiet=True)


if __name__ == '__main__':
    main()
