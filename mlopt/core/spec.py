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


def row_axes(inputs: list[InputSpec] | tuple[InputSpec, ...], batch_name: str) -> dict[str, int | None]:
    """Each input's batch (row) axis: where the dynamic axis ``batch_name`` sits in its shape (axis 1 of a
    recurrent state ``[layers, batch, hidden]``), None for an input without it (a rank-0 sample rate, a
    fixed-shape state): such an input goes whole with every batch. A model without that axis anywhere
    has a fixed batch: axis 0 of the inputs that share the first input's leading dimension."""
    if any(batch_name in i.shape for i in inputs):
        return {i.name: (i.shape.index(batch_name) if batch_name in i.shape else None) for i in inputs}
    lead = next((i.shape[0] for i in inputs if i.shape), None)
    return {i.name: (0 if i.shape and i.shape[0] == lead else None) for i in inputs}


def fixed_batch(inputs: list[InputSpec] | tuple[InputSpec, ...], batch_name: str) -> int | None:
    """The batch size a model without the dynamic axis ``batch_name`` takes (its first input's fixed
    leading dimension; 1 for rank-0 inputs only); None where the batch is dynamic."""
    if any(batch_name in i.shape for i in inputs):
        return None
    lead = next((i.shape[0] for i in inputs if i.shape), 1)
    return lead if isinstance(lead, int) else None
