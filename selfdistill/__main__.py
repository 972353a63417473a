"""`python -m selfdistill` is the `selfdistill` command."""

from selfdistill.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
