"""Datasets held by the grid server (the ``datasets`` service)."""

from __future__ import annotations

from .services import Service


class DatasetsService(Service):
    prefix = "datasets"

    def __init__(self, server):
        self.server = server
