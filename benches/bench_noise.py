"""Noise transport cost: fastroute.noise side by side with PyPI ``noiseprotocol``.

Run (a few seconds)::

    pytest benches/bench_noise.py --benchmark-enable --benchmark-columns=mean,ops

Each group compares the two implementations on the same work: one
encrypt + one decrypt of a frame of the given size (what the relay pays per
frame it receives and forwards), and one complete XX handshake, both sides,
including ephemeral key generation.  Both sit on the same ``cryptography``
primitives, so the difference is the Python around them.
"""

from __future__ import annotations

import os

import pytest

from fastroute.noise import PROLOGUE, PROTOCOL_NAME, HandshakeState, KeyPair

noise_connection = pytest.importorskip("noise.connection")
NoiseConnection, Keypair = noise_connection.NoiseConnection, noise_connection.Keypair

SIZES = {"100B": 100, "4KiB": 4096, "60KiB": 60 * 1024}
IMPLS = ["fastroute", "noiseprotocol"]

STATIC_I, STATIC_R = KeyPair.generate(), KeyPair.generate()


def _ours_handshake():
    ini = HandshakeState(True, STATIC_I, PROLOGUE)
    res = HandshakeState(False, STATIC_R, PROLOGUE)
    res.read_message(ini.write_message())
    ini.read_message(res.write_message(b"server hello"))
    res.read_message(ini.write_message(b"client hello"))
    return ini.split(), res.split()


def _theirs_conn(initiator: bool, static: KeyPair):
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static.private)
    conn.set_prologue(PROLOGUE)
    conn.start_handshake()
    return conn


def _theirs_handshake():
    ini, res = _theirs_conn(True, STATIC_I), _theirs_conn(False, STATIC_R)
    res.read_message(ini.write_message())
    ini.read_message(res.write_message(b"server hello"))
    res.read_message(ini.write_message(b"client hello"))
    return ini, res


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_encrypt_decrypt(benchmark, impl, size):
    benchmark.group = f"noise encrypt+decrypt {size}"
    benchmark.extra_info["bytes"] = SIZES[size]
    plaintext = os.urandom(SIZES[size])
    if impl == "fastroute":
        (send, _), (_, recv) = _ours_handshake()
        encrypt, decrypt = send.encrypt, recv.decrypt
    else:
        ini, res = _theirs_handshake()
        encrypt, decrypt = ini.encrypt, res.decrypt

    def roundtrip():
        return decrypt(encrypt(plaintext))

    assert benchmark(roundtrip) == plaintext


@pytest.mark.parametrize("impl", IMPLS)
def test_handshake(benchmark, impl):
    benchmark.group = "noise XX handshake (both sides)"
    benchmark(_ours_handshake if impl == "fastroute" else _theirs_handshake)
