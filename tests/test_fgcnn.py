"""FGCNN: the generated-feature count, the convolution and product layers, learning a planted signal,
the ranking model through the registry (history field, OOV for cold items), config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from qarm.data.prepare import prepare_dataset
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.errors import ConfigError
from qarm.features import OOV, ExampleSource, ItemTables
from qarm.models import MODELS, build_model, describe_model, model_config
from qarm.models.fgcnn import (
    FGCNN,
    FeatureGeneration,
    FGCNNConfig,
    FieldConvolution,
    generated_feature_count,
    pooled_field_counts,
    pooling_windows,
)
from qarm.models.layers import PairwiseInnerProducts
from qarm.train import TrainConfig, predict, train

SMALL = {"embedding_dim": 8, "channels": (4,), "kernel_heights": (3,), "pooling": (2,), "new_features": (2,),
         "hidden": (32,)}


@pytest.fixture(scope="module")
def source() -> ExampleSource:  # the dataset of tests/test_models.py
    return ExampleSource(prepare_dataset(generate(SyntheticConfig(n_items=300, n_users=150, n_interactions=6000))),
                         history_length=20)


@pytest.fixture(scope="module")
def tables(source) -> ItemTables:
    return ItemTables.build(source)  # FGCNN needs the ID vocabulary only


# -- the generated-feature count ---------------------------------------------------------------------


@pytest.mark.parametrize("n_fields, pooling, new_features, expected", [
    (10, (2, 2, 2), (3, 3, 3), 5 * 3 + 2 * 3 + 1 * 3),  # Frappe, the benchmark's three blocks
    (6, (2, 2), (3, 3), 3 * 3 + 1 * 3),  # a ranking example with category and two side features
    (7, (3,), (2,), 2 * 2),  # floor: 7 // 3 = 2
    (9, (2, 3), (1, 4), 4 * 1 + 1 * 4),
    (16, (2, 2, 2, 2), (3, 3, 3, 3), 8 * 3 + 4 * 3 + 2 * 3 + 1 * 3),  # DeepCTR's four blocks
])
def test_generated_count_matches_the_formula(n_fields, pooling, new_features, expected):
    assert generated_feature_count(n_fields, pooling, new_features) == expected
    n_blocks = len(pooling)
    config = FGCNNConfig(embedding_dim=4, channels=(3,) * n_blocks, kernel_heights=(5,) * n_blocks, pooling=pooling,
                         new_features=new_features, hidden=(8,))
    model = FGCNN([3] * n_fields, 1, config)
    assert model.network.n_generated == expected
    fields = torch.randn(5, n_fields, 4)
    assert model.network.generation(fields).shape == (5, expected, 4)  # what the model really generates
    # the classifier sees F + N_new fields: F + N_new choose 2 products
    n = n_fields + expected
    assert model.network.products.out_features == n * (n - 1) // 2


def test_pooled_field_counts_use_floor_division():
    assert pooled_field_counts(10, (2, 2, 2)) == [5, 2, 1]
    assert pooled_field_counts(10, (3, 3)) == [3, 1]


# -- layers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, c_in, c_out, h", [(10, 1, 14, 7), (5, 14, 16, 7), (2, 3, 4, 7), (6, 2, 3, 4),
                                             (3, 2, 2, 1)])
def test_field_convolution_equals_conv2d_same(n, c_in, c_out, h):
    torch.manual_seed(0)
    conv = FieldConvolution(n, c_in, c_out, h)
    x = torch.randn(3, 5, n, c_in)  # (B, k, F, C)
    # 'same': (h - 1) // 2 zero rows before the fields, the rest (one more for an even h) after, as in PyTorch
    padded = F.pad(x.permute(0, 3, 2, 1), (0, 0, (h - 1) // 2, h - 1 - (h - 1) // 2))  # (B, C, F + h - 1, k)
    expected = F.conv2d(padded, conv.weight[..., None], conv.bias)
    torch.testing.assert_close(conv(x), expected.permute(0, 3, 2, 1))


def test_pairwise_inner_products_in_row_major_pair_order():
    x = torch.randn(4, 5, 3)
    products = PairwiseInnerProducts(5)
    expected = torch.stack([(x[:, a] * x[:, b]).sum(-1) for a in range(5) for b in range(a + 1, 5)], dim=1)
    torch.testing.assert_close(products(x), expected)
    assert products.out_features == 10
    with pytest.raises(ConfigError, match=r"expects \(B, 5, k\), got \(4, 6, 3\)"):
        products(torch.randn(4, 6, 3))


# -- FGCNN on categorical fields ------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "mmoe"])
@pytest.mark.parametrize("separate", [True, False])
def test_fgcnn_shapes_and_gradients(head, separate):
    model = FGCNN([4, 7, 3, 5, 2, 9], n_tasks=3, config=FGCNNConfig(**{**SMALL, "head": head,
                                                                         "separate_embeddings": separate}))
    codes = torch.stack([torch.randint(0, s, (16,)) for s in (4, 7, 3, 5, 2, 9)], dim=1)
    logits = model(codes)
    assert logits.shape == (16, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert (model.generation_embedding is not None) == separate


def test_fgcnn_learns_a_planted_interaction():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, sizes = 6000, [6, 6, 5, 4, 7]
    codes = np.stack([rng.integers(0, s, n) for s in sizes], axis=1)
    # Clicks depend on an interaction of fields 0 and 1 (same parity) and on field 2, not on the others.
    logit = 2.5 * ((codes[:, 0] % 2) == (codes[:, 1] % 2)) + 0.8 * (codes[:, 2] == 0) - 1.5
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    x, y = torch.from_numpy(codes), torch.from_numpy(labels)
    model = FGCNN(sizes, 1, FGCNNConfig(**SMALL))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_rows = torch.arange(5000)
    for epoch in range(4):
        for rows in train_rows[torch.randperm(5000, generator=torch.Generator().manual_seed(epoch))].split(128):
            loss = F.binary_cross_entropy_with_logits(model(x[rows])[:, 0], y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        scores = model(x[5000:])[:, 0].numpy()
    best = roc_auc_score(labels[5000:], logit[5000:])  # the planted model's own AUC
    auc = roc_auc_score(labels[5000:], scores)
    assert auc > 0.7 and auc > best - 0.03, (auc, best)


# -- the ranking model ---------------------------------------------------------------------------------


def test_registered_and_built_from_a_dict(source, tables):
    assert "fgcnn" in MODELS
    model = build_model("fgcnn", source.spec, tables, {"embedding_dim": 8, "head": "mmoe"})
    assert model.fields.names == ("user", "item", "category", "age_bucket", "region", "history",
                                  "recent_1", "recent_2", "recent_3", "recent_4")
    batch = source.batch(source.order("train", shuffle=True)[:64])
    logits = model(batch)
    assert logits.shape == (64, len(source.tasks)) and torch.isfinite(logits).all()
    F.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    info = describe_model(model)
    assert info["name"] == "fgcnn" and info["config"]["channels"] == [14, 16]
    assert not any(k.endswith((".tap", ".flat_index", ".index", ".offsets")) for k in model.state_dict())


def test_build_is_deterministic_by_seed(source, tables):
    a = build_model("fgcnn", source.spec, tables, seed=3).state_dict()
    b = build_model("fgcnn", source.spec, tables, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trains_through_the_trainer(source, tables, tmp_path):
    model = build_model("fgcnn", source.spec, tables, {**SMALL, "embedding_dim": 8})
    result = train(model, source, TrainConfig(epochs=1, batch_size=512), tmp_path, progress=False)
    frame = predict(result.model, source, "valid")
    assert result.history.steps == source.n_batches("train", 512)
    assert np.isfinite(frame[[f"score_{t}" for t in source.tasks]].to_numpy()).all()


def test_history_field_is_the_mean_of_the_history_id_embeddings(source, tables):
    model = build_model("fgcnn", source.spec, tables, {"embedding_dim": 8})
    batch = source.batch(source.rows("valid")[:32])
    batch.history[0] = -1  # an empty history: a zero field
    assert (batch.history_len > 1).any() and batch.history_len[0] == 0
    with torch.no_grad():
        fields = model.fields(batch)
        item = model.fields.item
        for b in range(32):
            filled = batch.history[b][batch.history[b] >= 0]
            expected = item(filled).mean(0) if len(filled) else torch.zeros(8)
            torch.testing.assert_close(fields[b, model.fields.names.index("history")], expected)
            for i in range(4):  # recent_1..4: the latest history items, zeros past the history's end
                recent = fields[b, model.fields.names.index(f"recent_{i + 1}")]
                torch.testing.assert_close(recent, item(filled[i:i + 1])[0] if i < len(filled) else torch.zeros(8))
        torch.testing.assert_close(fields[:, 1], item(batch.item))


def test_recent_history_fields_make_fgcnn_work_without_side_features(source, tables):
    """user, item, history mean: three fields, too few for two pooling blocks; the recent items fix that."""
    from dataclasses import replace

    bare = replace(source.spec, user_features=(), n_categories=0)
    with pytest.raises(ConfigError, match="needs at least 4 fields.*the data gives 3 \\(user, item, history\\)"):
        build_model("fgcnn", bare, tables, {"recent_history": 0})
    model = build_model("fgcnn", bare, tables, {"recent_history": 2})
    assert model.fields.names == ("user", "item", "history", "recent_1", "recent_2")
    with pytest.raises(ConfigError, match="'recent_history' parameter of FGCNNConfig \\(60\\) exceeds"):
        build_model("fgcnn", bare, tables, {"recent_history": 60})


@pytest.mark.parametrize("separate", [True, False])
def test_cold_items_use_the_oov_row(source, tables, separate):
    model = build_model("fgcnn", source.spec, tables, {"separate_embeddings": separate}).eval()
    cold = np.flatnonzero(source.item_cold)[:2]
    assert (tables.id_index[cold] == OOV).all()
    # one user, no history, one category: the two rows differ only in the (cold) target item
    batch = source.batch(np.repeat(source.rows("valid")[:1], 2))
    batch.item = torch.from_numpy(cold)
    batch.history = torch.full_like(batch.history, -1)
    batch.category = batch.category[:1].repeat(2)
    tables_in_model = [m.item.table for m in (model.fields, model.generation_fields) if m is not None]
    assert len(tables_in_model) == (2 if separate else 1)
    with torch.no_grad():
        scores = model(batch)
        torch.testing.assert_close(scores[0], scores[1])  # both read the one OOV row
        for table in tables_in_model:
            table.weight[1:] += 1.0  # every in-vocabulary ID embedding moves
        torch.testing.assert_close(model(batch), scores)  # cold targets do not read them
        tables_in_model[0].weight[OOV] += 1.0
        assert not torch.allclose(model(batch), scores)  # they read the OOV row


# -- config errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"embedding_dim": 0}, "The 'embedding_dim' parameter of FGCNNConfig must be an int >= 1. Got 0 instead."),
    ({"channels": ()}, "The 'channels' parameter of FGCNNConfig must be a non-empty list of ints >= 1. Got ()"),
    ({"kernel_heights": (7,)}, ("The 'kernel_heights' parameter of FGCNNConfig must have one entry per block "
                                "(len(channels) = 2). Got (7,) instead.")),
    ({"pooling": (2, 0)}, "The 'pooling' parameter of FGCNNConfig must be an int >= 1. Got 0 instead."),
    ({"hidden": (64, -1)}, "The 'hidden' parameter of FGCNNConfig must be an int >= 1. Got -1 instead."),
    ({"dropout": 1.5}, "The 'dropout' parameter of FGCNNConfig must be a float in [0.0, 0.99]. Got 1.5 instead."),
    ({"head": "ple"}, "The 'head' parameter of FGCNNConfig must be one of 'linear', 'mmoe'. Got 'ple' instead."),
    ({"separate_embeddings": "yes"}, "The 'separate_embeddings' parameter of FGCNNConfig must be a bool."),
])
def test_bad_config_names_the_field(values, message):
    with pytest.raises(ConfigError) as err:
        FGCNNConfig(**values)
    assert message in str(err.value)


def test_too_few_fields_for_the_pooling(source, tables):
    config = {"channels": (4, 4, 4), "kernel_heights": (3, 3, 3), "pooling": (2, 2, 2), "new_features": (1, 1, 1),
              "recent_history": 0}
    with pytest.raises(ConfigError, match=r"The 'pooling' parameter of FGCNNConfig, \(2, 2, 2\), needs at least 8 "
                                          r"fields .* the data gives 6 \(user, item, category, age_bucket, region, "
                                          r"history\)"):
        build_model("fgcnn", source.spec, tables, config)
    with pytest.raises(ConfigError, match=r"needs at least 2 fields"):
        FGCNN([5], 1, FGCNNConfig(pooling=(1, 1)))


def test_unknown_config_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['chanels'\] .* allowed keys: .*'channels'"):
        model_config("fgcnn", {"chanels": (4,)})
    assert model_config("fgcnn", {"channels": [4, 4]}).channels == (4, 4)  # YAML lists become tuples


# -- FuxiCTR's options: pooling that rounds up, conv batch-norm, xavier initialisation ------------------


def test_round_up_pooling_counts_frappe_as_fuxictr():
    # 10 fields, three blocks of pooling 2: ceil(10/2) = 5, ceil(5/2) = 3, ceil(3/2) = 2 rows; 3 new features
    # per row: 15 + 9 + 6 = 30 generated features (rounding down: 5, 2, 1 rows, 24)
    assert pooled_field_counts(10, (2, 2, 2), "up") == [5, 3, 2]
    assert generated_feature_count(10, (2, 2, 2), (3, 3, 3), "up") == 30
    assert generated_feature_count(10, (2, 2, 2), (3, 3, 3), "down") == 24
    assert pooled_field_counts(7, (3, 3), "up") == [3, 1]
    model = FGCNN([3] * 10, 1, FGCNNConfig(embedding_dim=4, channels=(3, 3, 3), kernel_heights=(7, 7, 7),
                                           pooling=(2, 2, 2), new_features=(3, 3, 3), hidden=(8,),
                                           pooling_round="up"))
    assert model.network.n_generated == 30
    assert model.network.generation(torch.randn(2, 10, 4)).shape == (2, 30, 4)
    assert model.network.products.out_features == 40 * 39 // 2


def test_pad_pooling_pools_the_first_row_alone_as_fuxictr():
    """FuxiCTR's MaxPool2d(padding=5 % 2 = 1): 5 rows -> windows (0), (1, 2), (3, 4); 10 fields of Frappe give
    the same counts as rounding up (5, 3, 2 rows: 30 generated features), windows shifted."""
    assert pooling_windows(5, 2, "pad") == [[0], [1, 2], [3, 4]]
    assert pooling_windows(5, 2, "up") == [[0, 1], [2, 3], [4]]
    assert pooling_windows(4, 3, "pad") == [[0, 1], [2, 3]]  # 4 % 3 = 1 row of padding each side
    assert pooled_field_counts(10, (2, 2, 2), "pad") == [5, 3, 2]
    torch.testing.assert_close(_pooled_five_rows("pad"), torch.tanh(torch.tensor([[0.1, 0.5, 0.3]])))


def test_pad_pooling_refuses_more_padding_than_half_a_window():
    FGCNNConfig(pooling=(3,), channels=(2,), kernel_heights=(3,), new_features=(1,),
                pooling_round="pad").check_fields(4)  # 4 % 3 = 1 <= 1
    with pytest.raises(ConfigError, match=r"pads 5 % 3 = 2 rows on each side of block 1's 5 rows"):
        FGCNNConfig(pooling=(3,), channels=(2,), kernel_heights=(3,), new_features=(1,),
                    pooling_round="pad").check_fields(5)


def test_round_up_pools_the_last_row_alone():
    """5 rows, pooling 2 up: windows (0, 1), (2, 3), (4): the last pooled row is row 4 itself."""
    torch.testing.assert_close(_pooled_five_rows("up"), torch.tanh(torch.tensor([[0.5, -0.2, 0.3]])))


def _pooled_five_rows(rounding: str) -> torch.Tensor:
    """The recombination's input for rows 0.1, 0.5, -0.2, -0.7, 0.3 through a 1 x 1 identity convolution and
    pooling 2 with ``rounding``: tanh of each window's max."""
    gen = FeatureGeneration(5, 1, (1,), (1,), (2,), (1,), rounding=rounding)
    with torch.no_grad():
        gen.convs[0].weight.fill_(1.0)
        gen.convs[0].bias.zero_()
    seen = {}
    gen.recombine[0].register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    gen(torch.tensor([[[0.1], [0.5], [-0.2], [-0.7], [0.3]]]))  # (B=1, F=5, k=1)
    return seen["x"]


def _reference_generation(gen, fields, rounding, batch_norm):
    """FGCNN's generation the textbook way: NCHW maps, F.conv2d 'same', batch-norm, tanh, F.max_pool2d
    (ceil_mode for rounding up, FuxiCTR's padding for "pad"), dense, tanh."""
    maps = fields.unsqueeze(1)  # (B, 1, F, k)
    out = []
    for i, (conv, dense, p) in enumerate(zip(gen.convs, gen.recombine, gen.pooling)):
        z = F.conv2d(maps, conv.weight[..., None], conv.bias, padding="same")
        if batch_norm:
            norm = gen.norms[i]
            z = F.batch_norm(z, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        pad = (z.shape[2] % p, 0) if rounding == "pad" else 0  # FuxiCTR's MaxPool2d(padding=(H % p, 0))
        maps = F.max_pool2d(torch.tanh(z), (p, 1), padding=pad, ceil_mode=rounding == "up")  # (B, c, F_i, k)
        flat = maps.permute(0, 3, 2, 1).flatten(1)  # qarm's (k, F_i, c) order
        out.append(torch.tanh(dense(flat)).view(len(fields), -1, fields.shape[2]))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("rounding", ["down", "up", "pad"])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("pooling", [(2, 2), (3, 2)])
def test_generation_equals_conv2d_batch_norm_max_pool2d(rounding, batch_norm, pooling):
    torch.manual_seed(0)
    gen = FeatureGeneration(7, 5, (4, 3), (3, 4), pooling, (2, 3), rounding=rounding, batch_norm=batch_norm)
    if batch_norm:
        for norm in gen.norms:  # not the identity affine part, so that it is tested too
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
            torch.nn.init.uniform_(norm.bias, -0.5, 0.5)
    fields = torch.randn(6, 7, 5, requires_grad=True)
    expected = _reference_generation(gen, fields, rounding, batch_norm)
    assert expected.shape == (6, generated_feature_count(7, pooling, (2, 3), rounding), 5)
    got = gen(fields)
    torch.testing.assert_close(got, expected)
    # the gradients too (max-pooling routes each window's gradient to its largest row; the window-major rows
    # and the repeated slot of a short window must not change them)
    upstream = torch.randn_like(expected)
    params = [fields, *gen.parameters()]
    want = torch.autograd.grad(expected, params, upstream)
    for name, a, b in zip(["fields", *(n for n, _ in gen.named_parameters())], torch.autograd.grad(got, params, upstream),
                          want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_batch_norm_option_adds_one_norm_per_block_and_tracks_statistics():
    config = FGCNNConfig(**{**SMALL, "channels": (4, 5), "kernel_heights": (3, 3), "pooling": (2, 2),
                            "new_features": (2, 2)}, batch_norm=True)
    model = FGCNN([4, 7, 3, 5, 2, 9], 1, config)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [n.num_features for n in norms] == [4, 5]
    codes = torch.stack([torch.randint(0, s, (32,)) for s in (4, 7, 3, 5, 2, 9)], dim=1)
    model(codes)
    assert all(n.num_batches_tracked == 1 and n.running_mean.abs().sum() > 0 for n in norms)
    assert not [m for m in FGCNN([4, 7, 3, 5, 2, 9], 1, FGCNNConfig(**SMALL)).modules()
                if isinstance(m, torch.nn.BatchNorm1d)]


def test_round_up_pooling_needs_only_two_fields(source, tables):
    config = {"channels": (4, 4, 4), "kernel_heights": (3, 3, 3), "pooling": (2, 2, 2), "new_features": (1, 1, 1),
              "recent_history": 0, "pooling_round": "up"}  # the 6 fields that rounding down rejects
    model = build_model("fgcnn", source.spec, tables, config)
    assert model.network.n_generated == 3 + 2 + 1


def test_xavier_init_is_fuxictr_scheme():
    torch.manual_seed(0)
    model = FGCNN([500] * 10, 1, FGCNNConfig(pooling=(2, 2), pooling_round="up", init="xavier"))
    first = model.network.mlp[0]
    fan_out, fan_in = first.weight.shape
    assert abs(first.weight.std().item() / (2 / (fan_in + fan_out)) ** 0.5 - 1) < 0.05
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 2 + 1 and all(torch.count_nonzero(m.bias) == 0 for m in linears)  # recombine, MLP, head
    for table in (model.embedding.table, model.generation_embedding.table):
        assert abs(table.weight.std().item() / 1e-4 - 1) < 0.05
    default = FGCNN([500] * 10, 1, FGCNNConfig(pooling=(2, 2), pooling_round="up"))
    assert abs(default.embedding.table.weight.std().item() / 0.01 - 1) < 0.05  # the project's N(0, 0.01)
    assert torch.count_nonzero(default.network.mlp[0].bias) > 0  # PyTorch's default: uniform biases


@pytest.mark.parametrize("values, message", [
    ({"pooling_round": "nearest"},
     "The 'pooling_round' parameter of FGCNNConfig must be one of 'down', 'up', 'pad'. Got 'nearest' instead."),
    ({"batch_norm": 1}, "The 'batch_norm' parameter of FGCNNConfig must be a bool."),
    ({"init": "he"}, "The 'init' parameter of FGCNNConfig must be one of 'torch', 'xavier'. Got 'he' instead."),
])
def test_bad_fuxictr_option_names_the_field(values, message):
    with pytest.raises(ConfigError) as err:
        FGCNNConfig(**values)
    assert message in str(err.value)


def test_bf16_autocast_keeps_products_and_output_layer_float32():
    """Under qarm.precision's bf16 autocast the generation and MLP run in bfloat16, the inner products and the
    output layer in float32 (bfloat16 logits would round the loss's inputs); without autocast nothing changes."""
    from qarm.precision import autocast

    torch.manual_seed(0)
    model = FGCNN([5] * 6, 2, FGCNNConfig(**SMALL))
    codes = torch.randint(0, 5, (16, 6))
    seen = {}
    for name in ("products", "head", "mlp"):
        getattr(model.network, name).register_forward_hook(
            lambda m, inputs, out, name=name: seen.update({name: (inputs[0].dtype, out.dtype)}))
    model.network.generation.recombine[0].register_forward_hook(
        lambda m, inputs, out: seen.update(recombine=out.dtype))
    with autocast("bf16"):
        logits = model(codes)
    assert logits.dtype == torch.float32
    assert seen["products"] == (torch.float32, torch.float32) and seen["head"] == (torch.float32, torch.float32)
    assert seen["mlp"][1] == torch.bfloat16 and seen["recombine"] == torch.bfloat16
    torch.testing.assert_close(logits, model(codes), atol=0.05, rtol=0.05)  # bf16 rounding only
    reference = model.network.head(model.network.mlp(torch.cat([
        (x := torch.cat([model.embedding(codes).view(16, 6, 8),
                         model.network.generation(model.generation_embedding(codes).view(16, 6, 8))], 1)).flatten(1),
        model.network.products(x)], 1)))
    torch.testing.assert_close(model(codes), reference)  # float32: the plain composition
