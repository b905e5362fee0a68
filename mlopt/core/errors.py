"""One exception hierarchy. Domain code raises these; only ``mlopt.cli`` turns them into exit codes.

Exit codes (documented in the README and ``mlopt --help``):
  0 ok, 1 other failure, 2 bad input, 3 accuracy or validation failure,
  4 backend or toolchain unavailable, 5 container registry or base image failure,
  6 a CI gate against the baseline failed, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations


class MloptError(Exception):
    """Base of every error mlopt reports to a user. ``hint`` says what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class BadInput(MloptError):
    """The user's input is wrong: a recipe, a model file, a signature, a name."""

    exit_code = 2


class RecipeError(BadInput):
    """A recipe or flag failed validation."""


class ModelLoadError(BadInput):
    """A model file is missing, corrupt or does not match its declared signature."""


class UnknownName(BadInput):
    """A SKU, pass, backend or artifact that does not exist."""


class StoreError(BadInput):
    """The artifact store cannot be used (not writable, corrupt index, digest mismatch)."""


def disk_full(e: OSError) -> StoreError:
    """A StoreError for ENOSPC naming the path written and the space left on its file system."""
    import shutil
    from pathlib import Path

    path = Path(e.filename or ".")
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    return StoreError(f"no space left on the device writing {path} ({free / 2**20:.0f} MiB free there)",
                      hint="free some space (`mlopt artifacts gc` removes unreferenced objects) or use another --store")


class AccuracyError(MloptError):
    """A result broke the accuracy budget or failed numeric validation."""

    exit_code = 3


class ValidationMismatch(AccuracyError):
    """A lowered model's outputs differ from the reference beyond the backend's tolerance."""

    def __init__(self, output: str, max_abs_diff: float, atol: float, rtol: float, where: str, note: str = ""):
        super().__init__(
            f"{where}: output {output!r} differs from the reference by {max_abs_diff:.3g} "
            f"(tolerance atol={atol:g}, rtol={rtol:g}{note})",
            hint="run with --debug to see the failing comparison; report the model and backend",
        )
        self.output = output
        self.max_abs_diff = max_abs_diff
        self.atol, self.rtol = atol, rtol


class BudgetExceeded(AccuracyError):
    """A pass cost more accuracy than the recipe allows."""


class BackendUnavailable(MloptError):
    """A backend, toolchain or device needed for a build is missing, or cannot lower the model."""

    exit_code = 4


class UnsupportedOperator(BackendUnavailable):
    """A backend cannot lower an operator of the model."""


class ModelImportFailed(UnsupportedOperator):
    """A backend's frontend cannot import the model (its graph with the recipe's shapes): the same failure
    on every SKU of that backend, so a build reports it once for the model, not once per SKU."""


class UnsupportedType(BackendUnavailable):
    """A model's input or output has a type mlopt or a backend cannot take (a string, float8 or 4-bit
    tensor, a sequence, an optional)."""


class RegistryError(MloptError):
    """A container registry cannot be used: unreachable, credentials refused, an image (a base
    image, say) that does not exist there, or an upload it rejected."""

    exit_code = 5


class GateFailed(MloptError):
    """A CI gate against the baseline manifest failed: latency regression, accuracy drop or size growth
    over its limit."""

    exit_code = 6


def severest(codes: list[int]) -> int:
    """The exit code of several results: an accuracy failure first (a build that runs but answers
    wrongly matters most), then the highest code; 0 when all passed."""
    return max(codes, key=lambda c: (c == AccuracyError.exit_code, c), default=0)


EXIT_CODES = {
    0: "success",
    1: "other failure",
    2: "bad input (recipe, model file, signature, data source or metric, unknown name, unusable store or full disk)",
    3: "accuracy budget broken or numeric validation failed",
    4: "backend, toolchain or device unavailable",
    5: "container registry or base image failure (unreachable, credentials refused, image missing, upload rejected)",
    6: "a CI gate against the baseline failed (latency regression, accuracy drop or size growth over its limit)",
    130: "interrupted (Ctrl-C)",
}
