"""``python -m dirotq calibrate|quantize|generate|evaluate|report`` (see dirotq/cli.py)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
