"""Typed errors. Library code raises these; only the CLIs turn them into one line + exit code."""


class IbEdgeError(Exception):
    """Base: a problem the user can fix. ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None):
        self.hint = hint
        super().__init__(message)

    def line(self) -> str:
        return f"{self}" + (f" ({self.hint})" if self.hint else "")


class InputError(IbEdgeError):
    """Bad image or prompt."""


class BundleError(IbEdgeError):
    """Missing, corrupt or mismatched deploy bundle."""
