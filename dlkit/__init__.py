"""dlkit: train, profile and compress neural networks from the shell.

Importing this package is cheap on purpose (no torch): the CLI's ``--help`` depends on it.
"""

__version__ = "0.1.0"
