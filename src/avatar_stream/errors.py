"""The one base of every error avatar-stream raises on purpose.

Each carries a one-line message that says what was wrong and what to do, and keeps the
built-in type it always had (an ``AudioError`` is still a ``ValueError``), so callers can
catch ``AvatarError`` for all of them or the built-in type they already catch.
"""


class AvatarError(Exception):
    """Base class: bad input, a missing file or device, a model that does not fit."""
