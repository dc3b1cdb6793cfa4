"""``python -m dirotq calibrate|quantize|generate|evaluate|report`` (see dirotq/cli.py)."""

import os
import sys

from .cli import EXIT_INTERRUPTED, main

if __name__ == "__main__":
    code = main()
    if code == EXIT_INTERRUPTED:
        # A Ctrl-C that landed inside code some extension ran through PyRun_* (during an import) leaves
        # CPython's "unhandled KeyboardInterrupt" flag set even though main() handled it, and the
        # interpreter then kills itself with SIGINT at exit (status -2, not 130). Exit directly instead;
        # everything worth keeping was written or renamed into place before the interrupt.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
