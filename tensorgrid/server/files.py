"""The grid filesystem's server side: files under ``<root>/files`` (the ``files`` service)."""

from __future__ import annotations

from .services import Service


class FilesService(Service):
    prefix = "files"

    def __init__(self, server):
        self.server = server
