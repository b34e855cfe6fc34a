"""Errors the user can fix. The CLI prints them without a traceback and exits with code 2; a run stopped by a
signal exits with ``STOPPED_EXIT_CODE``."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the recipe, the data or the environment, explained in words."""


class DataError(UserError):
    """A malformed record: names the file, the line (or row) and the field."""

    def __init__(self, path: str, location: str | None, field: str | None, message: str):
        self.path, self.location, self.field, self.message = path, location, field, message
        where = path if location is None else f"{path}, {location}"
        self.detail = (f"field {field!r}: " if field else "") + message  # without the file and the line
        super().__init__(f"{where}: {self.detail}")

    def __reduce__(self):  # crosses from tokenizing worker processes intact
        return DataError, (self.path, self.location, self.field, self.message)


STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure; run the same command again to continue


class Stopped(Exception):
    """The run stopped early on SIGTERM / SIGINT, after writing a checkpoint to resume from."""

    exit_code = STOPPED_EXIT_CODE
