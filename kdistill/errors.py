import re


class KdistillError(Exception):
    """A problem the user can fix (bad input, bad setting, bad file): shown as one line, no traceback."""


# Control characters a terminal acts on (ESC starts colour, title and OSC 8 link sequences; CR
# overwrites a line; C1 codes are their 8-bit forms). Newline and tab are kept: messages use them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text safe for any terminal: undecodable file-name bytes and control characters shown as
    backslash escapes, so a file or class name cannot move the cursor or rewrite what was shown."""
    try:  # an undecodable file-name byte (a surrogate escape) as the byte it was: \xe9, not \udce9
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
