"""Tests of fastroute.noise: the cacophony vectors, failure modes and framing."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from fastroute.errors import (
    DecryptError,
    ErrorCode,
    FastrouteError,
    HandshakeError,
    InvalidArgument,
    ProtocolError,
    WrongType,
)
from fastroute.noise import (
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    PROLOGUE,
    PROTOCOL_NAME,
    CipherState,
    FrameReader,
    HandshakeState,
    KeyPair,
    SymmetricState,
    frame,
)

# ---------------------------------------------------------------- vectors

# Committed with the tests (tests/data/README.md: source, licence, subset).
VECTORS_FILE = Path(__file__).resolve().parent / "data" / "noise-cacophony-vectors.json"


def _load_vectors() -> list[dict]:
    try:
        data = json.loads(VECTORS_FILE.read_text())
    except OSError:
        return []  # test_vectors_present fails with the path
    return [v for v in data["vectors"] if v.get("protocol_name") == PROTOCOL_NAME.decode()]


VECTORS = _load_vectors()


def test_vectors_present():
    # A missing file or a renamed protocol must fail loudly, not leave the
    # parametrized test below with nothing to run.
    assert VECTORS_FILE.is_file(), f"vectors not found at {VECTORS_FILE}"
    assert len(VECTORS) > 0, f"no {PROTOCOL_NAME.decode()} vector in {VECTORS_FILE}"


def _run_vector_role(vector: dict, initiator: bool) -> None:
    """Play one side alone against the vector's bytes for the other side."""
    h = bytes.fromhex
    side = "init" if initiator else "resp"
    hs = HandshakeState(
        initiator,
        KeyPair.from_private(h(vector[f"{side}_static"])),
        prologue=h(vector[f"{side}_prologue"]),
        ephemeral=KeyPair.from_private(h(vector[f"{side}_ephemeral"])),
    )
    peer_static = KeyPair.from_private(h(vector["resp_static" if initiator else "init_static"]))
    send = recv = None
    for i, msg in enumerate(vector["messages"]):
        payload, ciphertext = h(msg["payload"]), h(msg["ciphertext"])
        ours = (i % 2 == 0) == initiator  # initiator writes the even messages
        if not hs.complete:
            if ours:
                assert hs.write_message(payload) == ciphertext, f"message {i}"
            else:
                assert hs.read_message(ciphertext) == payload, f"message {i}"
            if hs.complete:
                assert hs.handshake_hash == h(vector["handshake_hash"])
                assert hs.remote_static == peer_static.public
                send, recv = hs.split()
        elif ours:
            assert send.encrypt(payload) == ciphertext, f"transport message {i}"
        else:
            assert recv.decrypt(ciphertext) == payload, f"transport message {i}"
    assert hs.complete
    assert send.n + recv.n == len(vector["messages"]) - 3


@pytest.mark.parametrize("initiator", [True, False], ids=["initiator", "responder"])
@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["protocol_name"])
def test_cacophony_vector(vector, initiator):
    _run_vector_role(vector, initiator)


# ---------------------------------------------------------------- helpers

def _handshake(prologue_i=PROLOGUE, prologue_r=PROLOGUE, payloads=(b"", b"hello", b"cred")):
    si, sr = KeyPair.generate(), KeyPair.generate()
    ini = HandshakeState(True, si, prologue=prologue_i)
    res = HandshakeState(False, sr, prologue=prologue_r)
    assert res.read_message(ini.write_message(payloads[0])) == payloads[0]
    assert ini.read_message(res.write_message(payloads[1])) == payloads[1]
    assert res.read_message(ini.write_message(payloads[2])) == payloads[2]
    return ini, res, si, sr


def _pair():
    ini, res, _, _ = _handshake()
    i_send, i_recv = ini.split()
    r_send, r_recv = res.split()
    return i_send, i_recv, r_send, r_recv


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


# ---------------------------------------------------------------- handshake

def test_handshake_roundtrip_and_transport():
    ini, res, si, sr = _handshake()
    assert ini.complete and res.complete
    assert ini.remote_static == sr.public
    assert res.remote_static == si.public
    assert ini.handshake_hash == res.handshake_hash
    assert len(ini.handshake_hash) == 32
    i_send, i_recv = ini.split()
    r_send, r_recv = res.split()
    for size in (0, 1, 100, 4096, MAX_MESSAGE_LEN - 16):
        pt = os.urandom(size)
        assert r_recv.decrypt(i_send.encrypt(pt)) == pt
        assert i_recv.decrypt(r_send.encrypt(pt)) == pt
    # The two directions use different keys.
    assert i_send.encrypt(b"x") != r_send.encrypt(b"x")


def test_remote_static_learned_at_the_right_message():
    si, sr = KeyPair.generate(), KeyPair.generate()
    ini, res = HandshakeState(True, si), HandshakeState(False, sr)
    assert ini.remote_static is None and res.remote_static is None
    res.read_message(ini.write_message())
    ini.read_message(res.write_message())
    assert ini.remote_static == sr.public and res.remote_static is None
    res.read_message(ini.write_message())
    assert res.remote_static == si.public


def test_handshake_message_sizes():
    si, sr = KeyPair.generate(), KeyPair.generate()
    ini, res = HandshakeState(True, si), HandshakeState(False, sr)
    m1 = ini.write_message()
    res.read_message(m1)
    m2 = res.write_message(b"abc")
    ini.read_message(m2)
    m3 = ini.write_message(b"")
    assert (len(m1), len(m2), len(m3)) == (32, 32 + 48 + 3 + 16, 48 + 16)


def test_wrong_prologue_fails_closed():
    ini = HandshakeState(True, KeyPair.generate(), prologue=b"fastroute/1")
    res = HandshakeState(False, KeyPair.generate(), prologue=b"fastroute/2")
    res.read_message(ini.write_message())  # msg1 has no tag: nothing to detect yet
    m2 = res.write_message(b"server hello")
    with pytest.raises((HandshakeError, DecryptError)) as info:
        ini.read_message(m2)
    assert info.value.code in (ErrorCode.HANDSHAKE_FAILED, ErrorCode.DECRYPT_FAILED)
    assert not ini.complete
    # A failed handshake stays failed: no second chance with other bytes.
    with pytest.raises(HandshakeError):
        ini.write_message()
    with pytest.raises(HandshakeError):
        ini.split()


@pytest.mark.parametrize("pos", [0, 31, 32, 60, 79, 80, -1], ids=lambda p: f"byte{p}")
def test_tampered_msg2_fails(pos):
    ini = HandshakeState(True, KeyPair.generate())
    res = HandshakeState(False, KeyPair.generate())
    res.read_message(ini.write_message())
    m2 = res.write_message(b"server hello")
    with pytest.raises(HandshakeError) as info:
        ini.read_message(_flip(m2, pos))
    assert info.value.code == ErrorCode.HANDSHAKE_FAILED


@pytest.mark.parametrize("pos", [0, 47, 48, -1], ids=lambda p: f"byte{p}")
def test_tampered_msg3_fails(pos):
    ini = HandshakeState(True, KeyPair.generate())
    res = HandshakeState(False, KeyPair.generate())
    res.read_message(ini.write_message())
    ini.read_message(res.write_message())
    m3 = ini.write_message(b"client hello")
    with pytest.raises(HandshakeError):
        res.read_message(_flip(m3, pos))
    assert not res.complete


def test_tampered_msg1_detected_at_msg2():
    ini = HandshakeState(True, KeyPair.generate())
    res = HandshakeState(False, KeyPair.generate())
    m1 = ini.write_message()
    res.read_message(_flip(m1, 5))  # a different (valid) ephemeral
    with pytest.raises(HandshakeError):
        ini.read_message(res.write_message())


def test_low_order_ephemeral_refused():
    # An all-zero X25519 point gives an all-zero shared secret.
    ini = HandshakeState(True, KeyPair.generate())
    res = HandshakeState(False, KeyPair.generate())
    ini.write_message()
    res.read_message(bytes(32))
    with pytest.raises(HandshakeError):
        res.write_message()


@pytest.mark.parametrize("step,length", [(0, 0), (0, 31), (1, 0), (1, 95), (2, 0), (2, 63)])
def test_short_handshake_messages(step, length):
    ini = HandshakeState(True, KeyPair.generate())
    res = HandshakeState(False, KeyPair.generate())
    msgs = []
    msgs.append(ini.write_message())
    if step > 0:
        res.read_message(msgs[0])
        msgs.append(res.write_message())
    if step > 1:
        ini.read_message(msgs[1])
        msgs.append(ini.write_message())
    reader = res if step % 2 == 0 else ini
    with pytest.raises(HandshakeError):
        reader.read_message(msgs[step][:length])


def test_oversize_handshake_message_refused():
    res = HandshakeState(False, KeyPair.generate())
    with pytest.raises(HandshakeError):
        res.read_message(bytes(MAX_MESSAGE_LEN + 1))


def test_oversize_handshake_payload_refused_before_state_changes():
    ini = HandshakeState(True, KeyPair.generate())
    with pytest.raises(ProtocolError) as info:
        ini.write_message(bytes(MAX_MESSAGE_LEN - 31))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    res = HandshakeState(False, KeyPair.generate())
    m1 = ini.write_message(bytes(MAX_MESSAGE_LEN - 32))  # largest legal msg1
    assert len(m1) == MAX_MESSAGE_LEN
    assert res.read_message(m1) == bytes(MAX_MESSAGE_LEN - 32)


def test_out_of_order_calls():
    ini = HandshakeState(True, KeyPair.generate())
    res = HandshakeState(False, KeyPair.generate())
    with pytest.raises(HandshakeError):
        ini.read_message(bytes(32))  # initiator must write first
    with pytest.raises(HandshakeError):
        res.write_message()  # responder must read first
    m1 = ini.write_message()
    with pytest.raises(HandshakeError):
        ini.write_message()  # peer's turn
    res.read_message(m1)
    with pytest.raises(HandshakeError):
        res.read_message(m1)  # our turn to write
    ini.read_message(res.write_message())
    with pytest.raises(HandshakeError):
        ini.split()  # not complete yet
    res.read_message(ini.write_message())
    for hs in (ini, res):
        with pytest.raises(HandshakeError):
            hs.write_message()
        with pytest.raises(HandshakeError):
            hs.read_message(bytes(64))
        hs.split()
        with pytest.raises(HandshakeError):
            hs.split()  # single owner of the nonce counters


def test_bad_argument_types():
    with pytest.raises(WrongType):
        HandshakeState(True, b"not a keypair")
    hs = HandshakeState(True, KeyPair.generate())
    with pytest.raises(WrongType):
        hs.write_message("text")
    with pytest.raises(WrongType):
        KeyPair.from_private("00" * 32)
    with pytest.raises(InvalidArgument):
        KeyPair.from_private(bytes(31))


def test_keypair():
    kp = KeyPair.generate()
    again = KeyPair.from_private(kp.private)
    assert (again.private, again.public) == (kp.private, kp.public)
    assert len(kp.public) == 32
    assert kp.private.hex() not in repr(kp)
    assert KeyPair.generate().public != kp.public


def test_symmetric_state_initialisation():
    assert SymmetricState(PROTOCOL_NAME).h == PROTOCOL_NAME  # exactly 32 bytes: used as is
    assert SymmetricState(b"short").h == b"short".ljust(32, b"\x00")
    long_name = b"Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s"  # > 32 bytes: hashed
    assert SymmetricState(long_name).h == hashlib.sha256(long_name).digest()


def test_symmetric_state_before_key_is_plaintext():
    a, b = SymmetricState(), SymmetricState()
    assert not a.has_key
    assert a.encrypt_and_hash(b"clear") == b"clear"
    assert b.decrypt_and_hash(b"clear") == b"clear"
    assert a.h == b.h
    a.mix_key(b"k" * 32)
    b.mix_key(b"k" * 32)
    ct = a.encrypt_and_hash(b"secret")
    assert ct != b"secret" and len(ct) == 6 + 16
    assert b.decrypt_and_hash(ct) == b"secret"
    (a1, a2), (b1, b2) = a.split(), b.split()
    assert b1.decrypt(a1.encrypt(b"x")) == b"x"
    assert b2.decrypt(a2.encrypt(b"y")) == b"y"


# ---------------------------------------------------------------- transport

def test_tampered_transport_message():
    i_send, _, _, r_recv = _pair()
    ct = i_send.encrypt(b"hello relay")
    for pos in (0, len(ct) - 1):
        with pytest.raises(DecryptError) as info:
            r_recv.decrypt(_flip(ct, pos))
        assert info.value.code == ErrorCode.DECRYPT_FAILED
        assert isinstance(info.value, ProtocolError)
    assert r_recv.n == 0  # failures do not advance the nonce (rev 34, 5.1)
    assert r_recv.decrypt(ct) == b"hello relay"


@pytest.mark.parametrize("length", [0, 1, 15])
def test_truncated_transport_message(length):
    i_send, _, _, r_recv = _pair()
    ct = i_send.encrypt(b"")
    with pytest.raises(DecryptError):
        r_recv.decrypt(ct[:length])


def test_replay_and_reorder_fail():
    i_send, _, _, r_recv = _pair()
    c0, c1, c2 = (i_send.encrypt(b"m%d" % k) for k in range(3))
    assert r_recv.decrypt(c0) == b"m0"
    with pytest.raises(DecryptError):
        r_recv.decrypt(c0)  # replay
    with pytest.raises(DecryptError):
        r_recv.decrypt(c2)  # skipped one
    assert r_recv.decrypt(c1) == b"m1"


def test_associated_data_is_authenticated():
    i_send, _, _, r_recv = _pair()
    ct = i_send.encrypt(b"body", ad=b"header")
    with pytest.raises(DecryptError):
        r_recv.decrypt(ct, ad=b"headeR")


def test_nonce_counter_and_encoding():
    key = os.urandom(32)
    cs = CipherState(key)
    assert cs.n == 0
    for expected in range(1, 4):
        cs.encrypt(b"x")
        assert cs.n == expected
    # Nonce = 4 zero bytes then n as 64-bit little-endian (rev 34, 12.3).
    n = 0x0102030405060708
    cs = CipherState(key, n=n)
    nonce = bytes(4) + bytes.fromhex("0807060504030201")
    assert cs.encrypt(b"payload", b"ad") == ChaCha20Poly1305(key).encrypt(nonce, b"payload", b"ad")
    assert cs.n == n + 1
    rx = CipherState(key, n=n)
    rx.decrypt(ChaCha20Poly1305(key).encrypt(nonce, b"p", b""))
    assert rx.n == n + 1


def test_max_nonce_is_reserved():
    tx, rx = CipherState(bytes(32), n=MAX_NONCE - 1), CipherState(bytes(32), n=MAX_NONCE - 1)
    assert rx.decrypt(tx.encrypt(b"last")) == b"last"
    assert tx.n == MAX_NONCE
    with pytest.raises(FastrouteError):
        tx.encrypt(b"one too many")
    with pytest.raises(DecryptError):
        rx.decrypt(bytes(16))


def test_rekey():
    i_send, _, _, r_recv = _pair()
    assert r_recv.decrypt(i_send.encrypt(b"a")) == b"a"
    key_before = i_send._k
    i_send.rekey()
    expected = ChaCha20Poly1305(key_before).encrypt(b"\x00" * 4 + b"\xff" * 8, bytes(32), b"")[:32]
    assert i_send._k == expected and i_send.n == 1
    ct = i_send.encrypt(b"after rekey")
    with pytest.raises(DecryptError):
        r_recv.decrypt(ct)  # peer has not rekeyed yet
    r_recv.rekey()
    assert r_recv.decrypt(ct) == b"after rekey"


def test_encrypt_accepts_buffers_and_limits_size():
    i_send, _, _, r_recv = _pair()
    data = bytearray(b"z" * 4096)
    assert r_recv.decrypt(i_send.encrypt(memoryview(data))) == bytes(data)
    assert r_recv.decrypt(memoryview(i_send.encrypt(data))) == bytes(data)
    with pytest.raises(ProtocolError) as info:
        i_send.encrypt(bytes(MAX_MESSAGE_LEN - 15))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(DecryptError):
        r_recv.decrypt(bytes(MAX_MESSAGE_LEN + 1))
    with pytest.raises(WrongType):
        i_send.encrypt("text")


def test_cipherstate_key_checked():
    with pytest.raises(InvalidArgument):
        CipherState(bytes(16))
    with pytest.raises(WrongType):
        CipherState(None)


# ---------------------------------------------------------------- framing

def test_frame():
    assert frame(b"") == b"\x00\x00"
    assert frame(b"abc") == b"\x00\x03abc"
    big = frame(bytes(MAX_MESSAGE_LEN))
    assert big[:2] == b"\xff\xff" and len(big) == MAX_MESSAGE_LEN + 2
    with pytest.raises(ProtocolError) as info:
        frame(bytes(MAX_MESSAGE_LEN + 1))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_frame_reader_merged_and_zero_length():
    msgs = [b"one", b"", b"three", b"", bytes(MAX_MESSAGE_LEN)]
    reader = FrameReader()
    assert reader.feed(b"".join(frame(m) for m in msgs)) == msgs
    assert reader.buffered == 0


def test_frame_reader_byte_by_byte():
    msgs = [b"a", b"", b"hello" * 50]
    stream = b"".join(frame(m) for m in msgs)
    reader = FrameReader()
    out = []
    for i in range(len(stream)):
        out += reader.feed(stream[i:i + 1])
        assert reader.buffered <= 2 + max(len(m) for m in msgs)
    assert out == msgs and reader.buffered == 0


@pytest.mark.parametrize("seed", range(4))
def test_frame_reader_twins_agree_on_any_cut(seed):
    # the compiled reader (every read of every link) against its specification:
    # the same frames and the same tail after every chunk, whatever the cuts
    # and whatever bytes-like object a chunk comes as
    from fastroute import _compiled, noise

    rng = random.Random(seed)
    sizes = [0, 1, 2, 255, 256, 1000, 65535] + [rng.randrange(3000) for _ in range(30)] * 3
    stream = b"".join(frame(os.urandom(rng.choice(sizes))) for _ in range(60))
    kinds = [bytes, bytearray, memoryview, lambda b: memoryview(bytearray(b))]
    readers = [noise.PyFrameReader()]
    compiled = _compiled.compiled_twin(noise.PyFrameReader)
    if compiled is not None:
        assert noise.FrameReader is compiled
        readers.append(compiled())
    pos, got = 0, [[] for _ in readers]
    while pos < len(stream):
        # small cuts first (headers split, one byte left over), then any
        n = rng.choice([1, 2, 3] if pos < 20000 else [1, 2, 3, 17, 1500, 65536, 200000])
        chunk, pos = stream[pos:pos + n], pos + n
        kind = rng.choice(kinds)
        outs = [r.feed(kind(chunk)) for r in readers]
        assert all(o == outs[0] for o in outs)
        assert all(type(f) is bytes for o in outs for f in o)
        assert len({r.buffered for r in readers}) == 1 and len({repr(r) for r in readers}) == 1
        for g, o in zip(got, outs):
            g += o
    assert all(g == got[0] for g in got)
    assert b"".join(frame(m) for m in got[0]) == stream and readers[0].buffered == 0
    for r in readers:  # not bytes-like: the same exception from both
        with pytest.raises(TypeError):
            r.feed("text")


def test_frame_reader_partial_and_split_header():
    reader = FrameReader()
    assert reader.feed(b"\x00") == []
    assert reader.buffered == 1
    assert reader.feed(b"\x05ab") == []
    assert reader.feed(b"cde\x00") == [b"abcde"]
    assert reader.buffered == 1  # half a header of the next frame
    assert reader.feed(b"\x00") == [b""]
    assert reader.feed(b"") == []


def test_frame_reader_keeps_at_most_one_frame():
    reader = FrameReader()
    # 100 complete frames and the start of one more: only that tail stays.
    chunk = frame(b"x" * 1000) * 100 + frame(b"y" * 5000)[:3000]
    assert len(reader.feed(chunk)) == 100
    assert reader.buffered == 3000
    # A peer announcing the largest frame and sending it slowly is bounded too.
    reader = FrameReader()
    for _ in range(100):
        reader.feed(b"\xff\xff" if reader.buffered == 0 else bytes(1000))
    assert reader.buffered <= MAX_MESSAGE_LEN + 2


def test_frame_reader_returns_independent_bytes():
    data = bytearray(frame(b"abc") + frame(b"de")[:3])
    reader = FrameReader()
    out = reader.feed(memoryview(data))
    data[:] = bytes(len(data))  # the caller reuses its receive buffer
    assert out == [b"abc"]
    assert all(type(m) is bytes for m in out)
    assert reader.feed(b"e") == [b"de"]


@settings(max_examples=150, deadline=None)
@given(msgs=st.lists(st.binary(max_size=300), max_size=20),
       seed=st.integers(0, 2**32 - 1))
def test_frame_reader_any_chunking(msgs, seed):
    stream = b"".join(frame(m) for m in msgs)
    rng = random.Random(seed)
    reader = FrameReader()
    out, pos = [], 0
    while pos < len(stream):
        step = rng.randint(1, 64)
        out += reader.feed(bytearray(stream[pos:pos + step]))
        pos += step
    assert out == msgs
    assert reader.buffered == 0


def test_encrypted_frames_end_to_end():
    i_send, i_recv, r_send, r_recv = _pair()
    sizes = [0, 1, 100, 4096, 60 * 1024, MAX_MESSAGE_LEN - 16]
    stream = b"".join(frame(i_send.encrypt(bytes([s % 251]) * s)) for s in sizes)
    reader = FrameReader()
    got = []
    for k in range(0, len(stream), 7001):
        got += [r_recv.decrypt(m) for m in reader.feed(stream[k:k + 7001])]
    assert got == [bytes([s % 251]) * s for s in sizes]


def test_seal_frames_gives_length_prefixed_ciphertexts_a_peer_can_read():
    from fastroute.noise import seal_frames
    key = bytes(range(32))
    tx, rx = CipherState(key), CipherState(key)
    bufs = seal_frames(tx, [b"", b"a" * 100, b"b" * 65519])
    reader = FrameReader()
    msgs = reader.feed(b"".join(bufs))
    assert [rx.decrypt(m) for m in msgs] == [b"", b"a" * 100, b"b" * 65519]
    assert [len(b) for b in bufs[::2]] == [2, 2, 2]


def _seal_life(seal, make) -> list:
    """A cipher's life through ``seal``: every output, error and nonce after."""
    from fastroute.noise import MAX_NONCE

    key = bytes(range(1, 33))
    out: list = []
    cipher = make(key)
    cases = [[], [b""], [b"x" * 40], [b"a" * 100, b"b" * 7, b""], [b"c" * 65519],
             [bytearray(b"not bytes"), memoryview(b"nor this")], [b"d" * 65520],
             [b"e", "a str"], [b"f" * 3]]
    for plaintexts in cases:
        try:
            out.append(seal(cipher, plaintexts))
        except Exception as exc:
            out.append((type(exc).__name__, str(exc), getattr(exc, "code", None)))
        out.append(cipher.n)
    # at the end of the nonce space: the last usable nonce, then the refusal
    cipher.n = MAX_NONCE - 1
    for plaintexts in ([b"g"], [b"h"]):
        try:
            out.append(seal(cipher, plaintexts))
        except Exception as exc:
            out.append((type(exc).__name__, str(exc)))
        out.append(cipher.n)
    return out


def test_seal_frames_twins_seal_alike():
    # every frame the relay and the client write goes through seal_frames; the
    # compiled one builds the nonce itself for a CipherState: same bytes, same
    # nonces after, same errors (a plaintext too large, of another type, the
    # nonce space spent) as the specification
    from fastroute import _compiled, noise

    want = _seal_life(noise.py_seal_frames, CipherState)
    assert noise.seal_frames is (_compiled.compiled_twin(noise.py_seal_frames)
                                 or noise.py_seal_frames)
    assert _seal_life(noise.seal_frames, CipherState) == want

    class Counting(CipherState):
        __slots__ = ("calls",)

        def __init__(self, key: bytes) -> None:
            super().__init__(key)
            self.calls = 0

        def encrypt(self, plaintext, ad=b""):
            self.calls += 1
            return super().encrypt(plaintext, ad)

    # a subclass's own encrypt is called, as the specification calls it
    assert _seal_life(noise.seal_frames, Counting) == want
    c = Counting(bytes(32))
    noise.seal_frames(c, [b"1", b"2"])
    assert c.calls == 2
