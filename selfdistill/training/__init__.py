"""Training rounds: LoRA SFT and DPO-family training of the student in a child process.

Importing this package does no work and imports nothing heavy.
"""
