"""The one exception type the CLI turns into a one-line message (no traceback)."""


class UserError(ValueError):
    """Bad input or configuration that the user can fix; the message says how."""
