"""The one exception type that means "the user asked for something invalid".

Anything raised as :class:`UserError` is printed by ``launch.py`` as a single line
(``error: ...``) with exit code 2 and no traceback. Code everywhere else raises it
for bad input: a wrong rate count, a missing folder, a broken checkpoint.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Invalid input from the user; the message says what is wrong and what is expected."""
