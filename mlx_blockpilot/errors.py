"""The one exception type for bad user input (CLIs print it as one line and exit 2)."""


class BlockPilotError(ValueError):
    """Something the user gave is wrong; the message says what and how to fix it."""
