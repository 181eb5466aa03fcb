"""Pipeline-parallel building blocks for models: what crosses a stage boundary, and a placeholder for
modules another stage owns. No communication here: the model runner moves ``IntermediateTensors``
between stages (``GroupCoordinator.send_tensors``/``recv_tensors`` with ``to_dict``/``from_dict``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class IntermediateTensors:
    """The decoder stream between two pipeline stages: the hidden states after this stage's last layer
    and the residual they have not yet been added to (the next layer's input norm adds them)."""

    hidden: torch.Tensor  # (num_tokens, hidden_size)
    residual: torch.Tensor  # (num_tokens, hidden_size)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Named tensors for ``GroupCoordinator.send_tensors``."""
        return {"hidden": self.hidden, "residual": self.residual}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> IntermediateTensors:
        """Inverse of ``to_dict`` (what ``recv_tensors`` returns). Raises KeyError if a tensor is missing."""
        return cls(hidden=tensors["hidden"], residual=tensors["residual"])


class PPMissingLayer(nn.Module):
    """Stands where another pipeline stage owns a module (a decoder layer, the embedding, the final norm,
    the LM head), so module indices and checkpoint names still line up. It has no parameters; calling it
    is a bug in the stage logic and raises."""

    def __init__(self, what: str = "module"):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} is owned by another pipeline stage and was not built here")

    def extra_repr(self) -> str:
        return self.what
