"""The numbered SQL migrations of devsched's PostgreSQL tables, shipped as package data.

Each ``NNN_name.sql`` file in this folder is one migration; ``pipeline.migrate``
applies them once each, in number order. ``migrations()`` hands the folder over
through ``importlib.resources``, so an installed package (a wheel, not only a
source checkout) migrates the same tables.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def migrations() -> Traversable:
    """The folder of the numbered migration files."""
    return files(__name__)
