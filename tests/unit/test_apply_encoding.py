"""The applier frames committed commands into ApplyEntries by hand (no re-parse);
the bytes must be exactly what protobuf would encode, or the engine misreads entries."""
import random

from raft_sidecar.applier import encode_apply_entries
from raftkv.pb import consensus_pb2 as pb


def _reference(entries):
    return pb.ApplyEntriesRequest(entries=[
        pb.LogEntry(index=i, commands=[pb.Command.FromString(c)]) for i, c in entries]).SerializeToString()


def test_matches_protobuf_encoding_for_random_entries():
    rng = random.Random(7)
    for _ in range(300):
        entries = []
        for _ in range(rng.randint(1, 6)):
            cmd = pb.Command(op="BATCH", client_id="c" * rng.randint(0, 40), seq=rng.randint(1, 1 << 60),
                             batch=[pb.Command(op="SET", bkey=rng.randbytes(rng.randint(1, 300)),
                                               bvalue=rng.randbytes(rng.choice([0, 1, 127, 128, 16384, 70000])))])
            entries.append((rng.choice([1, 127, 128, 300, 1 << 21, rng.randint(1, 1 << 62)]), cmd.SerializeToString()))
        assert encode_apply_entries(entries) == _reference(entries)


def test_decodes_back_to_the_same_entries():
    cmd = pb.Command(op="SET", bkey=b"\x00\xffkey", bvalue=b"value")
    raw = encode_apply_entries([(5, cmd.SerializeToString()), (6, b"")])
    req = pb.ApplyEntriesRequest.FromString(raw)
    assert [e.index for e in req.entries] == [5, 6]
    assert req.entries[0].commands[0] == cmd
    assert req.entries[1].commands[0] == pb.Command()
