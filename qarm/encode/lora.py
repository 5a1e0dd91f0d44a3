"""Low-rank adapters (LoRA, Hu et al. 2021) on the linear layers of a frozen module.

A frozen linear layer ``y = W x + b`` gets a trainable low-rank update::

    y = W x + b + (alpha / r) * B (A dropout(x))        A: (r, in), B: (out, r)

``A`` starts random (Kaiming-uniform, as in the reference implementation and ``peft``), ``B`` starts at
zero, so an adapted layer computes exactly what the pre-trained one computes until the first update
(``B A x`` is an exact zero, and adding zero changes no float). The base weights never train
(``requires_grad`` False); only ``A`` and ``B`` do: ``r (in + out)`` parameters per layer instead of
``in * out``.

:func:`apply_lora` swaps named ``nn.Linear`` children of any module for :class:`LoRALinear`;
:func:`lora_parameters` lists the adapters' parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from qarm.errors import ConfigError
from qarm.quantize._common import check_float, check_int


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update (module docstring).

    Parameters
    ----------
    base : nn.Linear, ``in -> out``; frozen in place (its parameters get ``requires_grad=False``)
    rank : int, ``r >= 1``
    alpha : float > 0, the update is scaled by ``alpha / r``
    dropout : float in [0, 1), dropout on the adapter's input only

    Input ``(..., in)``, output ``(..., out)``.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        check_int("LoRALinear", "rank", rank, 1)
        check_float("LoRALinear", "alpha", alpha, 0.0)
        check_float("LoRALinear", "dropout", dropout, 0.0, 0.99)
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRALinear adapts an nn.Linear, got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: the start is the base layer
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # Code that reads a linear layer's weight (dtype checks, initialisers) finds the base's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_a.t()) @ self.lora_b.t()
        return self.base(x) + update * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """``W + (alpha / r) B A``: the weight of one plain linear layer computing the same map."""
        return self.base.weight + self.scaling * (self.lora_b @ self.lora_a)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(module: nn.Module, paths: Sequence[str], *, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> list[str]:
    """Replace the ``nn.Linear`` at each dotted ``path`` of ``module`` (e.g. ``"attention.self.query"``)
    by a :class:`LoRALinear` around it, in place. Returns the adapted paths.

    Only the replaced layers' base weights are frozen here; freeze the rest of ``module`` first
    (``module.requires_grad_(False)``) when only the adapters should train.
    """
    linear = {name for name, child in module.named_modules() if isinstance(child, nn.Linear)}
    done = []
    for path in paths:
        if path not in linear:
            raise ConfigError(f"{type(module).__name__} has no linear layer {path!r}; its linear layers: "
                              f"{sorted(linear)}")
        parent_path, _, attr = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
        done.append(path)
    return done


def lora_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The adapters' parameters (``lora_a``, ``lora_b`` of every :class:`LoRALinear`) inside ``module``."""
    for child in module.modules():
        if isinstance(child, LoRALinear):
            yield child.lora_a
            yield child.lora_b
