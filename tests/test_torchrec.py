"""TorchRec tables (optional extra): the same model outputs in one process, and tables sharded table-wise over
2 gloo processes that look up, train and keep the data-parallel parameters identical. Skipped without torchrec
(install: qarm/models/torchrec_tables.py's docstring)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qarm.cli import app
from qarm.distributed import rank, spawn, world_size
from qarm.features import ExampleSource
from qarm.models import build_model
from qarm.models.torchrec_tables import torchrec_available
from qarm.train.stage import build_tables
from qarm.train.trainer import loss_fn

pytestmark = [pytest.mark.skipif(not torchrec_available(), reason="torchrec / fbgemm-gpu-cpu not installed"),
              pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("torchrec") / "syn"
    result = CliRunner().invoke(app, ["data", "prepare", "--dataset", "synthetic", "--out", str(out), "--set",
                                      "n_items=400", "--set", "n_users=100", "--set", "n_interactions=5000"])
    assert result.exit_code == 0, result.output
    return out


def test_torchrec_tables_give_the_plain_tables_outputs_in_one_process(data_dir, tmp_path):
    from qarm.models.torchrec_tables import TorchRecTable, use_torchrec_tables
    from qarm.quantize.api import QuantizeConfig, RQConfig, VQConfig, quantize_items

    source = ExampleSource.from_folder(data_dir, history_length=20)
    vectors = np.random.default_rng(0).normal(size=(source.spec.n_items, 8)).astype(np.float32)
    quantize_items(vectors, None, tmp_path / "q", QuantizeConfig(rq=RQConfig(codebook_size=8, levels=2),
                                                                 vq=VQConfig(k=5), write_store=False))
    from qarm.features import ItemTables

    tables = ItemTables.build(source, quantize_dir=tmp_path / "q", vectors={"pretrained": vectors, "aligned": vectors})
    model = build_model("qarm", source.spec, tables, seed=0)
    batch = source.batch(source.rows("train")[:128])
    expected = model(batch)
    swapped = use_torchrec_tables(copy.deepcopy(model))
    assert sorted(m.name for m in swapped.modules() if isinstance(m, TorchRecTable)) == ["item_id", "user_id",
                                                                                          "vq_code"]
    torch.testing.assert_close(swapped(batch), expected, rtol=1e-6, atol=1e-6)


def shard_and_train(data_dir: Path, out: Path) -> None:
    """In each of 2 ranks: shard the ID tables table-wise, check the lookups, take 3 steps, save the dense
    parameters and where each table lives."""
    from qarm.models.torchrec_tables import dense_parameters, shard_tables, use_torchrec_tables

    source = ExampleSource.from_folder(data_dir, history_length=20)
    plain = build_model("id_only", source.spec, build_tables(source, data_dir, "id_only"), seed=0)
    sharded = shard_tables(use_torchrec_tables(copy.deepcopy(plain)))
    rows = source.rows("train")[:256]
    share = source.batch(rows[rank()::world_size()])
    torch.testing.assert_close(sharded(share), plain(share), rtol=1e-6, atol=1e-6)
    optimizer = torch.optim.Adam(dense_parameters(sharded), lr=1e-3)
    losses = []
    for step in range(3):
        batch = source.batch(rows[step * 64:(step + 1) * 64][rank()::world_size()])
        loss = loss_fn(sharded(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    held = {key.rsplit(".", 2)[-2]: sum(s.tensor.shape[0] for s in value.local_shards())
            for key, value in sharded.state_dict().items() if hasattr(value, "local_shards")}
    dense = {name: p.detach().clone() for name, p in sharded.named_parameters()
             if any(p is q for q in dense_parameters(sharded))}
    torch.save({"losses": losses, "held": held, "dense": dense}, out / f"rank{rank()}.pt")


def test_two_ranks_shard_the_tables_table_wise_and_train(data_dir, tmp_path):
    spawn(2, shard_and_train, data_dir, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        assert all(np.isfinite(result["losses"]))
    # Table-wise: each table's rows all on one rank, and the two tables on different ranks.
    assert set(ranks[0]["held"]) == set(ranks[1]["held"]) == {"item_id", "user_id"}
    for name in ("item_id", "user_id"):
        assert sorted(r["held"][name] > 0 for r in ranks) == [False, True], name
    # The data-parallel rest: identical on both ranks after the steps.
    assert ranks[0]["dense"].keys() == ranks[1]["dense"].keys() and ranks[0]["dense"]
    for name, value in ranks[0]["dense"].items():
        assert torch.equal(value, ranks[1]["dense"][name]), name
