"""Errors the user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (file, dataset, address, ...): one line, names the field/file/row, exit 2."""
