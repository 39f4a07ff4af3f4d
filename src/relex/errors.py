"""One exception type for bad input: the CLI prints its message on one line and exits with code 2."""


class RelexError(Exception):
    """Bad input or a refused operation, with a message that names the file and tensor at fault."""
