"""Ranking models and their layers: shapes, masking, code matching, OOV, each model's forward/backward."""

from __future__ import annotations

import re
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from qarm.data.prepare import prepare_dataset
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.errors import ConfigError
from qarm.features import OOV, ExampleSource, ItemTables
from qarm.features.batch import RankingBatch
from qarm.models import MODELS, QARMConfig, build_model, describe_model, model_config
from qarm.models.layers import (
    MLP,
    CodeMatchingSequences,
    IdEmbedding,
    MMoE,
    MMoEConfig,
    RQEmbedding,
    SparseBlocks,
    TargetAttention,
    VQEmbedding,
    bag_sum,
    embed_unique,
    embedding_table,
    gather_rows,
    linear_with_blocks,
    pack,
)
from qarm.quantize.api import QuantizeConfig, RQConfig, VQConfig, quantize_items

BATCH_FIELDS = [f.name for f in fields(RankingBatch)]

pytestmark = pytest.mark.filterwarnings("ignore:k-means of")  # tiny catalogues: few points per centroid


@pytest.fixture(scope="module")
def source() -> ExampleSource:
    return ExampleSource(prepare_dataset(generate(SyntheticConfig(n_items=300, n_users=150, n_interactions=6000))),
                         history_length=20)


@pytest.fixture(scope="module")
def tables(source, tmp_path_factory) -> ItemTables:
    vectors = np.random.default_rng(0).normal(size=(source.spec.n_items, 16)).astype(np.float32)
    out = tmp_path_factory.mktemp("codes") / "quantize"
    quantize_items(vectors, None, out, QuantizeConfig(rq=RQConfig(codebook_size=4, levels=3), vq=VQConfig(k=5),
                                                      write_store=False))
    return ItemTables.build(source, quantize_dir=out, vectors={"pretrained": vectors, "aligned": vectors[:, ::-1]})


# -- layers ----------------------------------------------------------------------------------------


def test_mmoe_gives_one_logit_per_task():
    head = MMoE(24, n_tasks=3, config=MMoEConfig(n_experts=5, expert_hidden=(16, 8), tower_hidden=(4,)))
    out = head(torch.randn(7, 24))
    assert out.shape == (7, 3)
    assert head.n_experts == 5 and len(head.towers) == 3
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("hidden", [(16,), (16, 8)])
def test_fused_mmoe_equals_separate_experts_from_the_same_seed(hidden):
    """The fused experts start from the very weights E separate expert MLPs would have, and compute the
    same function: the reference below is MMoE written expert by expert."""
    config = MMoEConfig(n_experts=3, expert_hidden=hidden, tower_hidden=(4,))
    torch.manual_seed(7)
    experts = [MLP(24, hidden) for _ in range(3)]
    gates = torch.nn.Linear(24, 2 * 3)
    towers = [MLP(hidden[-1], (4,), out_dim=1) for _ in range(2)]
    torch.manual_seed(7)
    head = MMoE(24, n_tasks=2, config=config)
    x = torch.randn(9, 24)
    stacked = torch.stack([e(x) for e in experts], dim=1)  # (B, E, H)
    mix = torch.bmm(gates(x).view(-1, 2, 3).softmax(dim=-1), stacked)
    reference = torch.cat([t(mix[:, i]) for i, t in enumerate(towers)], dim=1)
    torch.testing.assert_close(head(x), reference, rtol=1e-5, atol=1e-6)


def test_mlp_out_features():
    assert MLP(10, (8, 4), out_dim=1).out_features == 1
    assert MLP(10, (8, 4)).out_features == 4


def test_target_attention_pools_only_the_rows_slots():
    torch.manual_seed(0)
    att = TargetAttention(4, (6, 3))
    query, keys = torch.randn(3, 4), torch.randn(5, 4)
    row = torch.tensor([0, 0, 0, 2, 2])  # row 1 has no slot
    out = att(query, keys, row)
    assert out.shape == (3, 4)
    assert torch.equal(out[1], torch.zeros(4))
    # the same as DIN's concatenated input [h, t, h - t, h * t] with an equivalent first layer
    w_h, w_t, w_p = att.key.weight, att.query.weight, att.product.weight
    for r in (0, 2):
        h = keys[row == r]
        t = query[r].expand_as(h)
        hidden = torch.relu(torch.cat([h, t, h - t, h * t], 1) @ torch.cat([w_h, w_t, torch.zeros_like(w_h), w_p], 1).T
                            + att.key.bias)
        weight = att.score(hidden)
        torch.testing.assert_close(out[r], (weight * h).sum(0))


def test_qarm_scores_a_shared_history_as_separate_requests_do(source, tables):
    """A ranking request (many candidates, one history) scores each candidate as a batch of one does: the
    batch's composition (distinct items, packing) never changes a score."""
    model = build_model("qarm", source.spec, tables, None).eval()
    test_rows = source.order("test")
    filled = source.batch(test_rows).history_mask.sum(1)
    row = test_rows[int(filled.argmax())]  # the longest history
    assert filled.max() >= 5
    batch = source.batch(np.repeat([row], 64))
    candidates = torch.arange(64) % source.spec.n_items
    batch = replace(batch, item=candidates)
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(replace(batch, **{f: getattr(batch, f)[i:i + 1] if getattr(batch, f) is not None
                                                   else None for f in BATCH_FIELDS})) for i in range(64)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_pack_layout():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    assert pack(mask).tolist() == [0, 0, 2]


def test_code_matching_hand_case():
    target = torch.tensor([[1, 2, 3], [5, 5, 5]])
    # row 0's history, most recent first: full match, level-1 match, level-2 match, no match, level-1 match;
    # row 1: one full match (its counts must not mix with row 0's)
    history = torch.tensor([[1, 2, 3], [1, 0, 3], [1, 2, 0], [0, 2, 3], [1, 9, 9], [5, 5, 5]])
    row = torch.tensor([0, 0, 0, 0, 0, 1])
    slot, level = CodeMatchingSequences.matches(target, history, row, length=2)
    chosen = {(int(lv), int(sl)) for sl, lv in zip(slot, level)}
    # level 1 (index 0): slots 0, 1, 2, 4 match; the latest two (0, 1) are kept
    assert {s for lv, s in chosen if lv == 0} == {0, 1, 5}
    assert {s for lv, s in chosen if lv == 1} == {0, 2, 5}
    assert {s for lv, s in chosen if lv == 2} == {0, 5}


def test_code_matching_pools_the_matched_items():
    torch.manual_seed(0)
    layer = CodeMatchingSequences(dim=3, length=4, attention_hidden=(5,))
    target, history = torch.randn(2, 3), torch.randn(3, 3)
    row = torch.tensor([0, 0, 0])  # row 1 has no history
    codes_t = torch.tensor([[1, 1], [1, 1]])
    codes_h = torch.tensor([[1, 1], [1, 0], [0, 1]])
    out = layer(target, history, row, codes_t, codes_h)
    assert out.shape == (2, 2, 3)
    level1 = layer.attention(target[:1], history[[0, 1]], torch.tensor([0, 0]))
    level2 = layer.attention(target[:1], history[[0]], torch.tensor([0]))
    torch.testing.assert_close(out[0, 0], level1[0])
    torch.testing.assert_close(out[0, 1], level2[0])
    assert torch.equal(out[1], torch.zeros(2, 3))


def test_code_matching_blocks_hold_only_the_non_empty_sequences():
    torch.manual_seed(0)
    layer = CodeMatchingSequences(dim=3, length=4, attention_hidden=(5,))
    target, history = torch.randn(3, 3), torch.randn(4, 3)
    row = torch.tensor([0, 0, 2, 2])  # row 1 has no history
    codes_t = torch.tensor([[1, 1], [1, 1], [2, 0]])
    codes_h = torch.tensor([[1, 1], [0, 1], [2, 1], [3, 0]])
    blocks = layer.pooled_blocks(target, history, row, codes_t, codes_h, start=7)
    # (row 0, level 0), (row 0, level 1) and (row 2, level 0) are filled; nothing else.
    assert sorted(zip(blocks.row.tolist(), blocks.block.tolist())) == [(0, 0), (0, 1), (2, 0)]
    assert (blocks.start, blocks.width, blocks.n_blocks, blocks.stop) == (7, 3, 2, 13)
    torch.testing.assert_close(blocks.to_dense(3).view(3, 2, 3), layer(target, history, row, codes_t, codes_h))


@pytest.mark.parametrize("start, bias", [(0, True), (3, True), (5, False), (11, True)])
def test_linear_with_blocks_equals_the_dense_layer_on_the_assembled_input(start, bias):
    """Forward and every gradient (weight, bias, dense columns, block values) against ``nn.Linear`` on the
    dense input with the blocks written in, zeros elsewhere; blocks at the front, middle and end."""
    torch.manual_seed(0)
    width, n_blocks, n_rows = 2, 3, 5
    in_dim = 11 + n_blocks * width
    layer = torch.nn.Linear(in_dim, 4, bias=bias).double()
    dense = torch.randn(n_rows, in_dim - n_blocks * width, dtype=torch.float64, requires_grad=True)
    row, block = torch.tensor([0, 0, 3, 4, 4]), torch.tensor([2, 0, 1, 1, 2])
    values = torch.randn(5, width, dtype=torch.float64, requires_grad=True)
    blocks = SparseBlocks(start=start, width=width, n_blocks=n_blocks, row=row, block=block, values=values)
    upstream = torch.randn(n_rows, 4, dtype=torch.float64)
    (linear_with_blocks(layer.weight, layer.bias, dense, blocks) * upstream).sum().backward()
    got = [layer.weight.grad.clone(), dense.grad.clone(), values.grad.clone()]
    got += [layer.bias.grad.clone()] if bias else []
    for t in [layer.weight, dense, values] + ([layer.bias] if bias else []):
        t.grad = None
    full = torch.cat([dense[:, :start], blocks.to_dense(n_rows), dense[:, start:]], dim=1)
    assert full[1, start:start + n_blocks * width].abs().sum() == 0  # row 1 has no entry
    torch.testing.assert_close(linear_with_blocks(layer.weight, layer.bias, dense, blocks), layer(full))
    (layer(full) * upstream).sum().backward()
    want = [layer.weight.grad, dense.grad, values.grad] + ([layer.bias.grad] if bias else [])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_linear_with_blocks_gradcheck():
    torch.manual_seed(1)
    weight = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    dense = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    row, block = torch.tensor([1, 1, 3]), torch.tensor([0, 1, 1])

    def f(w: torch.Tensor, b: torch.Tensor, d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return linear_with_blocks(w, b, d, SparseBlocks(start=2, width=2, n_blocks=2, row=row, block=block, values=v))

    assert torch.autograd.gradcheck(f, (weight, bias, dense, values))


def test_mmoe_with_blocks_equals_mmoe_on_the_dense_input():
    torch.manual_seed(0)
    head = MMoE(10, 2, MMoEConfig(n_experts=3, expert_hidden=(6, 5), tower_hidden=(4,)))
    dense = torch.randn(6, 6)
    blocks = SparseBlocks(start=4, width=2, n_blocks=2, row=torch.tensor([1, 5]), block=torch.tensor([1, 0]),
                          values=torch.randn(2, 2))
    full = torch.cat([dense[:, :4], blocks.to_dense(6), dense[:, 4:]], dim=1)
    torch.testing.assert_close(head(dense, blocks), head(full))


def test_gather_rows_equals_advanced_indexing():
    table = torch.randn(7, 3, requires_grad=True)
    index = torch.tensor([[6, 0], [0, 2]])
    out = gather_rows(table, index)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out, table[index])
    out.sum().backward()
    assert table.grad is not None and table.grad[0].tolist() == [2.0, 2.0, 2.0] and table.grad[1].abs().sum() == 0


def test_id_embedding_maps_oov_items_to_row_zero():
    emb = IdEmbedding(np.array([1, 0, 2, 0]), 4)
    assert emb.table.num_embeddings == 3
    torch.testing.assert_close(emb(torch.tensor([1, 3])), emb.table.weight[[0, 0]])


def test_vq_embedding_takes_the_first_k_codes_and_skips_missing_ones():
    codes = np.array([[2, 3, 1], [0, -1, 3]])
    emb = VQEmbedding(codes, n_catalogue=4, dim=5, k=2)
    w = emb.table.weight
    out = emb(torch.tensor([0, 1]))
    torch.testing.assert_close(out[0], (w[2] + w[3]) / 2)
    torch.testing.assert_close(out[1], w[0])  # the missing neighbour is left out of the mean
    with pytest.raises(ConfigError, match=r"vq_k must be in 1..3"):
        VQEmbedding(codes, 4, 5, k=4)


@pytest.mark.parametrize("rows", [30, 32_768, 40_000])  # the backward sorts int16 keys up to 32,768 rows, int32 past
def test_bag_sum_forward_and_gradient_equal_a_gather_and_sum(rows):
    """The transposed-bag backward against autograd through a plain gather (duplicates, zero weights)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, 6, generator=g, requires_grad=True)
    index = torch.randint(0, 30, (40, 5), generator=g)
    index[:, 0] = (rows - 1 - torch.arange(40)) % rows  # the table's last rows too
    index[3] = 7  # one row reads the same code five times
    psw = torch.rand(40, 5, generator=g)
    psw[5, 2:] = 0.0
    upstream = torch.randn(40, 6, generator=g)
    (bag_sum(weight, index, psw) * upstream).sum().backward()
    ours = weight.grad.clone()
    weight.grad = None
    reference = (weight[index] * psw.unsqueeze(-1)).sum(1)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(bag_sum(weight, index, psw), reference)
    torch.testing.assert_close(ours, weight.grad)
    # The sparse gradient holds the same values, on the rows read only.
    expected = weight.grad.clone()
    weight.grad = None
    (bag_sum(weight, index, psw, sparse=True) * upstream).sum().backward()
    assert weight.grad.is_sparse
    assert set(weight.grad.coalesce().indices()[0].tolist()) == set(index.reshape(-1).tolist())
    torch.testing.assert_close(weight.grad.to_dense(), expected)
    if rows <= 30:
        assert torch.autograd.gradcheck(lambda w: bag_sum(w, index[:6], psw[:6].double()),
                                        (weight.detach()[:, :2].double().requires_grad_(),))


def test_tables_are_sparse_above_the_size_rule_or_when_asked():
    from qarm.optim import SPARSE_ROWS

    assert not embedding_table(SPARSE_ROWS, 2, sparse=None).sparse
    assert embedding_table(SPARSE_ROWS + 1, 2, sparse=None).sparse
    assert not embedding_table(SPARSE_ROWS + 1, 2).sparse  # the default: never
    assert embedding_table(5, 2, sparse=True).sparse
    vq = VQEmbedding(np.array([[1, 2], [0, -1], [1, 0]]), n_catalogue=3, dim=4, sparse=True)
    vq(torch.tensor([0, 2])).sum().backward()
    assert vq.table.weight.grad.is_sparse
    assert sorted(vq.table.weight.grad.coalesce().indices()[0].tolist()) == [0, 1, 2]


def test_vq_embedding_gradient_skips_missing_codes():
    emb = VQEmbedding(np.array([[2, 3, -1], [0, -1, -1]]), n_catalogue=4, dim=3)
    emb(torch.tensor([0, 1, 1])).sum().backward()
    expected = torch.tensor([2.0, 0.0, 0.5, 0.5, 0.0]).unsqueeze(1).expand(5, 3)  # row 4: the padding row
    torch.testing.assert_close(emb.table.weight.grad, expected)


def test_rq_embedding_sums_one_table_per_level():
    emb = RQEmbedding(np.array([[0, 1], [1, 1]]), sizes=[2, 3], dim=4)
    w = emb.table.weight
    torch.testing.assert_close(emb(torch.tensor([0]))[0], w[0] + w[2 + 1])
    torch.testing.assert_close(emb(torch.tensor([[1]]))[0, 0], w[1] + w[2 + 1])


def test_embed_unique_equals_direct_embedding():
    table = torch.randn(10, 3)
    a, b = torch.tensor([4, 1, 4]), torch.tensor([[1, 9], [-1, 4]])
    x, y = embed_unique(lambda ids: table[ids], a, b)
    torch.testing.assert_close(x, table[a])
    torch.testing.assert_close(y, table[b.clamp(min=0)])


# -- models ----------------------------------------------------------------------------------------

VARIANTS = [
    ("id_only", None),
    ("baseline", None),
    ("qarm", None),
    ("qarm", {"vector": "none", "use_vq": False, "use_rq": False, "use_code_matching": False}),
    ("qarm", {"vector": "pretrained", "use_vq": True, "use_rq": False, "use_code_matching": False, "vq_k": 3}),
    ("qarm", {"vector": "none", "use_vq": False, "use_rq": True, "use_code_matching": True, "code_dim": 8}),
    ("qarm", {"sequence_dim": None, "target_dim": None}),  # the paper's layout
    ("qarm", {"sequence_dim": 8}),
    ("qarm", {"sequence_dim": 8, "target_dim": 6}),
    ("qarm", {"target_dim": 6}),
]


@pytest.mark.parametrize("name, config", VARIANTS)
def test_each_model_forward_backward(source, tables, name, config):
    model = build_model(name, source.spec, tables, config)
    batch = source.batch(source.order("train", shuffle=True)[:128])
    logits = model(batch)
    assert logits.shape == (128, 2) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not without_grad
    assert describe_model(model)["name"] == name


def test_cold_items_are_scored_through_codes_not_their_id(source, tables):
    model = build_model("qarm", source.spec, tables, {"vector": "none"}).eval()
    cold = np.flatnonzero(source.item_cold)
    pick = [cold[0], next(c for c in cold[1:] if tables.rq[c].tolist() != tables.rq[cold[0]].tolist())]
    assert (tables.id_index[pick] == OOV).all()
    # one user, no history, one category: the two rows differ only in the target item
    batch = source.batch(np.repeat(source.rows("valid")[:1], 2))
    batch.item = torch.tensor(pick)
    batch.history = torch.full_like(batch.history, -1)
    batch.category = batch.category[:1].repeat(2)
    with torch.no_grad():
        scores = model(batch)
        assert not torch.equal(scores[0], scores[1])  # different codes, different scores
        model.item_id.table.weight[1:] += 1.0  # every in-vocabulary ID embedding moves
        torch.testing.assert_close(model(batch), scores)  # cold targets do not read them
        model.item_id.table.weight[OOV] += 1.0
        assert not torch.allclose(model(batch), scores)  # they read the OOV row


def test_build_model_is_deterministic_by_seed(source, tables):
    a = build_model("qarm", source.spec, tables, seed=3).state_dict()
    b = build_model("qarm", source.spec, tables, seed=3).state_dict()
    c = build_model("qarm", source.spec, tables, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_model_registry_errors(source, tables):
    assert {"id_only", "baseline", "qarm", "fgcnn", "em3"} <= set(MODELS)
    listed = re.escape(str(sorted(MODELS)))
    with pytest.raises(ConfigError, match=rf"unknown model 'dien'; available: {listed}"):
        build_model("dien", source.spec, tables)
    with pytest.raises(ConfigError, match="model 'id_only' fixes use_frozen_vector=False"):
        model_config("id_only", {"use_frozen_vector": True})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['use_codes'\]"):
        model_config("qarm", {"use_codes": True})
    with pytest.raises(ConfigError, match="The 'vector' parameter of QARMConfig must be one of"):
        QARMConfig(vector="clip")


def test_qarm_needs_the_tables_its_switches_use(source):
    bare = ItemTables.build(source)
    with pytest.raises(ConfigError, match="use_vq needs VQ codes"):
        build_model("qarm", source.spec, bare, {"vector": "none"})
    with pytest.raises(ConfigError, match=r"vector='aligned' but the item tables hold \[\]"):
        build_model("qarm", source.spec, bare)
    with pytest.raises(ConfigError, match="the baseline needs the frozen vector 'pretrained'"):
        build_model("baseline", source.spec, bare)
    assert build_model("id_only", source.spec, bare) is not None


@pytest.mark.parametrize("config, width", [({"sequence_dim": None, "target_dim": None}, "item"),  # the paper's
                                           ({"sequence_dim": 8, "target_dim": None}, "item"), ({}, 32),
                                           ({"sequence_dim": 8, "target_dim": 6}, 6),
                                           ({"sequence_dim": None, "target_dim": 6}, 6)])
def test_the_targets_column_in_the_head(source, tables, config, width):
    """The head's input starts with the target: ``e(t)`` or its projection (``target_dim``); the next
    columns are the interest, as wide as the sequences."""
    model = build_model("qarm", source.spec, tables, config)
    model.eval()
    batch = source.batch(source.order("train", shuffle=True)[:64])
    seen = {}
    model.head.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))  # returns None: args kept
    with torch.no_grad():
        model(batch)
        full = model.embed_items(batch.item)
        expected = full if width == "item" else model.target_project(full)
    head_input = seen["x"]
    torch.testing.assert_close(head_input[:, :expected.shape[1]], expected)
    item_dim = full.shape[1]
    assert expected.shape[1] == (item_dim if width == "item" else width)
    sequence_width = model.config.sequence_dim or item_dim
    # the dense columns (target, interest, user) and the L code-matching blocks, each as wide as a sequence item
    user = model.config.id_dim + (model.user_side.out_features if model.user_side is not None else 0) \
        + (model.config.side_dim if model.category is not None else 0)
    assert head_input.shape[1] == expected.shape[1] + sequence_width + user
    assert model.head.expert_in.in_features == head_input.shape[1] + tables.rq_levels * sequence_width


def test_target_dim_is_checked():
    with pytest.raises(ConfigError, match="target_dim"):
        QARMConfig(target_dim=0)


def test_vq_k_cannot_exceed_the_stored_codes(source, tables):
    with pytest.raises(ConfigError, match="vq_k=9 but the quantize folder stores K=5"):
        build_model("qarm", source.spec, tables, {"vq_k": 9})


def test_item_tables_are_not_in_the_state_dict(source, tables):
    state = build_model("qarm", source.spec, tables).state_dict()
    assert not any(k.endswith((".codes", ".index", ".vectors", "rq_codes", "flat_codes")) for k in state)


def test_recorded_model_config_fills_the_defaults_of_the_writers_qarm():
    from qarm.models import recorded_model_config

    paper = {"sequence_dim": None, "target_dim": None}  # QARM's defaults before qarm 0.2.0
    assert recorded_model_config("qarm", {}, "0.1.0") == paper
    assert recorded_model_config("qarm", {}, None) == paper  # unknown writer: older than every change
    assert recorded_model_config("qarm", {"sequence_dim": 16}, "0.1.0") == {"sequence_dim": 16, "target_dim": None}
    assert recorded_model_config("qarm", {}, "0.2.0") == {} and recorded_model_config("qarm", {}, "0.10.1") == {}
    assert recorded_model_config("id_only", {}, "0.1.0") == {}
    assert model_config("qarm", recorded_model_config("qarm", {}, "0.1.0")).sequence_dim is None
