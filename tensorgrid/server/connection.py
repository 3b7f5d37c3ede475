"""A Flight client to a grid server with the caller's credentials: shared by ``tg.connect`` (client.py) and
the ``grid://`` filesystem (gridfs.py)."""

from __future__ import annotations

import pyarrow.flight as flight


def open_flight(url: str, username: str | None = None, password: str | None = None, token: str | None = None,
                tls_root_certs: bytes | None = None, cert_chain: bytes | None = None,
                private_key: bytes | None = None, timeout: float | None = None):
    """(FlightClient, FlightCallOptions) for ``url`` (grpc://host:port or grpc+tls://host:port): a bearer
    ``token``, else ``username``/``password`` exchanged once for the server's token (a Handshake), sent with
    every call through the options; client certificates for mutual TLS."""
    kwargs = {}
    if tls_root_certs is not None:
        kwargs["tls_root_certs"] = tls_root_certs
    if cert_chain is not None:
        kwargs["cert_chain"], kwargs["private_key"] = cert_chain, private_key
    client = flight.FlightClient(url, **kwargs)
    headers = []
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    elif username is not None:
        headers.append(client.authenticate_basic_token(username, password or ""))
    return client, flight.FlightCallOptions(headers=headers, timeout=timeout)
