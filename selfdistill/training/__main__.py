"""`python -m selfdistill.training SPEC.json`: run one training round (see run.py)."""

from selfdistill.training.run import main

if __name__ == "__main__":
    raise SystemExit(main())
