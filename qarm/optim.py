"""Adam for models whose large embedding tables train sparsely.

Dense Adam updates every row of every table at every step. With a catalogue of a million items, the item
ID and VQ code tables alone are tens of millions of parameters, most of them untouched by any one batch:
reading and writing them (weights, gradients and two moments) dominates the step. A table built with
``sparse=True`` instead receives a sparse gradient (the rows its batch read) and trains with
``torch.optim.SparseAdam``: lazy Adam, where a row's moments move only in the steps that read it (as
TensorFlow's LazyAdam and TorchRec's fused row-wise optimisers do). Everything else keeps Adam.

``SPARSE_ROWS`` is the size rule both User2Item and the ranking models use: a table with more rows trains
sparsely unless its config says otherwise. Every catalogue published in RESULTS.md is smaller, so their
numbers are those of dense Adam.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qarm.errors import ConfigError

SPARSE_ROWS = 262_144  # embedding-table rows above which a table trains sparsely by default


def wants_sparse(rows: int, sparse: bool | None) -> bool:
    """Whether a table of ``rows`` rows gets sparse gradients: ``sparse`` if given, else the size rule."""
    return bool(sparse) if sparse is not None else rows > SPARSE_ROWS


def sparse_tables(module: nn.Module) -> list[torch.Tensor]:
    """The weights of ``module``'s embedding tables built with ``sparse=True`` (they get sparse gradients)."""
    return [m.weight for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]


class SparseAndDenseAdam:
    """SparseAdam over the sparse tables and Adam over every other parameter, stepped together.

    It behaves as one optimiser for the trainer: ``zero_grad``, ``step``, ``param_groups`` (the dense
    optimiser's groups, then the sparse one's) and a ``state_dict`` in ``torch.optim``'s own format, the
    parameters numbered across both parts, so a checkpoint holds one optimiser state as before.
    """

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        self.parts = (dense, sparse)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for part in self.parts:
            own = part.state_dict()
            state |= {offset + int(pid): entries for pid, entries in own["state"].items()}
            groups += [{**g, "params": [offset + int(p) for p in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups, state = list(state_dict["param_groups"]), state_dict["state"]
        offset = 0
        for part in self.parts:
            n_groups, n_params = len(part.param_groups), sum(len(g["params"]) for g in part.param_groups)
            own = groups[:n_groups]
            groups = groups[n_groups:]
            if sum(len(g["params"]) for g in own) != n_params:
                raise ConfigError("the optimiser state does not match the model's sparse and dense parameters "
                                  "(written with another sparse_tables setting?)")
            part.load_state_dict({
                "state": {int(pid) - offset: _python_step(v) if isinstance(part, torch.optim.SparseAdam) else v
                          for pid, v in state.items() if offset <= int(pid) < offset + n_params},
                "param_groups": [{**g, "params": [int(p) - offset for p in g["params"]]} for g in own],
            })
            offset += n_params


def _python_step(entries: dict[str, Any]) -> dict[str, Any]:
    """SparseAdam keeps its step count as a Python int (a checkpoint may hold it as a tensor): as an int,
    its bias corrections are computed in float64 as in the uninterrupted run, not in float32."""
    step = entries.get("step")
    return {**entries, "step": int(step)} if torch.is_tensor(step) else entries


def make_adam(module: nn.Module, lr: float, weight_decay: float = 0.0,
              fused: bool = False) -> torch.optim.Optimizer | SparseAndDenseAdam:
    """Adam over ``module``'s parameters; with sparse tables (:func:`sparse_tables`), SparseAdam for those.

    ``fused`` asks for the fused Adam kernel (dense part). SparseAdam has no weight decay: a model with
    sparse tables and ``weight_decay > 0`` is a configuration error.
    """
    tables = sparse_tables(module)
    if not tables:
        return torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)
    if weight_decay:
        raise ConfigError(f"weight_decay={weight_decay!r} but the model has sparse embedding tables (more than "
                          f"{SPARSE_ROWS:,} rows, or sparse tables asked for): SparseAdam has no weight decay; "
                          "set weight_decay to 0 or build the model with sparse tables off")
    ids = {id(t) for t in tables}
    dense = [p for p in module.parameters() if id(p) not in ids]
    return SparseAndDenseAdam(torch.optim.Adam(dense, lr=lr, fused=fused or None),
                              torch.optim.SparseAdam(tables, lr=lr))
