"""Domain exceptions. Only the CLI turns them into one-line messages."""


class AutosparseError(Exception):
    """Root of every error autosparse raises on purpose (bad input, missing files)."""


class ModelNotFoundError(AutosparseError):
    """A model id or folder could not be resolved or loaded offline."""


class UnsupportedModelError(AutosparseError):
    """The model family has no adapter: we do not know where its FFN neurons are."""


class ConfigError(AutosparseError):
    """An option value is out of range or inconsistent (keep ratio, layer range, levels)."""


class TaskError(AutosparseError):
    """A task name, task config or metric could not be resolved."""


class StorageError(AutosparseError):
    """A study or result store could not be opened or is inconsistent."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors: a database error's
    driver message (SQLAlchemy keeps it as ``orig``), trailing punctuation dropped; the
    exception's type name when it has no message."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip()
    return text.splitlines()[0].strip().rstrip(" .:") if text else type(inner).__name__
