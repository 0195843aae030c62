"""remotefit: fit deep-learning models on rented AWS machines, and leave nothing running.

The package is importable without invoke; `tasks.py` only parses flags and calls into it.
Heavy dependencies (boto3, jinja2, hcl2) are imported inside the functions that need them so
that `inv --list` stays fast.
"""

__version__ = "0.1.0"
