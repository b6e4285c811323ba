"""The base of every error a user can fix: bad params, bad data, a missing artefact, a bad URI.

Each part of restorl raises its own subclass with a message that names the culprit (file,
param key, URI); the `restorl` command prints that message and exits with status 2.
"""


class UserError(Exception):
    """A bad input, named in the message; nothing was written."""
