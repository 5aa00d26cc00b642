"""Errors the user can fix: the CLI prints the message (no traceback) and exits non-zero."""


class UserError(Exception):
    """Bad input (config, data, model path): the message names the thing and the fix."""
