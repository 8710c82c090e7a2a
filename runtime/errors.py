"""The one exception type for a user's mistake: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input: the message names what was wrong and what would be right."""
