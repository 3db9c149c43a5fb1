"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""


class UserError(Exception):
    """A problem the user can fix: a bad recipe key, a missing file, a corrupt checkpoint.

    The message must name the offending file, key or value.
    """


class MissingExtraError(UserError):
    """An optional dependency is not installed; the message says which `pip install` fixes it."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed: run `pip install -e '.[{extra}]'` (or `pip install {package}`)")
