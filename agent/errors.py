"""Errors a user can meet: one clear sentence with a hint, printed without a traceback.

`UserError` is permanent (bad input, missing prerequisite: retrying will not help);
`TransientError` may succeed when retried (a busy map, an API server away).
"""


class UserError(Exception):
    """Something the user can fix; str() is the whole message, hint included."""


class TransientError(Exception):
    """A failure worth retrying with backoff."""
