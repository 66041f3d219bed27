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


def cli_failure(prog: str, e: BaseException, *, codes: tuple[tuple[type, int], ...] = ((IbEdgeError, 2),),
                interrupted: str = "interrupted") -> int:
    """What a CLI does with an exception from its work: one line on stderr and the exit code
    (the first matching ``codes`` entry for our errors, 130 for Ctrl-C, 4 for a bug: its
    traceback only with IB_EDGE_DEBUG=1). Anything else (SystemExit) propagates."""
    import os
    import sys

    if isinstance(e, KeyboardInterrupt):
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    for kind, code in codes:
        if isinstance(e, kind):
            print(f"{prog}: error: {e.line()}", file=sys.stderr)
            return code
    if not isinstance(e, Exception) or os.environ.get("IB_EDGE_DEBUG"):
        raise e
    print(f"{prog}: internal error: {type(e).__name__}: {e} (set IB_EDGE_DEBUG=1 for the traceback)", file=sys.stderr)
    return 4
