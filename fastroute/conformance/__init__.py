"""``fastroute conformance``: prove a relay checks every provider's clients alike,
and grade a vendor's client against ``docs/PROTOCOL.md``.

* :mod:`.relay`: direction 1, one suite run as a home-provider and as a
  third-party client, compared side by side;
* :mod:`.vendor`: direction 2, a test relay with scripted peers that a
  vendor's client connects to;
* :mod:`.framework`: how a check is declared (see ``docs/CONFORMANCE.md``);
* :mod:`.link`: raw protocol links written from the spec.
"""
