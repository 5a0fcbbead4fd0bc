"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single error line and exit code 2; everything else is a bug
and keeps its traceback.
"""


class SpocoInputError(ValueError):
    """Bad input: a missing path, a wrong dtype or shape, NaN, a foreign checkpoint..."""


class SpocoWarning(UserWarning):
    """Something the user should know but that does not stop the run (an unknown voxel
    size, an input range the normalisation had to guess). The CLI prints it as one
    ``Warning:`` line on stderr."""


def warn(message: str) -> None:
    import warnings
    warnings.warn(message, SpocoWarning, stacklevel=2)
