"""Fail if a wheel lacks one of unixsrv's compiled extensions, or if one of
them is 1 MB or more (an unstripped build).

Usage: python .ci/wheel_size.py WHEEL...  Prints each extension's size.
"""

from __future__ import annotations

import sys
import zipfile

LIMIT = 1_000_000

#: Every wheel carries these (setup.py): the server core and the load generator.
EXTENSIONS = ("unixsrv/_core.", "unixsrv/_loadgen.")


def main(wheels: list[str]) -> int:
    if not wheels:
        print("wheel_size: no wheels given", file=sys.stderr)
        return 2
    status = 0
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            extensions = [i for i in zf.infolist() if i.filename.endswith((".so", ".pyd"))]
        for prefix in EXTENSIONS:
            if not any(i.filename.startswith(prefix) for i in extensions):
                print(f"{wheel}: no compiled extension {prefix}*", file=sys.stderr)
                status = 1
        for info in extensions:
            verdict = "ok" if info.file_size < LIMIT else "TOO BIG (not stripped?)"
            print(f"{wheel}: {info.filename} {info.file_size:,} bytes {verdict}")
            if info.file_size >= LIMIT:
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
