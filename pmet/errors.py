"""User-facing errors: one line, naming the record and field, never a traceback (the CLI prints them)."""

from __future__ import annotations


class PmetError(Exception):
    """Base class of every error that the CLI reports as a single line and a nonzero exit."""


class RequestError(PmetError):
    """A bad edit request: the message names the file, the record and the field."""

    def __init__(self, source: str, record: int | str | None, field: str | None, problem: str):
        self.source, self.record, self.field, self.problem = source, record, field, problem
        where = source
        if record is not None:
            where += f": record {record}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")


class ModelError(PmetError):
    """A model that cannot be loaded or is not supported."""


class CorpusError(PmetError):
    """A statistics corpus that cannot be read."""


class PatchError(PmetError):
    """A patch that does not fit the model it is applied to, or is malformed."""


class ConfigError(PmetError):
    """A hyper-parameter file or value that is not valid."""
