"""Tests for storage_engine.commands: request validation and command encoding.

Pure functions, no I/O. Every refusal test names the kind and part of the
message, so a validator that refuses everything the same way fails here, and
the valid-input tests catch one that refuses too much.
"""

from __future__ import annotations

import msgpack
import pytest

from raftkv.pb import consensus_pb2 as pb
from storage_engine.commands import Write, decode_command, encode_batch, parse_insert
from storage_engine.errors import ErrorKind, KVError

MAX_KEY = 8
MAX_VALUE = 16


def pack(doc: object) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def parse(body: bytes) -> Write:
    return parse_insert(body, MAX_KEY, MAX_VALUE)


def refused(body: bytes) -> KVError:
    with pytest.raises(KVError) as info:
        parse(body)
    return info.value


# -- parse_insert: valid input -------------------------------------------------

def test_set_with_str_key_and_value():
    assert parse(pack({"op": "SET", "key": "k1", "value": "v1"})) == Write("SET", b"k1", b"v1")


def test_set_with_bytes_key_and_value():
    body = pack({"op": "SET", "key": b"\x00\xffk", "value": b"\x00\x01\xfe"})
    assert parse(body) == Write("SET", b"\x00\xffk", b"\x00\x01\xfe")


def test_set_with_non_ascii_str_is_utf8_encoded():
    w = parse(pack({"op": "SET", "key": "ключ", "value": "знач"}))
    assert w.key == "ключ".encode("utf-8")
    assert w.value == "знач".encode("utf-8")


def test_set_with_empty_value_is_allowed():
    assert parse(pack({"op": "SET", "key": "k", "value": ""})) == Write("SET", b"k", b"")


def test_delete_needs_no_value():
    assert parse(pack({"op": "DELETE", "key": "k"})) == Write("DELETE", b"k", b"")


def test_delete_ignores_a_value():
    assert parse(pack({"op": "DELETE", "key": b"k", "value": "ignored"})) == Write("DELETE", b"k", b"")


def test_op_is_case_insensitive():
    assert parse(pack({"op": "set", "key": "k", "value": "v"})).op == "SET"
    assert parse(pack({"op": "Delete", "key": "k"})).op == "DELETE"


def test_limits_are_inclusive():
    w = parse(pack({"op": "SET", "key": "k" * MAX_KEY, "value": "v" * MAX_VALUE}))
    assert len(w.key) == MAX_KEY and len(w.value) == MAX_VALUE
    w = parse(pack({"op": "SET", "key": b"k" * MAX_KEY, "value": b"v" * MAX_VALUE}))
    assert len(w.key) == MAX_KEY and len(w.value) == MAX_VALUE


def test_extra_fields_are_ignored():
    body = pack({"op": "SET", "key": "k", "value": "v", "client": "x"})
    assert parse(body) == Write("SET", b"k", b"v")


def test_limit_is_counted_in_utf8_bytes_not_characters():
    # 5 characters, 10 bytes: over an 8-byte key limit.
    err = refused(pack({"op": "SET", "key": "ééééé", "value": "v"}))
    assert err.kind is ErrorKind.TOO_LARGE
    assert "10 bytes" in err.message


# -- parse_insert: malformed input -------------------------------------------------

VALID = {"op": "SET", "key": "k", "value": "v"}


@pytest.mark.parametrize(
    "body, kind, words",
    [
        pytest.param(b"", ErrorKind.BAD_INPUT, "empty body", id="empty-body"),
        pytest.param(b"\xc1", ErrorKind.BAD_INPUT, "not valid msgpack", id="never-used-byte"),
        pytest.param(b"hello world", ErrorKind.BAD_INPUT, "", id="plain-text"),
        pytest.param(b'{"op":"SET","key":"k","value":"v"}', ErrorKind.BAD_INPUT, "", id="json"),
        pytest.param(pack(VALID)[:-1], ErrorKind.BAD_INPUT, "not valid msgpack", id="truncated"),
        pytest.param(b"\xdb\x00\x00\x00\x10ab", ErrorKind.BAD_INPUT, "not valid msgpack", id="truncated-str"),
        pytest.param(pack(VALID) + b"\x00", ErrorKind.BAD_INPUT, "trailing bytes", id="trailing-bytes"),
        pytest.param(pack(VALID) + pack(VALID), ErrorKind.BAD_INPUT, "trailing bytes", id="two-maps"),
        pytest.param(pack(["SET", "k", "v"]), ErrorKind.BAD_INPUT, "must be a msgpack map, got list", id="array"),
        pytest.param(pack("SET"), ErrorKind.BAD_INPUT, "must be a msgpack map, got str", id="scalar"),
        pytest.param(pack({"key": "k", "value": "v"}), ErrorKind.BAD_INPUT, "missing field 'op'", id="op-missing"),
        pytest.param(pack({"op": "PUT", "key": "k", "value": "v"}), ErrorKind.BAD_INPUT, "unknown op 'PUT'",
                     id="op-unknown"),
        pytest.param(pack({"op": "", "key": "k", "value": "v"}), ErrorKind.BAD_INPUT, "unknown op", id="op-empty"),
        pytest.param(pack({"op": 1, "key": "k", "value": "v"}), ErrorKind.BAD_INPUT, "unknown op 1", id="op-int"),
        pytest.param(pack({"op": b"SET", "key": "k", "value": "v"}), ErrorKind.BAD_INPUT, "unknown op",
                     id="op-bytes"),
        pytest.param(pack({"op": "SET", "value": "v"}), ErrorKind.BAD_INPUT, "missing field 'key'", id="key-missing"),
        pytest.param(pack({"op": "DELETE"}), ErrorKind.BAD_INPUT, "missing field 'key'", id="delete-key-missing"),
        pytest.param(pack({"op": "SET", "key": "", "value": "v"}), ErrorKind.BAD_INPUT,
                     "field 'key' must not be empty", id="key-empty-str"),
        pytest.param(pack({"op": "DELETE", "key": b""}), ErrorKind.BAD_INPUT,
                     "field 'key' must not be empty", id="key-empty-bytes"),
        pytest.param(pack({"op": "SET", "key": 7, "value": "v"}), ErrorKind.BAD_INPUT,
                     "field 'key' must be a string, got int", id="key-int"),
        pytest.param(pack({"op": "SET", "key": None, "value": "v"}), ErrorKind.BAD_INPUT,
                     "field 'key' must be a string", id="key-nil"),
        pytest.param(pack({"op": "SET", "key": ["k"], "value": "v"}), ErrorKind.BAD_INPUT,
                     "field 'key' must be a string, got list", id="key-list"),
        pytest.param(pack({"op": "SET", "key": "k" * (MAX_KEY + 1), "value": "v"}), ErrorKind.TOO_LARGE,
                     f"key is {MAX_KEY + 1} bytes; the limit is {MAX_KEY}", id="key-too-long"),
        pytest.param(pack({"op": "DELETE", "key": b"k" * (MAX_KEY + 1)}), ErrorKind.TOO_LARGE,
                     f"the limit is {MAX_KEY}", id="delete-key-too-long"),
        pytest.param(pack({"op": "SET", "key": "k"}), ErrorKind.BAD_INPUT,
                     "missing field 'value' for SET", id="value-missing"),
        pytest.param(pack({"op": "SET", "key": "k", "value": 5}), ErrorKind.BAD_INPUT,
                     "field 'value' must be a string, got int", id="value-int"),
        pytest.param(pack({"op": "SET", "key": "k", "value": None}), ErrorKind.BAD_INPUT,
                     "field 'value' must be a string", id="value-nil"),
        pytest.param(pack({"op": "SET", "key": "k", "value": {"a": 1}}), ErrorKind.BAD_INPUT,
                     "field 'value' must be a string, got dict", id="value-map"),
        pytest.param(pack({"op": "SET", "key": "k", "value": "v" * (MAX_VALUE + 1)}), ErrorKind.TOO_LARGE,
                     f"value is {MAX_VALUE + 1} bytes; the limit is {MAX_VALUE}", id="value-too-long"),
        pytest.param(pack({"op": "SET", "key": "k", "value": b"v" * (MAX_VALUE + 1)}), ErrorKind.TOO_LARGE,
                     f"value is {MAX_VALUE + 1} bytes", id="bin-value-too-long"),
        # A str with invalid UTF-8 inside: 0xa1 str of 1 byte, 0xff.
        pytest.param(b"\x83\xa2op\xa3SET\xa3key\xa1\xff\xa5value\xa1v", ErrorKind.BAD_INPUT,
                     "not valid msgpack", id="bad-utf8"),
        pytest.param(msgpack.packb({"op": "SET", "key": "k", "value": msgpack.ExtType(5, b"xy")}),
                     ErrorKind.BAD_INPUT, "", id="ext-type"),
        pytest.param(b"\x81\x91\xa1k\x01", ErrorKind.BAD_INPUT, "",
                     id="unhashable-map-key"),
    ],
)
def test_malformed_body_is_refused(body, kind, words):
    err = refused(body)
    assert err.kind is kind
    assert words in err.message
    assert err.message  # every refusal says why
    assert str(err) == err.message


def test_every_strict_prefix_of_a_valid_body_is_refused():
    body = pack({"op": "SET", "key": "key", "value": "value"})
    assert parse(body) == Write("SET", b"key", b"value")
    for cut in range(len(body)):
        err = refused(body[:cut])
        assert err.kind is ErrorKind.BAD_INPUT, cut


def test_deeply_nested_body_is_refused_not_crashing():
    err = refused(b"\x91" * 100_000 + b"\xc0")
    assert err.kind is ErrorKind.BAD_INPUT


@pytest.mark.parametrize("field, size", [("value", MAX_VALUE + 2), ("value", MAX_VALUE * 4), ("key", MAX_VALUE + 2)])
def test_field_well_over_the_limit_is_too_large_not_bad_msgpack(field, size):
    doc = {"op": "SET", "key": "k", "value": "v"}
    doc[field] = "x" * size
    err = refused(pack(doc))
    assert err.kind is ErrorKind.TOO_LARGE
    assert f"{field} is {size} bytes" in err.message


# -- encode_batch / decode_command ---------------------------------------------------

WRITES = [
    Write("SET", b"a", b"1"),
    Write("SET", b"\x00\xff\x80bin", b"\x00\x01\x02\xff"),
    Write("SET", b"empty", b""),
    Write("DELETE", b"a"),
    Write("SET", "ключ".encode(), "значение".encode()),
    Write("DELETE", b"\xfe"),
]


def test_encode_batch_shape():
    cmd = encode_batch(WRITES)
    assert cmd.op == "BATCH"
    assert len(cmd.batch) == len(WRITES)
    assert [c.op for c in cmd.batch] == [w.op for w in WRITES]
    assert [c.bkey for c in cmd.batch] == [w.key for w in WRITES]
    # binary-safe fields only; the original string fields stay empty
    assert all(c.key == "" and c.value == "" for c in cmd.batch)


def test_batch_round_trip_in_memory():
    assert list(decode_command(encode_batch(WRITES))) == WRITES


def test_batch_round_trip_through_the_wire_format():
    wire = encode_batch(WRITES).SerializeToString()
    assert list(decode_command(pb.Command.FromString(wire))) == WRITES


def test_round_trip_of_writes_accepted_by_parse_insert():
    bodies = [pack({"op": "SET", "key": b"\x00k", "value": b"\xff"}), pack({"op": "delete", "key": "k"})]
    writes = [parse(b) for b in bodies]
    assert list(decode_command(pb.Command.FromString(encode_batch(writes).SerializeToString()))) == writes


def test_empty_batch_decodes_to_nothing():
    assert list(decode_command(encode_batch([]))) == []


def test_original_style_set():
    assert list(decode_command(pb.Command(op="SET", key="k", value="v"))) == [Write("SET", b"k", b"v")]


def test_original_style_set_with_unicode():
    cmd = pb.Command(op="set", key="ключ", value="é")
    assert list(decode_command(cmd)) == [Write("SET", "ключ".encode(), "é".encode())]


def test_original_style_set_with_empty_value():
    assert list(decode_command(pb.Command(op="SET", key="k"))) == [Write("SET", b"k", b"")]


def test_original_style_delete_drops_value():
    assert list(decode_command(pb.Command(op="DELETE", key="k", value="v"))) == [Write("DELETE", b"k", b"")]


def test_original_style_from_wire_bytes():
    wire = pb.Command(op="SET", key="k", value="v", data=pack(VALID)).SerializeToString()
    assert list(decode_command(pb.Command.FromString(wire))) == [Write("SET", b"k", b"v")]


def test_binary_fields_win_over_string_fields():
    cmd = pb.Command(op="SET", key="str-key", value="str-value", bkey=b"\x00bk", bvalue=b"\x00bv")
    assert list(decode_command(cmd)) == [Write("SET", b"\x00bk", b"\x00bv")]


def test_unknown_op_or_missing_key_yields_nothing():
    assert list(decode_command(pb.Command(op="NOOP"))) == []
    assert list(decode_command(pb.Command(op="PUT", key="k", value="v"))) == []
    assert list(decode_command(pb.Command(op="SET", value="v"))) == []
    assert list(decode_command(pb.Command())) == []


def test_nested_batches_keep_order():
    inner = encode_batch(WRITES[:2])
    outer = pb.Command(op="BATCH", batch=[inner, pb.Command(op="SET", key="z", value="26"),
                                          pb.Command(op="NOOP")])
    assert list(decode_command(outer)) == WRITES[:2] + [Write("SET", b"z", b"26")]


# -- v1 txns on the wire -------------------------------------------------------------------------

from storage_engine.commands import Proposal, TxnRequest, decode_proposal, encode_txn  # noqa: E402
from storage_engine.txn import DELETE, PUT, RequestIdentity, Txn, TxnOp  # noqa: E402

TXN = Txn((
    TxnOp(PUT, b"k", b"v"),
    TxnOp(PUT, b"\x00bin", b"", expect_value=b""),             # an empty expected value is a condition
    TxnOp(PUT, b"new", b"x", expect_version=0),                # so is expect_version 0
    TxnOp(DELETE, b"d", expect_mod_revision=0, expect_version=3, expect_value=b"\xff"),
    TxnOp(DELETE, b"k"),
))


def wire(cmd: pb.Command) -> pb.Command:
    return pb.Command.FromString(cmd.SerializeToString())


def test_txn_round_trip_keeps_conditions_and_their_absence():
    (req,) = decode_command(wire(encode_txn(TXN)))
    assert req == TxnRequest(TXN, None)
    assert [op.has_condition for op in req.txn.ops] == [False, True, True, True, False]


def test_txn_carries_the_request_identity():
    cmd = encode_txn(TXN, RequestIdentity("client-1", 7, 5))
    assert (cmd.op, cmd.client_id, cmd.seq, cmd.floor) == ("TXN", "client-1", 7, 5)
    (req,) = decode_command(wire(cmd))
    assert req.identity == RequestIdentity("client-1", 7, 5)


def test_a_batch_mixes_original_writes_and_txns_in_order():
    items = [WRITES[0], TxnRequest(TXN, RequestIdentity("c", 1, 1)), WRITES[3], TxnRequest(Txn(()), None)]
    cmd = encode_batch(items)
    cmd.client_id, cmd.seq, cmd.floor = "engine:e", 4, 3
    prop = decode_proposal(wire(cmd))
    assert prop == Proposal("engine:e", 4, 3, tuple(items))


def test_a_txn_is_one_request_not_flattened():
    outer = pb.Command(op="BATCH", batch=[encode_txn(Txn((TxnOp(PUT, b"a", b"1"), TxnOp(PUT, b"b", b"2"))))])
    items = list(decode_command(wire(outer)))
    assert len(items) == 1 and isinstance(items[0], TxnRequest) and len(items[0].txn.ops) == 2


def test_unknown_ops_inside_a_txn_are_skipped_alike_everywhere():
    cmd = pb.Command(op="TXN", batch=[pb.Command(op="NOOP", bkey=b"x"), pb.Command(op="set", bkey=b"k", bvalue=b"v")])
    (req,) = decode_command(wire(cmd))
    assert req.txn.ops == (TxnOp(PUT, b"k", b"v"),)
