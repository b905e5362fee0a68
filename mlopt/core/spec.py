"""The strict pydantic bases every document model derives from, and a model input's signature.

``Strict`` models are frozen, with unknown keys refused (recipes, catalogs, configs); ``Record``
models refuse unknown keys but are assembled field by field (the manifest and its parts).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint64", "uint32",
          "uint16", "uint8", "bool")


class Record(BaseModel):
    """A document assembled as a build runs: unknown keys are refused, fields may be set."""

    model_config = ConfigDict(extra="forbid")


class Strict(BaseModel):
    """A frozen document: unknown keys are refused, nothing changes after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(Strict):
    """One model input. A string in ``shape`` names a dynamic axis (for example ``batch``)."""

    name: str = Field(description="Input name, as in the ONNX graph (or the forward() argument order).")
    shape: list[Union[int, str]] = Field(description="Dimensions; ints are fixed, strings name dynamic axes.")
    dtype: Literal[DTYPES] = Field("float32", description="Element type.")  # type: ignore[valid-type]

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int | str]) -> list[int | str]:
        for d in shape:
            if isinstance(d, int) and d <= 0:
                raise ValueError(f"dimension {d} must be positive (use a name such as 'batch' for a dynamic axis)")
            if isinstance(d, str) and not d.isidentifier():
                raise ValueError(f"dynamic axis name {d!r} must be an identifier")
        return shape

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The shape with dynamic axes bound from ``dims``."""
        try:
            return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)
        except KeyError as e:
            raise ValueError(f"input {self.name!r}: no value for dynamic axis {e.args[0]!r}") from None
