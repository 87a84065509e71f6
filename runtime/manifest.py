"""The artifact manifest: its JSON Schema (manifest.schema.json, versioned) and a small checker.

The checker implements the part of JSON Schema the manifest schema uses (type, required, properties,
items, enum, minimum, const, minItems, local $ref), so the device side needs no jsonschema package.
"""
import json
from pathlib import Path

from .errors import EdgezoError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: no per-sample loss output (the engine computes it for the built-in kinds)
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema():
    return json.loads(SCHEMA_PATH.read_text())


def _type_ok(value, kind):
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def _check(value, spec, where, root):
    if "$ref" in spec:  # only local refs: "#/$defs/NAME"
        spec = root["$defs"][spec["$ref"].rsplit("/", 1)[-1]]
    kinds = spec.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_type_ok(value, k) for k in kinds):
            return f"{where} must be of type {'/'.join(kinds)}, got {type(value).__name__} {value!r:.60}"
    if "const" in spec and value != spec["const"]:
        return f"{where} must be {spec['const']!r}, got {value!r}"
    if "enum" in spec and value not in spec["enum"]:
        return f"{where} must be one of {spec['enum']}, got {value!r}"
    if "minimum" in spec and _type_ok(value, "number") and value < spec["minimum"]:
        return f"{where} must be >= {spec['minimum']}, got {value!r}"
    if isinstance(value, dict):
        for key in spec.get("required", []):
            if key not in value:
                return f"{where} is missing the field {key!r}"
        for key, sub in spec.get("properties", {}).items():
            if key in value:
                error = _check(value[key], sub, f"{where}.{key}", root)
                if error:
                    return error
    if isinstance(value, list):
        if len(value) < spec.get("minItems", 0):
            return f"{where} must have at least {spec['minItems']} items, got {len(value)}"
        for i, item in enumerate(value):
            error = _check(item, spec.get("items", {}), f"{where}[{i}]", root)
            if error:
                return error
    return None


def validate(manifest, source="manifest.json"):
    """Raise EdgezoError naming the file and field when `manifest` breaks the schema or its own offsets."""
    spec = schema()
    error = _check(manifest, spec, "manifest", spec)
    if error:
        raise EdgezoError(f"{source}: {error}")
    if manifest["format_version"] not in READABLE_VERSIONS:
        raise EdgezoError(f"{source}: format_version {manifest['format_version']} is not supported "
                          f"(this edgezo reads {', '.join(map(str, READABLE_VERSIONS))})")
    offset = 0
    for i, t in enumerate(manifest["trainable"]):
        size = 1
        for d in t["shape"]:
            size *= d
        if t["offset"] != offset or t["size"] != size:
            raise EdgezoError(f"{source}: manifest.trainable[{i}] ({t['name']}) has offset {t['offset']} "
                              f"size {t['size']}, expected offset {offset} size {size}")
        offset += size
    if offset != manifest["num_params"]:
        raise EdgezoError(f"{source}: manifest.num_params is {manifest['num_params']} but the trainable "
                          f"tensors hold {offset}")
    return manifest


def read(path):
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgezoError(f"{path}: missing (not an edgezo artifact folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgezoError(f"{path}: not valid JSON ({e})") from None
    return validate(manifest, str(path))
