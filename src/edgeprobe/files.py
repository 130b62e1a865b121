"""Writing files that may hold secrets (keys, configs): one way, used by every command that does.

Bottom layer: standard library only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_new_file(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, replace: bool = False) -> None:
    """Write ``data`` to ``path`` as a file this call creates, with exactly ``mode``.

    Without ``replace``, an existing entry (a file, a dangling symlink) raises
    :class:`FileExistsError` and nothing is written: ``O_CREAT | O_EXCL | O_NOFOLLOW`` never writes
    through a link planted at ``path`` nor reuses an existing file's wider mode. With ``replace``,
    the data goes to a new temporary file beside ``path`` that is renamed over it: a symlink at
    ``path`` is replaced, not followed, and a reader never sees a half-written file. The data is
    fsynced before the file takes its name. Other failures raise :class:`OSError`.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(21, "is a directory; give a file name", str(target))
    if replace:
        fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.", suffix=".tmp")
    else:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        tmp = str(target)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; mkstemp made it 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
