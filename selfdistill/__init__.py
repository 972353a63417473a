"""selfdistill: a long-running service that improves a small language model round after round by
knowledge distillation (verifiers, self-judging, teacher feedback), gated by held-out evaluation.

Importing this package does no work: heavy libraries are imported inside the functions that need
them. Run `selfdistill --help` (or `python -m selfdistill --help`) to start.
"""

__version__ = "0.1.0"
