"""Errors that the CLI turns into a clear message and a non-zero exit."""


class InputError(ValueError):
    """Bad user input: a data file, a recipe, a model path. The message names the
    file and, where there is one, the line or row."""
