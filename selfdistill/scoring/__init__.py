"""Scoring: programmatic verifiers (`verifiers`, with `sandbox` for code answers), model judges
(`judges`: self and teacher, pointwise and pairwise, teacher labels and revisions) and the health
check that decides whether a judge may be trusted (`health`)."""
