"""EM3: LoRA adapters, the exact frozen-layer cache, the Q-Former's gradients, the CIC loss, the trainer's
auxiliary-loss hook, cold items. A tiny randomly initialised BERT (MiniLM's tokenizer) stands in for MiniLM."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from qarm.data.prepare import prepare_dataset
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.encode.frozen import backbone_of, transformer_layers
from qarm.encode.lora import LoRALinear, apply_lora, lora_parameters
from qarm.encode.text import default_text_model_path, item_texts, load_text_model, tokenize
from qarm.errors import ConfigError, DataError
from qarm.features import ExampleSource, ItemTables
from qarm.models import build_model, model_config
from qarm.models.em3 import EM3Config, cic_loss
from qarm.train import TrainConfig, predict, train
from qarm.train.trainer import loss_fn


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 3-layer, 32-wide BERT with random weights and no dropout, saved with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    source = default_text_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{source}/{name}", folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def data():
    dataset = prepare_dataset(generate(SyntheticConfig(n_items=80, n_users=60, n_interactions=2000)))
    source = ExampleSource(dataset, history_length=10)
    modality = np.random.default_rng(0).standard_normal((dataset.n_items, 5)).astype(np.float32) + 100.0
    tables = ItemTables.build(source, texts=item_texts(dataset), modalities={"audio": modality})
    return source, tables


def em3(data, tiny_bert, seed: int = 0, **config):
    source, tables = data
    return build_model("em3", source.spec, tables, {"text_model": tiny_bert, **config}, seed=seed)


# -- config and tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("lora_rank", 0, "The 'lora_rank' parameter of EM3Config must be an int >= 1. Got 0 instead."),
    ("qformer_heads", 3, "The 'qformer_heads' parameter of EM3Config must divide qformer_dim=64"),
    ("lora_targets", ["query", "q"], "The 'lora_targets' parameter of EM3Config must be one of"),
    ("cic_temperature", 0.0, "The 'cic_temperature' parameter of EM3Config must be > 0"),
    ("states_dtype", "int8", "model em3.states_dtype: must be one of"),  # typed by the Literal
    ("content_history_length", -1, "The 'content_history_length' parameter of EM3Config must be an int >= 0"),
])
def test_config_errors_name_the_field(key, value, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_config("em3", {key: value})
    with pytest.raises(ConfigError, match="'cic_weight' parameter of EM3Config must be 0 when use_id=False"):
        EM3Config(use_id=False)
    assert model_config("em3", {"use_id": False, "cic_weight": 0.0}).use_id is False


def test_tables_carry_texts_and_modalities(data, tiny_bert) -> None:
    source, tables = data
    described = tables.describe()
    assert described["texts"] == source.spec.n_items and described["modalities"] == {"audio": 5}
    json.dumps(described)
    with pytest.raises(DataError, match="texts must hold one text per item"):
        ItemTables.build(source, texts=["a", "b"])
    with pytest.raises(DataError, match="modality 'x' must be"):
        ItemTables.build(source, modalities={"x": np.zeros((3, 2))})
    with pytest.raises(ConfigError, match="EM3 encodes item text: build the item tables with texts="):
        build_model("em3", source.spec, ItemTables.build(source), {"text_model": tiny_bert})
    with pytest.raises(ConfigError, match=r"'lora_layers' parameter of EM3Config must be an int in \[1, 3\]"):
        em3(data, tiny_bert, lora_layers=4)


# -- LoRA and the cached frozen layers ------------------------------------------------------------------------


def test_lora_linear_starts_as_the_base_layer_and_trains_only_adapters() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4)
    x = torch.randn(5, 6)
    expected = base(x).detach()
    adapted = LoRALinear(base, rank=2, alpha=4.0)
    assert torch.equal(adapted(x), expected)  # B = 0: exactly the base layer
    with torch.no_grad():
        adapted.lora_b.normal_()
    torch.testing.assert_close(adapted(x), x @ adapted.merged_weight().t() + base.bias)
    adapted(x).sum().backward()
    assert base.weight.grad is None and not base.weight.requires_grad and adapted.lora_a.grad is not None
    layer = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    with pytest.raises(ConfigError, match="has no linear layer '1'; its linear layers: \\['0'\\]"):
        apply_lora(layer, ["1"])


def test_adapted_top_layers_equal_the_pretrained_ones_at_init(data, tiny_bert) -> None:
    model = em3(data, tiny_bert, lora_layers=2, lora_targets=["query", "value", "ffn_in", "ffn_out"]).eval()
    pretrained = transformer_layers(load_text_model(tiny_bert, max_seq_length=32))[1:]
    top = model.content.text
    assert len(list(lora_parameters(top))) == 2 * 4 * 2
    hidden, mask = top.states.padded(np.arange(5))
    from qarm.models.em3 import _attention_mask

    extended = _attention_mask(top.text_config, hidden, mask)
    for adapted, original in zip(top.layers, pretrained):
        out, ref = adapted(hidden, extended), original(hidden, extended)
        out, ref = (o[0] if isinstance(o, tuple) else o for o in (out, ref))
        assert torch.equal(out, ref)  # B = 0: bit for bit the frozen layer
        hidden = ref


def test_cached_lower_layers_equal_the_full_forward(data, tiny_bert) -> None:
    source, tables = data
    for lora_layers in (1, 3):
        model = em3(data, tiny_bert, lora_layers=lora_layers).eval()
        full = load_text_model(tiny_bert, max_seq_length=32)
        texts = sorted(set(tables.texts))  # the states' distinct-text rows
        features = tokenize(full, texts)
        with torch.no_grad():
            reference = backbone_of(full)(**features).last_hidden_state
            hidden, mask = model.content.text(np.arange(len(texts)))
        assert mask.sum().item() == features["attention_mask"].sum().item()
        for r in range(len(texts)):
            n = int(mask[r].sum())
            torch.testing.assert_close(hidden[r, :n], reference[r, :n], atol=1e-5, rtol=1e-5)
        assert np.array_equal(np.asarray(texts)[model.content.text.states.text_rows], np.asarray(tables.texts))


# -- gradients, CIC, the trainer -------------------------------------------------------------------------------


def test_gradients_reach_the_qformer_and_the_adapters_not_the_frozen_encoder(data, tiny_bert) -> None:
    source, _ = data
    model = em3(data, tiny_bert, lora_layers=2)
    batch = source.batch(source.rows("train")[:64])
    loss = loss_fn(model(batch), batch.labels) + model.auxiliary_loss()
    loss.backward()
    frozen = [(n, p) for n, p in model.content.text.named_parameters() if "lora_" not in n]
    assert frozen and all(not p.requires_grad and p.grad is None for _, p in frozen)
    adapters = dict((n, p) for n, p in model.content.text.named_parameters() if "lora_" in n)
    assert len(adapters) == 2 * 2 * 2 and all(p.requires_grad for p in adapters.values())
    # dL/dB is non-zero; dL/dA is exactly zero while B is still zero (it flows through B).
    assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if n.endswith("lora_b"))
    assert all(p.grad is not None for n, p in adapters.items() if n.endswith("lora_a"))
    for name, p in model.content.qformer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.content.modality_project[0].weight.grad.abs().sum() > 0


def test_cic_loss_equals_a_hand_computation() -> None:
    content = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    ids = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    tau = 0.5
    a = [[1.0, 0.0], [0.0, 1.0], [2 ** -0.5, 2 ** -0.5]]
    b = [[1.0, 0.0], [2 ** -0.5, 2 ** -0.5], [0.0, -1.0]]
    s = [[sum(x * y for x, y in zip(a[i], b[j])) / tau for j in range(3)] for i in range(3)]
    rows = [-s[i][i] + np.log(sum(np.exp(s[i][j]) for j in range(3))) for i in range(3)]
    cols = [-s[j][j] + np.log(sum(np.exp(s[i][j]) for i in range(3))) for j in range(3)]
    expected = (np.mean(rows) + np.mean(cols)) / 2
    assert cic_loss(content, ids, tau).item() == pytest.approx(expected, rel=1e-6)
    # perfectly aligned, well separated pairs: the loss goes to 0
    assert cic_loss(torch.eye(3), torch.eye(3) * 5, 0.01).item() < 1e-6


def test_the_trainer_adds_the_auxiliary_loss(data, tiny_bert) -> None:
    source, _ = data
    seen = []
    config = TrainConfig(epochs=1, batch_size=64, max_steps=1, seed=3)
    train(em3(data, tiny_bert, seed=5), source, config, None, progress=False,
          on_step=lambda step, loss: seen.append(loss))
    model = em3(data, tiny_bert, seed=5).train()  # the same initial weights; no dropout anywhere
    batch = source.batch(source.order("train", shuffle=True, seed=3, epoch=0)[:64])
    bce = loss_fn(model(batch), batch.labels).item()
    aux = model.auxiliary_loss()
    assert aux is not None and aux.item() > 0.01
    warm = torch.unique(torch.cat([batch.item, batch.history[batch.history_mask]]))
    warm = warm[model.item_id.index[warm] != 0]
    content = model.content(warm)
    assert aux.item() == pytest.approx(0.1 * cic_loss(content, model.item_id(warm), 0.1).item(), rel=1e-5)
    assert seen == [pytest.approx(bce + aux.item(), rel=1e-6)]
    # evaluation computes no auxiliary loss; a model without one trains as before
    model.eval()
    with torch.no_grad():
        model(batch)
    assert model.auxiliary_loss() is None


def test_cold_items_and_truncated_history(data, tiny_bert) -> None:
    source, tables = data
    model = em3(data, tiny_bert, content_history_length=2)
    cold = np.flatnonzero(source.item_cold)
    assert len(cold) >= 2 and (tables.id_index[cold] == 0).all()
    rows = source.rows("valid")
    rows = rows[np.isin(source.item[rows], cold)][:8]
    batch = source.batch(rows)
    seen: list[torch.Tensor] = []
    original = model.content.forward
    model.content.forward = lambda items: (seen.append(items), original(items))[1]
    model.train()
    logits = model(batch)
    assert logits.shape == (len(rows), 2) and torch.isfinite(logits).all()
    expected = torch.unique(torch.cat([batch.item, batch.history[:, :2][batch.history[:, :2] >= 0]]))
    assert torch.equal(seen[-1], expected)  # content for the targets and the first 2 history slots only
    # cold targets get their own content (their ID rows are all the shared OOV row)
    content = original(torch.as_tensor(cold[:2]))
    assert not torch.allclose(content[0], content[1])
    # CIC leaves cold items out
    warm = expected[model.item_id.index[expected] != 0]
    if len(warm) >= 2:
        ref = 0.1 * cic_loss(original(warm), model.item_id(warm), 0.1)
        assert model.auxiliary_loss().item() == pytest.approx(ref.item(), rel=1e-5)


def test_evaluation_cache_matches_and_follows_the_weights(data, tiny_bert) -> None:
    source, _ = data
    model = em3(data, tiny_bert)
    items = torch.arange(10)
    model.eval()
    with torch.no_grad():
        direct = model.content(items)
        cached = model.content_of(items)
        torch.testing.assert_close(cached, direct)
        calls = []
        original = model.content.forward
        model.content.forward = lambda ids: (calls.append(len(ids)), original(ids))[1]
        torch.testing.assert_close(model.content_of(torch.tensor([3, 12, 1])), torch.cat([direct[[3]],
                                   model.content(torch.tensor([12])), direct[[1]]]))
        assert calls == [1, 1]  # only item 12 was new to the cache (and the reference call)
        del model.content.forward
    frame = predict(model, source, "valid")
    # one training step (fused Adam updates in place) makes the cache stale
    train(model, source, TrainConfig(epochs=1, batch_size=64, max_steps=1), None, progress=False)
    model.eval()
    with torch.no_grad():
        direct = model.content(items)
        torch.testing.assert_close(model.content_of(items), direct)
        assert not torch.allclose(direct, cached)
    assert len(frame) == len(source.rows("valid"))
