"""Error codes: stable numbers, one class per code, both ways."""

from __future__ import annotations

import fastroute.errors as E
from fastroute.errors import ErrorCode, FastrouteError, error_for_code


def test_every_code_decodes_to_an_exception_carrying_it():
    for code in ErrorCode:
        exc = error_for_code(int(code), "why")
        assert isinstance(exc, FastrouteError)
        assert exc.code == code
        assert str(exc) == "why"


def test_a_class_that_owns_a_code_is_what_the_code_decodes_to():
    owners = {}
    for name in E.__all__:
        cls = getattr(E, name)
        if isinstance(cls, type) and issubclass(cls, FastrouteError) and "code" in vars(cls):
            owners.setdefault(int(cls.code), cls)
    for code, cls in owners.items():
        if cls in (E.MailboxFull, E.TraceFormatError, E.ConnectionClosed):
            continue  # they carry extra state; their codes decode to the range's class
        assert type(error_for_code(code)) is cls, code


def test_unknown_codes_from_a_newer_relay_keep_their_number():
    exc = error_for_code(499, "new")
    assert isinstance(exc, FastrouteError) and exc.code == 499
    assert isinstance(error_for_code(150), E.ProtocolError)
    assert isinstance(error_for_code(250), E.AuthError)
