"""``python -m gradmap.bench``."""

from gradmap.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
