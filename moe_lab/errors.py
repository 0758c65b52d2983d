"""Exception types shared across the kit."""


class InputError(ValueError):
    """Invalid user input: the message names the value and what would be valid."""
