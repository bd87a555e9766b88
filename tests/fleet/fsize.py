"""``python -m tests.fleet.fsize <bytes> -- <command ...>``: run a command with RLIMIT_FSIZE set, so no file
it writes can grow past <bytes> (writes beyond fail with EFBIG; Python ignores SIGXFSZ). A stand-in for a full
disk where no tmpfs can be mounted."""
from __future__ import annotations

import os
import resource
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tests.fleet.fsize <bytes> -- <command ...>", file=sys.stderr)
        return 2
    limit = int(argv[0])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    os.execvp(argv[2], argv[2:])
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
