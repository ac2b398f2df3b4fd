"""fastroute.noise against an independent implementation (PyPI ``noiseprotocol``).

The vectors prove we match the spec's byte layout for fixed keys; these tests
prove that live handshakes with random ephemerals, payloads and both roles
agree with someone else's reading of the spec.
"""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag

from fastroute.errors import HandshakeError
from fastroute.noise import PROTOCOL_NAME, HandshakeState, KeyPair

noise_connection = pytest.importorskip("noise.connection")  # test-only dependency
NoiseConnection, Keypair = noise_connection.NoiseConnection, noise_connection.Keypair

PROLOGUE = b"fastroute/1"
# 0 and ~65000 bytes are the edge cases; 65519 is the largest plaintext
# that fits one 65535-byte Noise message.
SIZES = [0, 1, 37, 1000, 4096, 16384, 65000, 65519]


def _theirs(initiator: bool, static: KeyPair, prologue: bytes = PROLOGUE):
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static.private)
    conn.set_prologue(prologue)
    conn.start_handshake()
    # noiseprotocol drops its HandshakeState (and the remote static key it
    # learned) when the handshake ends; keep a reference to read it after.
    return conn, conn.noise_protocol.handshake_state


def _handshake(we_initiate: bool):
    our_static, their_static = KeyPair.generate(), KeyPair.generate()
    ours = HandshakeState(we_initiate, our_static, prologue=PROLOGUE)
    theirs, their_hs = _theirs(not we_initiate, their_static)
    payloads = [b"", b"\x93server hello", b"\x92client hello+credential" * 8]
    for i, payload in enumerate(payloads):
        if (i % 2 == 0) == we_initiate:
            assert bytes(theirs.read_message(ours.write_message(payload))) == payload
        else:
            assert ours.read_message(bytes(theirs.write_message(payload))) == payload
    assert ours.complete and theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    assert ours.remote_static == their_static.public
    assert their_hs.rs.public_bytes == our_static.public
    send, recv = ours.split()
    return send, recv, theirs


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiator", "ours-responder"])
def test_interop_handshake_and_transport(we_initiate):
    send, recv, theirs = _handshake(we_initiate)
    # Interleave directions and sizes so nonces advance unevenly on each side.
    for round_ in range(2):
        for size in SIZES:
            ours_pt = os.urandom(size)
            assert theirs.decrypt(send.encrypt(ours_pt)) == ours_pt
            if (size + round_) % 3 == 0:
                continue  # sometimes only one direction speaks
            their_pt = os.urandom(size)
            assert recv.decrypt(bytes(theirs.encrypt(their_pt))) == their_pt
    assert send.n == 2 * len(SIZES)
    assert 0 < recv.n < send.n


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiator", "ours-responder"])
def test_interop_wrong_prologue_fails(we_initiate):
    ours = HandshakeState(we_initiate, KeyPair.generate(), prologue=PROLOGUE)
    theirs, _ = _theirs(not we_initiate, KeyPair.generate(), prologue=b"fastroute/2")
    if we_initiate:
        theirs.read_message(ours.write_message())
        with pytest.raises(HandshakeError):
            ours.read_message(bytes(theirs.write_message()))
    else:
        ours.read_message(bytes(theirs.write_message()))
        with pytest.raises(InvalidTag):  # noiseprotocol lets cryptography's error through
            theirs.read_message(ours.write_message())
        assert not theirs.handshake_finished


def test_interop_rekey():
    send, recv, theirs = _handshake(True)
    assert theirs.decrypt(send.encrypt(b"before")) == b"before"
    send.rekey()
    theirs.rekey_inbound_cipher()
    assert theirs.decrypt(send.encrypt(b"after")) == b"after"
    theirs.rekey_outbound_cipher()
    recv.rekey()
    assert recv.decrypt(bytes(theirs.encrypt(b"back"))) == b"back"
