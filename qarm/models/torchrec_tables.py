"""TorchRec embedding tables behind the ranking models' interface (an optional extra: torchrec + fbgemm-gpu-cpu).

The ID and code tables grow with the users and the catalogue (400M users, 1B items: docs/scale.md); no
single process holds them. TorchRec shards such tables across processes: each table, held in an
``EmbeddingBagCollection``, lives on one rank (table-wise) and the lookups travel by all-to-all.

* :func:`use_torchrec_tables` swaps a built model's big tables, in place and with their weights, for
  :class:`TorchRecTable` modules: the user ID table, the item ID table (:class:`~qarm.models.layers.IdEmbedding`)
  and the VQ code table (:class:`~qarm.models.layers.VQEmbedding`). The model's ``forward(batch) -> logits``
  is unchanged, and in one process its outputs are the plain tables' outputs;
* :func:`shard_tables` wraps such a model in TorchRec's ``DistributedModelParallel`` inside a process
  group (gloo on the CPU): each TorchRec table goes to one rank, the rest of the model is data parallel.
  TorchRec's CPU kernel for sharded tables is the fused one: the tables' optimiser (row-wise Adagrad: fbgemm
  has no Adam on the CPU) runs inside the backward pass; :func:`dense_parameters` are what Adam trains.

Installing it (pip must not replace torch; torchrec's metadata names the CUDA ``fbgemm-gpu``, which
would overwrite the CPU files)::

    pip install -c constraints.txt -e '.[torchrec]'   # fbgemm-gpu-cpu 1.8.0, tensordict, torchmetrics, ...
    pip install --no-deps torchrec==1.9.2             # torch stays 2.13.0

Tested with torch 2.13.0+cpu, torchrec 1.9.2 and 1.8.0, fbgemm-gpu-cpu 1.8.0 (1.9.0 and 1.7.0 do not load
against torch 2.13.0: docs/scale.md). Checkpoints of sharded tables are not written by
:mod:`qarm.train.trainer` (it saves one process's ``state_dict``): training with sharded tables is the
model-level path tested here, not yet a ``qarm train`` option.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from qarm.errors import ConfigError
from qarm.models.layers import IdEmbedding, VQEmbedding

INSTALL_HINT = ("pip install -c constraints.txt -e '.[torchrec]' && pip install --no-deps torchrec==1.9.2 "
                "(docs/scale.md)")


def torchrec_available() -> bool:
    """Whether torchrec and fbgemm_gpu import (the fbgemm libraries load against this torch)."""
    if importlib.util.find_spec("torchrec") is None or importlib.util.find_spec("fbgemm_gpu") is None:
        return False
    try:
        import torchrec  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _require_torchrec() -> None:
    if not torchrec_available():
        raise ConfigError(f"TorchRec tables need torchrec and fbgemm-gpu-cpu, which do not import here; {INSTALL_HINT}")


class TorchRecTable(nn.Module):
    """An embedding table in a TorchRec ``EmbeddingBagCollection``: ``table(ids) -> (*ids.shape, dim)``,
    like ``nn.Embedding`` (every id a bag of one row, sum pooling).

    Parameters
    ----------
    name : the table's (and its feature's) name, unique in the model
    weight : float ``(rows, dim)``, the initial rows (copied)
    """

    def __init__(self, name: str, weight: torch.Tensor) -> None:
        super().__init__()
        _require_torchrec()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        self.name = name
        rows, dim = weight.shape
        self.dim = int(dim)
        self.collection = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=name, embedding_dim=int(dim), num_embeddings=int(rows),
                                       feature_names=[name], pooling=PoolingType.SUM)],
            device=weight.device)
        with torch.no_grad():
            self.collection.embedding_bags[name].weight.copy_(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        flat = ids.reshape(-1)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[self.name], values=flat, lengths=torch.ones_like(flat, dtype=torch.int32))
        pooled = self.collection(features)[self.name]
        return pooled.view(*ids.shape, self.dim)


class TorchRecVQEmbedding(VQEmbedding):
    """:class:`~qarm.models.layers.VQEmbedding` reading its code table from a :class:`TorchRecTable`: the K
    code rows of each item looked up, then their mean (the same weights: missing codes count 0)."""

    table: Any  # a TorchRecTable here

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        flat = items.reshape(-1)
        rows = self.table(self.codes[flat])  # (N, K, dim)
        pooled = (rows * self.mean_weights[flat].unsqueeze(-1)).sum(dim=1)
        return pooled.view(*items.shape, -1)


def use_torchrec_tables(model: nn.Module) -> nn.Module:
    """Move ``model``'s user ID, item ID and VQ code tables into :class:`TorchRecTable` modules, in place,
    keeping their weights; returns the model. A model without such tables is an error naming them."""
    _require_torchrec()
    swapped = []
    user_id = getattr(model, "user_id", None)
    if isinstance(user_id, nn.Embedding):
        model.user_id = TorchRecTable("user_id", user_id.weight.detach())
        swapped.append("user_id")
    item_id = getattr(model, "item_id", None)
    if isinstance(item_id, IdEmbedding):
        item_id.table = TorchRecTable("item_id", item_id.table.weight.detach())  # type: ignore[assignment]
        swapped.append("item_id")
    vq = getattr(model, "vq", None)
    if isinstance(vq, VQEmbedding):
        vq.table = TorchRecTable("vq_code", vq.table.weight.detach())  # type: ignore[assignment]
        vq.__class__ = TorchRecVQEmbedding  # the same buffers; forward reads the TorchRec table
        swapped.append("vq_code")
    if not swapped:
        raise ConfigError(f"{type(model).__name__} has none of the tables TorchRec holds here (user_id, item_id, vq)")
    return model


def shard_tables(model: nn.Module, device: torch.device | None = None, *, lr: float = 0.01) -> nn.Module:
    """``model`` (after :func:`use_torchrec_tables`) in ``DistributedModelParallel``: its TorchRec tables
    sharded table-wise over the process group's ranks, the rest data parallel. Call inside a process group
    (:func:`qarm.distributed.process_group`).

    TorchRec's CPU kernel for sharded tables is the fused one (fbgemm's table-batched embeddings): the
    tables' optimiser runs inside the backward pass and the tables get no ``.grad``. On the CPU fbgemm offers
    SGD and (row-wise) Adagrad, not Adam: the tables use row-wise Adagrad at ``lr``, the embedding
    optimiser of TorchRec's examples. Train the other parameters with an optimiser over :func:`dense_parameters`."""
    _require_torchrec()
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.distributed.types import ShardingType
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    if not dist.is_initialized():
        raise ConfigError("shard_tables runs inside a process group (torchrun, or qarm.distributed.spawn)")
    device = device or torch.device("cpu")
    tables = [m for m in model.modules() if isinstance(m, TorchRecTable)]
    if not tables:
        raise ConfigError("shard_tables: the model holds no TorchRecTable; call use_torchrec_tables(model) first")
    for table in tables:
        apply_optimizer_in_backward(RowWiseAdagrad, table.parameters(), {"lr": lr})
    constraints = {t.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for t in tables}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device=device.type), constraints=constraints)
    sharders: list[Any] = list(get_default_sharders())
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    initial = {t.name: t.collection.embedding_bags[t.name].weight.detach().clone() for t in tables}
    sharded = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    _copy_rows_into_shards(sharded, initial)
    return sharded


def _copy_rows_into_shards(sharded: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """Sharding makes new table storage (fbgemm's, freshly initialised): put the model's rows back, each rank
    writing the block of rows and columns its shards hold (the state dict's shards are views of it)."""
    found = set()
    for key, value in sharded.state_dict().items():
        name = key.rsplit(".", 2)[-2] if key.endswith(".weight") else None
        if name not in initial or not hasattr(value, "local_shards"):
            continue
        found.add(name)
        with torch.no_grad():
            for shard in value.local_shards():
                (row, column), (rows, columns) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(initial[name][row:row + rows, column:column + columns])
    if found != set(initial):
        raise ConfigError(f"sharded tables {sorted(set(initial) - found)} were not found in the sharded state dict")


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a regular optimiser trains: all but the tables whose optimiser runs in the backward pass."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return [p for _, p in in_backward_optimizer_filter(model.named_parameters())]
