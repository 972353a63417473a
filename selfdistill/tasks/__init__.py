"""Tasks: where they come from (`sources`), new ones written by a model (`expansion`), and which
to train on next (`curriculum`). The held-out split is `selfdistill.records.split_for`, applied by
the store when a task enters it."""
