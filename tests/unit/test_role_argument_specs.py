"""Role conventions: every role variable is typed and described in meta/argument_specs.yml, has the same
default there as in defaults/main.yml (a null default may be left out of the spec), carries the role's
prefix, and is documented in the role's README."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES_DIR = Path(__file__).resolve().parents[2] / "roles"
ROLES = sorted(p.name for p in ROLES_DIR.iterdir() if (p / "meta" / "argument_specs.yml").is_file()) \
    if ROLES_DIR.is_dir() else []


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


@pytest.mark.parametrize("role", ROLES)
def test_defaults_match_the_argument_spec(role):
    defaults = load(ROLES_DIR / role / "defaults" / "main.yml")
    specs = load(ROLES_DIR / role / "meta" / "argument_specs.yml")["argument_specs"]
    options = specs["main"]["options"]
    assert sorted(set(defaults) - set(options)) == [], "defaults/main.yml variables missing from argument_specs main"
    for name, spec in options.items():
        if name in defaults and defaults[name] is None:
            assert spec.get("default") is None, f"{name}: null in defaults/main.yml, {spec['default']!r} in argument_specs"
        elif name in defaults:
            assert "default" in spec, f"{name}: defaults/main.yml sets it, argument_specs has no default"
            assert spec["default"] == defaults[name], f"{name}: {spec['default']!r} != {defaults[name]!r}"
        else:
            assert "default" not in spec, f"{name}: argument_specs default not in defaults/main.yml"


@pytest.mark.parametrize("role", ROLES)
def test_every_option_is_typed_described_prefixed_and_documented(role):
    specs = load(ROLES_DIR / role / "meta" / "argument_specs.yml")["argument_specs"]
    readme = (ROLES_DIR / role / "README.md").read_text()
    for entry_point, spec in specs.items():
        assert spec.get("short_description"), f"{entry_point}: no short_description"
        for name, option in spec.get("options", {}).items():
            assert name.startswith(f"{role}_"), f"{entry_point}.{name}: not prefixed with {role}_"
            assert option.get("type"), f"{entry_point}.{name}: no type"
            assert option.get("description"), f"{entry_point}.{name}: no description"
            if option["type"] == "list":
                assert option.get("elements"), f"{entry_point}.{name}: list without elements"
            assert f"`{name}`" in readme, f"{name} is not documented in roles/{role}/README.md"
