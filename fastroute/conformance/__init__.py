"""``fastroute conformance``: prove a relay checks every provider's clients alike,
and grade a vendor's client against ``docs/PROTOCOL.md``.

* :mod:`.relay`: direction 1, one suite run as a home-provider and as a
  third-party client, compared side by side;
* :mod:`.vendor`: direction 2, a test relay with a scripted peer that a
  vendor's client (through its adapter) connects to;
* :mod:`.adapter`: the reference adapter, :class:`fastroute.Client` as the
  echo device the kit expects;
* :mod:`.framework`: how a check or a scenario is declared
  (``docs/CONFORMANCE.md``, "Adding a check");
* :mod:`.link`: raw protocol links written from the spec;
* :mod:`.cli`: the ``fastroute conformance`` verb.
"""
