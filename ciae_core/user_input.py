"""User input in one-line messages: quoted and clipped, and what exactly is wrong with a path.

Error messages echo what the user (or a remote publisher) gave so that the line is actionable,
but never more than :data:`ECHO_LIMIT` characters of it: a 64 KB ``encoding`` string or a path
made of a megabyte of ``a`` must not become a 64 KB log line.

:func:`file_problem` says why a path cannot be read as a file ("does not exist", "is a
directory", "is a character device", "is not readable", "is empty") instead of folding every case
into "not found".
"""

from __future__ import annotations

import os
import stat

#: Characters of user input echoed in a message; longer input is cut and marked with "...".
ECHO_LIMIT = 80


def quote(value, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to about ``limit`` characters: ``'abc...' (65536 characters)``.

    Short values read exactly as ``repr`` (``'rgb8'``, ``5``, ``(1, 2)``); control characters (a
    newline in a topic name) stay escaped, so the result is always one line.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters plus "..." (unquoted; for paths and free text)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


#: Characters of a path echoed in a message (the end is kept: it names the file).
PATH_ECHO_LIMIT = 160


def clip_path(path: str | os.PathLike, limit: int = PATH_ECHO_LIMIT) -> str:
    """A path for a message: whole when short, else "..." and its last ``limit`` characters."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return text if len(text) <= limit else "..." + text[-limit:]


_KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISCHR, "is a character device"),
          (stat.S_ISBLK, "is a block device"), (stat.S_ISFIFO, "is a named pipe"),
          (stat.S_ISSOCK, "is a socket"))


def file_problem(path: str | os.PathLike, allow_empty: bool = False) -> str | None:
    """Why ``path`` cannot be read as a regular file, as a predicate ("does not exist", "is a
    directory", "is a character device" (``/dev/zero``), "is not readable (permission denied)",
    "is empty"), or ``None`` when it can. Symbolic links are followed; a dangling one "does not
    exist (dangling symbolic link)"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist (dangling symbolic link)" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist (a parent is not a directory)"
    except PermissionError:
        return "is not accessible (permission denied on a parent directory)"
    except OSError as exc:  # e.g. ENAMETOOLONG, ELOOP
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    for test, what in _KINDS:
        if test(st.st_mode):
            return what
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "is not readable (permission denied)"
    if st.st_size == 0 and not allow_empty:
        return "is empty"
    return None
