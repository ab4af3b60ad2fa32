"""The ``ftaas`` command line: HTTP only, so importing it needs neither Redis nor torch."""

from app.cli.commands import app, main

__all__ = ["app", "main"]
