"""Read a data file as UTF-8 text, turning a decoding failure into a located DataError."""

from __future__ import annotations

from pathlib import Path

from hsplitlora.data.example import DataError

__all__ = ["read_utf8"]


def read_utf8(path: Path) -> str:
    """Return the file's text, without a byte-order mark if an editor added one.

    The whole file is decoded at once (data files here are a few MB) so that a bad byte can be
    reported by line number, which a streaming decoder cannot do.
    """
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        bad = raw[err.start : err.end]
        raise DataError(
            f"{path}:{line}: bytes {bad!r} are not valid UTF-8. Re-save the file as UTF-8 "
            "(for example `iconv -f latin1 -t utf-8 in.csv > out.csv`)."
        ) from err
