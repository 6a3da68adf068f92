class KdistillError(Exception):
    """A problem the user can fix (bad input, bad setting, bad file): shown as one line, no traceback."""


def printable(text: str) -> str:
    """Text safe for any terminal: undecodable file-name bytes shown as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
