class KdistillError(Exception):
    """A problem the user can fix (bad input, bad setting, bad file): shown as one line, no traceback."""
