"""`python -m raftkv ...` is the `raftkv` command."""
from raftkv.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
