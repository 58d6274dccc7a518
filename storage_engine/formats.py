"""Wire formats of the /v1 API: content negotiation, msgpack/JSON bodies, byte fields, error bodies.

Pure functions and one exception type, no I/O: v1_api does the HTTP, this module
decides what bytes mean. Keys and values are bytes everywhere; JSON, which has no
bytes, carries them as UTF-8 text in `name` or as base64 in `name_b64`.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import unquote_to_bytes

import msgpack

from .errors import ErrorKind, KVError

JSON = "application/json"
MSGPACK = "application/msgpack"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
RAW_TYPES = ("application/octet-stream", "text/plain")

# Every /v1 error code and its one HTTP status (docs/api.md lists them).
STATUS = {
    "bad_request": 400,
    "bad_range": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "compare_failed": 412,
    "too_large": 413,
    "overloaded": 429,
    "no_leader": 503,
    "unavailable": 503,
    "outcome_unknown": 503,
    "internal": 500,
}

# KVError kinds of the layers below, by name so kinds added later (auth) map too.
# NOT_APPLIED: a new leader overwrote the entry; definite, like having no leader.
_KIND_CODE = {
    "BAD_INPUT": "bad_request",
    "BAD_RANGE": "bad_range",
    "TOO_LARGE": "too_large",
    "NOT_FOUND": "not_found",
    "COMPARE_FAILED": "compare_failed",
    "UNAUTHORIZED": "unauthorized",
    "FORBIDDEN": "forbidden",
    "NO_LEADER": "no_leader",
    "NOT_APPLIED": "no_leader",
    "NO_QUORUM": "unavailable",
    "OVERLOADED": "overloaded",
    "OUTCOME_UNKNOWN": "outcome_unknown",
    "INTERNAL": "internal",
}

# Fields whose values are bytes; each may also come as `<name>_b64`.
BYTE_FIELDS = frozenset({"key", "value", "expect_value", "start", "end", "prefix"})
MAX_INT = (1 << 63) - 1


@dataclass
class V1Error(Exception):
    """A /v1 failure: one code of STATUS, a message for humans, extra top-level fields for programs."""
    code: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in STATUS:
            raise ValueError(f"unknown /v1 error code {self.code!r}")

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @classmethod
    def from_kv(cls, err: KVError) -> "V1Error":
        kind = err.kind.name if isinstance(err.kind, ErrorKind) else str(err.kind)
        return cls(_KIND_CODE.get(kind, "internal"), err.message)


def bad(message: str) -> V1Error:
    return V1Error("bad_request", message)


# -- byte helpers --------------------------------------------------------------------------

def b64decode(text: str, what: str) -> bytes:
    """Standard or URL-safe base64, padding optional (clients rarely agree on one)."""
    if not isinstance(text, str):
        raise bad(f"field '{what}' must be a base64 string, got {type(text).__name__}")
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", cleaned):
        raise bad(f"field '{what}' is not valid base64")
    cleaned = cleaned.rstrip("=")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"field '{what}' is not valid base64") from None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# -- request bodies ----------------------------------------------------------------------------

def media_type(content_type: str | None) -> str | None:
    """`application/json; charset=utf-8` -> `application/json`; None when the header is absent."""
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower()


def body_format(content_type: str | None, raw_allowed: bool = False) -> str:
    """"json", "msgpack" or "raw" for a request's Content-Type (absent: msgpack)."""
    mt = media_type(content_type)
    if mt is None or mt == "" or mt in MSGPACK_TYPES:
        return "msgpack"
    if mt == JSON:
        return "json"
    if raw_allowed and mt in RAW_TYPES:
        return "raw"
    accepted = "application/msgpack, application/json"
    if raw_allowed:
        accepted += ", application/octet-stream or text/plain (raw value)"
    raise bad(f"unsupported Content-Type {content_type!r}; use {accepted}")


def decode_doc(body: bytes, fmt: str) -> dict[str, Any]:
    """A request document: a msgpack or JSON map with string keys."""
    if not body:
        raise bad("empty body; expected a msgpack or JSON map")
    if fmt == "json":
        try:
            doc = json.loads(body)
        except RecursionError:
            raise bad("body is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints
            raise bad(f"body is not valid JSON: {exc}") from None
        kind = "JSON object"
    else:
        try:
            doc = msgpack.unpackb(body, raw=False, strict_map_key=False, max_ext_len=0)
        except msgpack.ExtraData:
            raise bad("body has trailing bytes after the msgpack map") from None
        except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError):
            raise bad("body is not valid msgpack") from None
        kind = "msgpack map"
    if not isinstance(doc, dict):
        raise bad(f"body must be a {kind}, got {_type_name(doc)}")
    for k in doc:
        if not isinstance(k, str):
            raise bad(f"every field name must be a string, got {_type_name(k)}")
    return doc


def check_fields(doc: Mapping[str, Any], allowed: frozenset[str] | set[str], where: str = "body") -> None:
    """Unknown fields are refused: a typo like `expect_verison` must not silently drop a condition."""
    for name in doc:
        base = name[:-4] if name.endswith("_b64") and name[:-4] in BYTE_FIELDS else name
        if base not in allowed:
            raise bad(f"unknown field '{name}' in {where}; expected {', '.join(sorted(allowed))}")


def get_bytes(doc: Mapping[str, Any], name: str, required: bool = False, where: str = "") -> bytes | None:
    """Field `name` as bytes: msgpack bin, a UTF-8 string, or `name_b64` in base64."""
    label = f"{where}{name}"
    plain, coded = name in doc, f"{name}_b64" in doc
    if plain and coded:
        raise bad(f"give '{label}' or '{label}_b64', not both")
    if coded:
        return b64decode(doc[f"{name}_b64"], f"{label}_b64")
    if not plain:
        if required:
            raise bad(f"missing field '{label}' (or '{label}_b64')")
        return None
    raw = doc[name]
    if isinstance(raw, str):
        return raw.encode("utf-8")
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    raise bad(f"field '{label}' must be a string or bytes, got {_type_name(raw)}")


def get_int(doc: Mapping[str, Any], name: str, where: str = "") -> int | None:
    if name not in doc:
        return None
    return check_int(doc[name], f"{where}{name}")


def check_int(raw: object, label: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise bad(f"field '{label}' must be an integer, got {_type_name(raw)}")
    if not 0 <= raw <= MAX_INT:
        raise bad(f"field '{label}' must be between 0 and {MAX_INT}, got {raw}")
    return raw


def _type_name(x: object) -> str:
    return {dict: "map", list: "array", str: "string", bytes: "bytes", bool: "boolean",
            int: "integer", float: "number", type(None): "null"}.get(type(x), type(x).__name__)


# -- query strings -------------------------------------------------------------------------------

class Query:
    """The raw query string, percent-decoded to bytes (aiohttp's own decoding is UTF-8 only).

    Like the path, with unquote_to_bytes: `+` is a plus sign, a space is `%20`. A
    parameter given twice is refused: which one would win is a guess either way.
    """

    def __init__(self, raw_target: str) -> None:
        qs = raw_target.split("?", 1)[1] if "?" in raw_target else ""
        qs = qs.split("#", 1)[0]
        self._params: dict[str, bytes] = {}
        self._dup: str | None = None
        for part in qs.split("&"):
            if not part:
                continue
            name, _, value = part.partition("=")
            key = unquote_to_bytes(name).decode("utf-8", "replace")
            if key in self._params and self._dup is None:
                self._dup = key
            self._params[key] = unquote_to_bytes(value)

    def check(self) -> None:
        if self._dup is not None:
            raise bad(f"query parameter '{self._dup}' given more than once")

    def __contains__(self, name: str) -> bool:
        return name in self._params

    def names(self) -> list[str]:
        return list(self._params)

    def text(self, name: str, default: str | None = None) -> str | None:
        raw = self._params.get(name)
        if raw is None:
            return default
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"query parameter '{name}' is not UTF-8 text") from None

    def bytes_param(self, name: str) -> bytes | None:
        """`name` percent-decoded, or `name_b64` in base64url; an empty value counts as absent."""
        plain, coded = self._params.get(name), self._params.get(f"{name}_b64")
        if plain is not None and coded is not None:
            raise bad(f"give query parameter '{name}' or '{name}_b64', not both")
        if coded is not None:
            text = coded.decode("ascii", "replace")
            return b64decode(text, f"{name}_b64") or None
        return plain or None

    def int_param(self, name: str) -> int | None:
        text = self.text(name)
        if text is None:
            return None
        if not re.fullmatch(r"[0-9]{1,19}", text):
            raise bad(f"query parameter '{name}' must be a non-negative integer, got {text!r}")
        return check_int(int(text), name)

    def bool_param(self, name: str, default: bool = False) -> bool:
        text = self.text(name)
        if text is None:
            return default
        low = text.lower()
        if low in ("", "1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise bad(f"query parameter '{name}' must be true or false, got {text!r}")


# -- answers ------------------------------------------------------------------------------------------

def wants_json(accept: str | None, query: Query) -> bool:
    """JSON when `?format=json`, or when Accept names application/json; msgpack otherwise.
    (An unknown format= is an error, which then follows Accept.)"""
    fmt = _format_param(query)
    if fmt in ("json", "msgpack"):
        return fmt == "json"
    return accept is not None and JSON in accept.lower()


def check_format_param(query: Query) -> None:
    fmt = _format_param(query)
    if fmt not in (None, "json", "msgpack"):
        raise bad(f"unknown format {fmt!r}; use json or msgpack")


def _format_param(query: Query) -> str | None:
    try:
        fmt = query.text("format")
    except V1Error:
        return "?"
    return fmt.lower() if fmt is not None else None


def to_json_doc(doc: Any) -> Any:
    """Bytes become `name` (valid UTF-8) or `name_b64` (standard base64), recursively."""
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            if isinstance(v, (bytes, bytearray)):
                try:
                    out[k] = bytes(v).decode("utf-8")
                except UnicodeDecodeError:
                    out[f"{k}_b64"] = base64.b64encode(bytes(v)).decode("ascii")
            else:
                out[k] = to_json_doc(v)
        return out
    if isinstance(doc, (list, tuple)):
        return [to_json_doc(x) for x in doc]
    return doc


def encode(doc: Any, as_json: bool) -> tuple[bytes, str]:
    """(body, content type) of an answer document."""
    if as_json:
        return json.dumps(to_json_doc(doc), separators=(",", ":"), ensure_ascii=False).encode("utf-8"), JSON
    return msgpack.packb(doc, use_bin_type=True), MSGPACK


def error_doc(err: V1Error) -> dict[str, Any]:
    """{"error": {"code", "message"}} with the error's extra fields (current, failed,
    revision ...) beside "error", where a client reads them without unwrapping."""
    return {"error": {"code": err.code, "message": err.message}, **err.extra}
