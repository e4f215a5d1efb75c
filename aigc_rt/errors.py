"""Exceptions raised by aigc_rt."""


class FormatError(ValueError):
    """A weights file or checkpoint that aigc_rt cannot use: the message names the problem."""
