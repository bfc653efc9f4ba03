"""User-facing errors.

`UserError` is for problems the user can fix (bad file, wrong column, unknown model, out of memory).
The CLI prints its message on one line and exits with code 2; the app shows it in the page.
Anything else is a bug and may crash with a traceback.
"""


class UserError(Exception):
    """An error caused by user input; its message says what to do."""
