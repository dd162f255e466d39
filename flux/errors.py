"""The one base of every error meant for the user.

A :class:`UserError` is caused by what the user gave (a file, a flag, a setting, a photo), not by
a bug: its message says what to change, and every front door shows it as it is, without a
traceback. Each concrete error also keeps the builtin base callers may expect (``ValueError``,
``FileNotFoundError``...). It lives in ``flux``, the lowest layer, so that every layer's errors
share it; ``pulid.errors`` and ``pulid.serve`` build on it.
"""


class UserError(Exception):
    """An error whose message is for the user, as it is."""
