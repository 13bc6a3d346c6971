"""One exception class per kind of failure a user can hit.

Every message says what is wrong and what to do; the CLI prints it as one line and exits 2.
"""

import traceback


def summary(exc: BaseException, limit: int = 2000) -> str:
    """An exception as the last `limit` characters of its one-line form (type: message)."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text[-limit:]


class LabError(Exception):
    """Base of every error the lab reports to a user as one line."""


class MissingExtra(LabError):
    def __init__(self, module: str, extra: str):
        super().__init__(
            f"the Python package '{module}' is not installed; install it with "
            f"`pip install -e '.[{extra}]'` (the [{extra}] extra)"
        )
        self.module, self.extra = module, extra


class HarnessNotFound(LabError):
    pass


class HarnessContractError(LabError):
    """A harness folder that does not follow the contract of lab.Harness."""


class LockedFileChanged(LabError):
    """A file of the harness outside its editable surface differs from the lock manifest."""


class PatchRejected(LabError):
    """A candidate patch that the workspace guard refuses (outside the surface, duplicate, not applicable)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"patch rejected: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.detail = reason, detail


class RunFolderError(LabError):
    """A run folder that is missing, locked by a newer lab, or damaged."""


class RunFolderBusy(RunFolderError):
    """Another live process owns the run folder (a loop, a `try --run`, a resume)."""


class BuildFailed(LabError):
    """A tree that does not build where only its build was asked for (a profile): `error` is the
    build's own output. An evaluation records a failed build as its verdict instead."""

    def __init__(self, error: str):
        super().__init__(f"the tree does not build: {error[-800:]}")
        self.error = error


class EnvironmentUnavailable(LabError):
    """The requested evaluation environment (GPU, Docker engine, Nix, API key) is not there."""


class FingerprintMismatch(LabError):
    """Two results from different machines or software would be compared."""


class BundleError(LabError):
    """A bundle that is malformed, truncated, or does not match the local harness."""


class CandidateAborted(LabError):
    """Raised by a harness when a candidate hung or broke the device (a CUDA context lost to an
    illegal address, a kernel past its deadline). The runner records `status` and ends its
    process at once, without interpreter teardown: a wedged GPU must not hold the process."""

    status = "CRASH"
