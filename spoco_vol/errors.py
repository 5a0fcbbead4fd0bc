"""The exceptions that mean something to the user, and how the CLI shows them.

- ``SpocoInputError``: the user gave us something we cannot use, found before anything
  is written. One ``Error:`` line, exit code 2.
- ``SpocoRunError``: a run stopped partway (a block that kept failing, a full disk,
  SIGTERM or Ctrl-C). Everything it finished is kept in ``partial`` and the same command
  resumes it. One ``Error:`` line, exit code 1 (130 / 143 after SIGINT / SIGTERM).
Everything else is a bug and keeps its traceback.
"""


class SpocoInputError(ValueError):
    """Bad input: a missing path, a wrong dtype or shape, NaN, a foreign checkpoint..."""


class SpocoRunError(RuntimeError):
    """A run that stopped partway; ``partial`` keeps its finished work (None: nothing was
    kept), ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, partial: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.partial = partial
        self.exit_code = exit_code


class SpocoWarning(UserWarning):
    """Something the user should know but that does not stop the run (an unknown voxel
    size, an input range the normalisation had to guess). The CLI prints it as one
    ``Warning:`` line on stderr."""


def warn(message: str) -> None:
    import warnings
    warnings.warn(message, SpocoWarning, stacklevel=2)
