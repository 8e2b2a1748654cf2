"""fc-standin's embedded request schema agrees with Firecracker's swagger file.

The stand-in's schema is transcribed from Firecracker's Rust serde derives
(which decide what Firecracker actually accepts); the swagger file is the
published contract.  This test pins every difference between the two to a
documented list, so a schema edit that drifts from the API fails here."""
from __future__ import annotations

import pytest
import yaml

from standin_support import DATA

SWAGGER = DATA / "firecracker-v1.10.1-swagger.yaml"

# swagger definition -> Rust struct in the stand-in's SCHEMA
DEFINITION_TO_STRUCT = {
    "Balloon": "BalloonDeviceConfig",
    "BalloonUpdate": "BalloonUpdateConfig",
    "BalloonStatsUpdate": "BalloonUpdateStatsConfig",
    "BootSource": "BootSourceConfig",
    "Drive": "BlockDeviceConfig",
    "PartialDrive": "BlockDeviceUpdateConfig",
    "InstanceActionInfo": "ActionBody",
    "Logger": "LoggerConfig",
    "MachineConfiguration": "MachineConfig",
    "MemoryBackend": "MemBackendConfig",
    "Metrics": "MetricsConfig",
    "MmdsConfig": "MmdsConfig",
    "NetworkInterface": "NetworkInterfaceConfig",
    "PartialNetworkInterface": "NetworkInterfaceUpdateConfig",
    "RateLimiter": "RateLimiterConfig",
    "SnapshotCreateParams": "CreateSnapshotParams",
    "SnapshotLoadParams": "LoadSnapshotConfig",
    "TokenBucket": "TokenBucketConfig",
    "Vm": "Vm",
    "EntropyDevice": "EntropyDeviceConfig",
    "Vsock": "VsockDeviceConfig",
    "FullVmConfiguration": "VmmConfig",
}

# Documented differences between Firecracker's Rust types and its swagger file.
# (definition, property) -> why
REQUIRED_DIFFERENCES = {
    # Rust: Vec<BlockDeviceConfig> without #[serde(default)] and a non-Option
    # BootSourceConfig; the swagger lists no required keys for the config file.
    ("FullVmConfiguration", "drives"): "required by serde, not marked in swagger",
    ("FullVmConfiguration", "boot-source"): "required by serde, not marked in swagger",
}
# Structs that Firecracker does NOT derive with deny_unknown_fields.
ACCEPTS_UNKNOWN_FIELDS = {"TokenBucketConfig", "MetricsConfig", "VmmConfig"}
# Enum values that only exist on aarch64 builds.
AARCH64_ONLY_ENUM_VALUES = {"V1N1"}

INTEGER_TYPES = {"u8", "u16", "u32", "u64", "usize"}
STRING_TYPES = {"string", "path", "mac", "ipv4", "level"}


@pytest.fixture(scope="module")
def swagger():
    return yaml.safe_load(SWAGGER.read_text())


def unwrap(typ):
    while isinstance(typ, tuple) and typ[0] == "option":
        typ = typ[1]
    return typ


def resolve(swagger, prop):
    if "$ref" in prop:
        name = prop["$ref"].split("/")[-1]
        return name, swagger["definitions"][name]
    return None, prop


def test_swagger_is_the_emulated_version(swagger, fcs):
    assert swagger["info"]["version"] == fcs.EMULATED_FC_VERSION


@pytest.mark.parametrize("definition", sorted(DEFINITION_TO_STRUCT))
def test_struct_matches_swagger_definition(swagger, fcs, definition):
    struct_name = DEFINITION_TO_STRUCT[definition]
    spec = fcs.SCHEMA[struct_name]
    sw = swagger["definitions"][definition]
    props = sw.get("properties", {})
    fields = {f.name: f for f in spec.fields}

    # same property names
    assert set(props) == set(fields), (definition, set(props) ^ set(fields))

    # required properties: swagger `required` == fields without a default
    required = {n for n, f in fields.items() if f.mode == fcs.REQ}
    documented = {p for (d, p) in REQUIRED_DIFFERENCES if d == definition}
    assert set(sw.get("required", [])) | documented == required, definition

    # unknown fields
    assert spec.deny_unknown == (struct_name not in ACCEPTS_UNKNOWN_FIELDS)

    # types and enums
    for name, prop in props.items():
        typ = unwrap(fields[name].type)
        ref, target = resolve(swagger, prop)
        if isinstance(typ, tuple) and typ[0] == "vec":
            assert target.get("type") == "array", (definition, name)
            continue
        if typ in INTEGER_TYPES:
            assert target.get("type") == "integer", (definition, name)
            if "minimum" in target:
                assert target["minimum"] >= 0
        elif typ == "bool":
            assert target.get("type") == "boolean", (definition, name)
        elif typ in STRING_TYPES:
            assert target.get("type") == "string", (definition, name)
            if typ == "level":
                # case-insensitive, plus "Warn"; see LevelFilter's Deserialize
                # (YAML 1.1 reads the swagger's bare `Off` as a boolean)
                values = {"off" if v is False else str(v).lower() for v in target["enum"]}
                assert values <= set(fcs.LEVELS)
        elif isinstance(fcs.SCHEMA[typ], fcs.Enum):
            assert "enum" in target, (definition, name)
            ours = set(fcs.SCHEMA[typ].variants)
            theirs = set(target["enum"]) - AARCH64_ONLY_ENUM_VALUES
            assert ours == theirs, (definition, name, ours ^ theirs)
        else:
            assert ref is not None and DEFINITION_TO_STRUCT.get(ref) == typ, (definition, name, typ)


def test_every_swagger_operation_is_routed(swagger, fcs):
    """Every path/method of the swagger file reaches a VMM action (no
    'Invalid request method and/or path' for documented operations)."""
    samples = {
        "drive_id": "d1", "iface_id": "eth0",
    }
    bodies = {
        ("PUT", "/actions"): {"action_type": "FlushMetrics"},
        ("PUT", "/balloon"): {"amount_mib": 1, "deflate_on_oom": False},
        ("PATCH", "/balloon"): {"amount_mib": 1},
        ("PATCH", "/balloon/statistics"): {"stats_polling_interval_s": 1},
        ("PUT", "/boot-source"): {"kernel_image_path": "/k"},
        ("PUT", "/cpu-config"): {},
        ("PUT", "/drives/{drive_id}"): {"drive_id": "d1", "is_root_device": False},
        ("PATCH", "/drives/{drive_id}"): {"drive_id": "d1"},
        ("PUT", "/logger"): {},
        ("PUT", "/machine-config"): {"vcpu_count": 1, "mem_size_mib": 128},
        ("PATCH", "/machine-config"): {"smt": False},
        ("PUT", "/metrics"): {"metrics_path": "/m"},
        ("PUT", "/mmds"): {},
        ("PATCH", "/mmds"): {},
        ("PUT", "/mmds/config"): {"network_interfaces": ["eth0"]},
        ("PUT", "/entropy"): {},
        ("PUT", "/network-interfaces/{iface_id}"): {"iface_id": "eth0", "host_dev_name": "t"},
        ("PATCH", "/network-interfaces/{iface_id}"): {"iface_id": "eth0"},
        ("PUT", "/snapshot/create"): {"snapshot_path": "/s", "mem_file_path": "/m"},
        ("PUT", "/snapshot/load"): {"snapshot_path": "/s", "mem_file_path": "/m"},
        ("PATCH", "/vm"): {"state": "Paused"},
        ("PUT", "/vsock"): {"guest_cid": 3, "uds_path": "/v"},
    }
    import json
    seen = 0
    for path, ops in swagger["paths"].items():
        for method in ops:
            m = method.upper()
            concrete = path
            for k, v in samples.items():
                concrete = concrete.replace("{%s}" % k, v)
            body = bodies.get((m, path))
            raw = None if body is None else json.dumps(body).encode()
            action, _payload, _dep = fcs.parse_request(m, concrete, raw)
            assert action and action[0].isupper(), (m, path)
            seen += 1
    assert seen == 29
