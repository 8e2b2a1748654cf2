"""fc-standin's serde_json emulation reproduces Firecracker's body errors.

data/serde_json_cases.json was produced by feeding each body to a Rust
program built with serde_json and serde derives identical to Firecracker
1.10.1's request types (cases whose text depends on the serde_json version
-- float formatting and the position of a bad \\u escape, which changed
between the packaged serde_json 1.0.87 and Firecracker's 1.0.132 -- are
left out and covered below against serde_json 1.0.132's source)."""
from __future__ import annotations

import json

import pytest

from standin_support import DATA

CASES = json.loads((DATA / "serde_json_cases.json").read_text())


def body_of(case) -> bytes:
    if "body_hex" in case:
        return bytes.fromhex(case["body_hex"])
    return case["body"].encode()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['type']}:{c.get('body', c.get('body_hex'))[:40]}")
def test_matches_serde_json(fcs, case):
    try:
        fcs.from_slice(case["type"], body_of(case))
        got = "OK"
    except fcs.SerdeError as err:
        got = str(err)
    assert got == case["expected"]


@pytest.mark.parametrize("typ, body, expected", [
    # serde_json >= 1.0.10x formats floats with ryu in error messages
    ("MachineConfig", b'{"vcpu_count": 1.5}', "invalid type: floating point `1.5`, expected u8 at line 1 column 18"),
    ("MachineConfig", b'{"vcpu_count": -0}', "invalid type: floating point `-0.0`, expected u8 at line 1 column 17"),
    ("MachineConfig", b'{"vcpu_count": 1e21}', "invalid type: floating point `1e21`, expected u8 at line 1 column 19"),
    ("MachineConfig", b'{"vcpu_count": 18446744073709551616}',
     "invalid type: floating point `1.8446744073709552e19`, expected u8 at line 1 column 35"),
    ("MachineConfig", b'{"vcpu_count": 1e400}', "number out of range at line 1 column 20"),
    # SliceRead::decode_hex_escape consumes four bytes before validating them
    ("ActionBody", b'{"ac\\u12tion_type": 1}', "invalid escape at line 1 column 10"),
    ("ActionBody", b'{"a\\u12', "EOF while parsing a string at line 1 column 7"),
    ("ActionBody", b'{"\\ud800x": 1}', "unexpected end of hex escape at line 1 column 9"),
])
def test_version_specific_cases(fcs, typ, body, expected):
    with pytest.raises(fcs.SerdeError) as err:
        fcs.from_slice(typ, body)
    assert str(err.value) == expected


@pytest.mark.parametrize("value, text", [
    (1.5, "1.5"), (2.0, "2.0"), (1e15, "1000000000000000.0"), (1e16, "1e16"),
    (0.0001, "0.0001"), (1e-5, "0.00001"), (1e-6, "1e-6"), (1.2345e-7, "1.2345e-7"),
    (-0.0, "-0.0"), (123.456, "123.456"), (3.14e30, "3.14e30"),
])
def test_ryu_formatting(fcs, value, text):
    assert fcs.ryu_format(value) == text


def test_response_serialisation_matches_serde_json(fcs):
    assert fcs.to_json({"a": None, "b": [True, 1, 1.5], "c": "é\n\"\\\x01"}) == \
        '{"a":null,"b":[true,1,1.5],"c":"é\\n\\"\\\\\\u0001"}'
