class LowbitError(Exception):
    """A user-facing error: bad input, named by file or layer. The CLI prints it without a traceback."""
