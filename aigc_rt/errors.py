"""Exceptions raised by aigc_rt."""


class FormatError(ValueError):
    """A weights file or checkpoint that aigc_rt cannot use: the message names the problem."""


def is_foreign_error(e: BaseException) -> bool:
    """An error raised inside a library we parse untrusted files with: a Python exception, or a Rust panic
    (pyo3's PanicException derives from BaseException), but never Ctrl-C or exit."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"
