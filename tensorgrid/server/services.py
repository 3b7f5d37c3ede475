"""What the grid server offers beside Flight SQL, each under its own prefix: actions ``<prefix>.<verb>``,
tickets ``b"<prefix>/..."`` and PATH descriptors ``[<prefix>, ...]`` are routed to the service of that prefix
(``GridServer`` in grid.py does the routing; a service checks its callers' rights with ``auth.require``)."""

from __future__ import annotations


class Service:
    """The base of a grid service: every call not overridden is refused with a clear message."""

    prefix = ""

    def actions(self) -> dict[str, str]:
        """verb -> one line saying what it does (listed by ListActions)."""
        return {}

    def do_action(self, context, verb: str, body: bytes) -> list[bytes]:
        raise _unsupported(self.prefix, f"action {verb!r}")

    def get_flight_info(self, context, descriptor, path: list[str]):
        raise _unsupported(self.prefix, "GetFlightInfo")

    def do_get(self, context, ticket: bytes):
        raise _unsupported(self.prefix, "DoGet")

    def do_put(self, context, descriptor, path: list[str], reader, writer) -> None:
        raise _unsupported(self.prefix, "DoPut")

    def close(self) -> None:
        """Release what the service holds (called once, when the server closes)."""


def _unsupported(prefix: str, what: str):
    import pyarrow.flight as flight

    return flight.FlightServerError(f"the {prefix!r} service does not take {what}")
