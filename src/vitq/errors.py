"""User-facing errors.

Every problem a user can cause (bad model name, bad bit width, missing data, corrupt checkpoint)
is raised as a :class:`VitqError` with a one-line message that names the problem. The CLI prints
that line and exits non-zero instead of showing a traceback.
"""


class VitqError(Exception):
    """A problem with the user's input, reported as one readable line."""
