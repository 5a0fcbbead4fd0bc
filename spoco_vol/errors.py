"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single error line and exit code 2; everything else is a bug
and keeps its traceback.
"""


class SpocoInputError(ValueError):
    """Bad input: a missing path, a wrong dtype or shape, NaN, a foreign checkpoint..."""
