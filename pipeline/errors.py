"""User mistakes, as one exception family.

:class:`CacrError` is the base of every error a USER can cause and fix (a bad config key, an
unreachable bucket, a directory without shards, a file that is not a checkpoint). ``cacr`` prints
such an error as one line, ``cacr: error: ...``, and exits with code 2. Anything else that escapes
a command is our bug and is shown with its full traceback (a ``ValueError`` from deep inside our
code included), so it can be reported and fixed.

Subclasses live next to the code that raises them (``ConfigError`` in pipeline/config.py,
``StorageError`` in pipeline/storage.py, ``DataError`` in pipeline/data/format.py, ...). They also
derive from ``ValueError`` so that callers written against the older classes keep working.
"""
from __future__ import annotations


class CacrError(Exception):
    """A user mistake; the message is one line naming the thing and what to do about it."""
