"""Exceptions of rmt_kernels (the lowest layer: imports nothing of the package)."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and how to get it."""
