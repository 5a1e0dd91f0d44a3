"""Content encoder: item text, MiniLM loading, fusion head, freezing, cache, image encoder."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from qarm.data.schema import Dataset, DatasetMeta
from qarm.encode import ContentEncoder, ContentEncoderConfig, VectorCache, encode_items, item_texts, load_text_model
from qarm.encode.content import load_encoder, pca_projection, save_encoder
from qarm.encode.text import encode_texts, join_text
from qarm.errors import ConfigError

WORDS = {
    "pets": ["cat", "dog", "puppy", "kitten", "hamster", "parrot"],
    "cooking": ["pasta", "recipe", "bake", "soup", "grill", "noodles"],
    "games": ["speedrun", "boss", "sniper", "minecraft", "clutch", "raid"],
    "money": ["stocks", "budget", "crypto", "savings", "invest", "taxes"],
}


def tiny_dataset(per_topic: int = 4, *, vectors: bool = True, seed: int = 0) -> Dataset:
    """``4 * per_topic`` items: a title of topic words, a tag column with gaps, optional audio vectors."""
    rng = np.random.default_rng(seed)
    titles, tags, topics = [], [], []
    for topic, words in WORDS.items():
        for i in range(per_topic):
            picked = rng.choice(words, 3, replace=False)
            titles.append(" ".join(picked) + " video")
            tags.append(None if i % 3 == 0 else f"#{topic}")
            topics.append(topic)
    n = len(titles)
    items = pd.DataFrame({"item_id": np.arange(n), "source_id": [str(i) for i in range(n)], "title": titles,
                          "tags": tags, "category": topics})
    meta = DatasetMeta(name="tiny", source="test", loader="test", text_columns=["title", "tags"])
    item_vectors = {"audio": rng.standard_normal((n, 6)).astype(np.float32)} if vectors else {}
    return Dataset(items=items, interactions=pd.DataFrame(), users=pd.DataFrame(), meta=meta,
                   item_vectors=item_vectors)


@pytest.fixture(scope="module")
def text_model():
    return load_text_model()


def make_encoder(text_model, dataset: Dataset, **config) -> ContentEncoder:
    return ContentEncoder(ContentEncoderConfig(**config), text_model=copy.deepcopy(text_model)).fit(
        dataset, progress=False)


# -- item text -----------------------------------------------------------------------------------------


def test_join_text_skips_missing_and_empty_fields() -> None:
    assert join_text(["Toy Story", "Animation|Children", "pixar, fun"]) == "Toy Story | Animation|Children | pixar, fun"
    assert join_text(["  Heat ", None, float("nan"), "", "  ", pd.NA]) == "Heat"
    assert join_text([None, ["rock", "", "indie"], np.array(["a"])]) == "rock, indie | a"
    assert join_text([]) == ""


def test_item_texts_follow_meta_text_columns() -> None:
    dataset = tiny_dataset(2, vectors=False)
    texts = item_texts(dataset)
    assert len(texts) == 8
    assert texts[0] == dataset.items.title[0]  # the first item of each topic has no tag: no dangling " | "
    assert texts[1] == dataset.items.title[1] + " | #pets"
    dataset.meta.text_columns = ["tags", "title"]
    assert item_texts(dataset)[1] == "#pets | " + dataset.items.title[1]
    dataset.meta.text_columns = ["title", "plot"]
    with pytest.raises(ConfigError, match=r"text columns \['plot'\]"):
        item_texts(dataset)


def test_load_text_model_missing_folder(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_text_model(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="neither modules.json nor config.json"):
        load_text_model(tmp_path)


# -- the encoder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
def test_encoder_output_shape_and_norm(text_model, fusion) -> None:
    dataset = tiny_dataset()
    encoder = make_encoder(text_model, dataset, fusion=fusion, out_dim=8)
    assert encoder.parts_ == ["text", "audio"]
    assert encoder.input_dims_ == {"text": 384, "audio": 6}
    vectors = encode_items(encoder, dataset, progress=False, batch_size=5)
    assert vectors.shape == (16, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # encode_items (length-sorted batches, no grad) equals the training-time forward, in item order.
    with torch.no_grad():
        direct = encoder.eval().encode(encoder_inputs(dataset)).numpy()
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    assert encoder.describe()["fusion"] == fusion and encoder.describe()["out_dim"] == 8


def encoder_inputs(dataset: Dataset):
    from qarm.encode.content import ItemInputs
    return ItemInputs.from_dataset(dataset)


def test_text_only_pretrained_vectors_are_pca_of_minilm(text_model) -> None:
    """The fair baseline: with a single part the fitted head is exactly the (uncentred) PCA of MiniLM,
    no random map; at full width it reproduces MiniLM's own cosines."""
    dataset = tiny_dataset(vectors=False)
    encoder = make_encoder(text_model, dataset, out_dim=8)
    assert encoder.parts_ == ["text"]
    raw = encode_texts(text_model, item_texts(dataset), progress=False)
    weight, bias = pca_projection(raw, 8, center=False)
    assert not bias.any()
    expected = raw @ weight.T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(encode_items(encoder, dataset, progress=False), expected, atol=1e-5)
    full = make_encoder(text_model, dataset, out_dim=384)
    vectors = encode_items(full, dataset, progress=False)
    np.testing.assert_allclose(vectors @ vectors.T, raw @ raw.T, atol=1e-4)


def test_pca_projection_rows_are_orthonormal_and_padded() -> None:
    x = np.random.default_rng(0).standard_normal((500, 5)) * np.array([10.0, 3, 2, 1, 0.5])
    weight, bias = pca_projection(x, 7)
    np.testing.assert_allclose(weight[:5] @ weight[:5].T, np.eye(5), atol=1e-5)
    assert np.all(weight[5:] == 0)
    assert abs(weight[0, 0]) > 0.99  # the direction of largest variance comes first
    np.testing.assert_allclose((x @ weight.T + bias).mean(axis=0), 0.0, atol=1e-5)  # centred
    weight, bias = pca_projection(x + 100.0, 5, center=False)  # uncentred: the offset is the top direction
    assert not bias.any() and np.allclose(np.abs(weight[0]), 1 / np.sqrt(5), atol=1e-2)


def test_trainable_layers_freeze_the_rest(text_model) -> None:
    dataset = tiny_dataset(1)
    encoder = make_encoder(text_model, dataset, out_dim=8).set_trainable(1)
    encoder.train()
    encoder.encode(encoder_inputs(dataset)).sum().backward()
    for name, param in encoder.named_parameters():
        in_top_layer = ".encoder.layer.5." in name
        head = not name.startswith("text_model.")
        assert param.requires_grad == (in_top_layer or head), name
        assert (param.grad is not None) == (in_top_layer or head), name
    # frozen layers run without dropout; the trainable top layer trains
    layers = encoder.transformer_layers()
    assert not layers[0].training and layers[5].training
    n_trainable = sum(p.numel() for p in encoder.set_trainable(0).parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("text_model."))
    assert all(p.requires_grad for p in encoder.set_trainable("all").parameters())
    with pytest.raises(ConfigError, match=r"The 'trainable_layers' parameter must be 'all' or an int in \[0, 6\]"):
        encoder.set_trainable(7)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="The 'fusion' parameter of ContentEncoderConfig must be one of"):
        ContentEncoderConfig(fusion="attention")
    with pytest.raises(ConfigError, match="The 'out_dim' parameter of ContentEncoderConfig must be an int >= 1. "
                                          "Got 0 instead."):
        ContentEncoderConfig(out_dim=0)
    with pytest.raises(ConfigError, match="unknown key"):
        ContentEncoderConfig.from_dict({"fuson": "sum"})


def test_unknown_modality_is_named(text_model) -> None:
    with pytest.raises(ConfigError, match=r"names \['video'\].*available: \['audio'\]"):
        ContentEncoder(ContentEncoderConfig(modalities=["video"]), text_model=text_model).fit(tiny_dataset(1))


def test_save_and_load_encoder_round_trip(text_model, tmp_path) -> None:
    dataset = tiny_dataset(2)
    encoder = make_encoder(text_model, dataset, out_dim=8, fusion="gated").set_trainable(1)
    with torch.no_grad():  # pretend training changed the top layer and the head
        encoder.transformer_layers()[-1].output.dense.bias.add_(0.1)
        encoder.gate.weight.add_(0.05)
    before = encode_items(encoder, dataset, progress=False)
    save_encoder(encoder, tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "encoder.json").read_text())["trainable_layers"] == 1
    loaded = load_encoder(tmp_path / "enc", text_model=copy.deepcopy(text_model))
    np.testing.assert_allclose(encode_items(loaded, dataset, progress=False), before, atol=1e-6)


# -- cache ---------------------------------------------------------------------------------------------


def test_cache_hit_returns_identical_vectors_and_changed_text_misses(text_model, tmp_path, monkeypatch) -> None:
    dataset = tiny_dataset(2)
    cache = VectorCache(tmp_path / "cache")
    encoder = make_encoder(text_model, dataset, out_dim=8)
    first = encode_items(encoder, dataset, progress=False, cache=cache)
    n_entries = len(list((tmp_path / "cache").glob("*.json")))
    assert n_entries == 2  # text embeddings + fused vectors

    import qarm.encode.content as content

    def no_compute(*args, **kwargs):
        raise AssertionError("a cache hit must not run the text model")

    monkeypatch.setattr(content, "encode_texts", no_compute)
    second = encode_items(encoder, dataset, progress=False, cache=cache)
    np.testing.assert_array_equal(first, second)
    monkeypatch.undo()

    dataset.items.loc[3, "title"] = "a completely different title"
    changed = encode_items(encoder, dataset, progress=False, cache=cache)
    assert len(list((tmp_path / "cache").glob("*.json"))) == n_entries + 2
    assert not np.allclose(changed[3], first[3])
    np.testing.assert_allclose(np.delete(changed, 3, axis=0), np.delete(first, 3, axis=0), atol=1e-5)


def test_cache_treats_corrupt_entries_as_misses(tmp_path) -> None:
    cache = VectorCache(tmp_path)
    key = VectorCache.key(what="x")
    cache.put(key, np.ones((3, 2), np.float32), {"note": "test"})
    np.testing.assert_array_equal(cache.get(key), np.ones((3, 2)))
    cache.paths(key)[0].write_bytes(b"not safetensors")
    assert cache.get(key) is None
    assert cache.get(VectorCache.key(what="y")) is None


# -- image encoder -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                       intermediate_size=37)
    folder = tmp_path_factory.mktemp("vit")
    ViTModel(config).save_pretrained(folder)
    return folder


def test_image_encoder_from_local_vit(tiny_vit) -> None:
    from qarm.encode.image import load_image_encoder

    encoder = load_image_encoder(tiny_vit)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    vectors = encoder.encode(images, batch_size=2)
    assert vectors.shape == (5, 32) and vectors.dtype == np.float32
    again = encoder.encode(images[[3]])
    np.testing.assert_allclose(again[0], vectors[3], atol=1e-5)
    channels_first = encoder.encode(images.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(channels_first, vectors, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    assert load_image_encoder(tiny_vit, pooling="mean").encode(images).shape == (5, 32)


def test_image_encoder_with_processor_resizes(tiny_vit, tmp_path) -> None:
    import shutil

    from transformers import ViTImageProcessor

    from qarm.encode.image import load_image_encoder

    folder = tmp_path / "vit"
    shutil.copytree(tiny_vit, folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    images = np.random.default_rng(1).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    assert load_image_encoder(folder).encode(images).shape == (2, 32)


def test_image_encoder_errors(tmp_path, tiny_vit) -> None:
    from qarm.encode.image import load_image_encoder

    with pytest.raises(ConfigError, match="does not exist"):
        load_image_encoder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="has no config.json"):
        load_image_encoder(tmp_path)
    with pytest.raises(ConfigError, match="The 'pooling' parameter of ImageEncoder must be one of"):
        load_image_encoder(tiny_vit, pooling="max")
    from qarm.errors import DataError

    with pytest.raises(DataError, match="must be 3 x 32 x 32"):
        load_image_encoder(tiny_vit).encode(np.zeros((1, 16, 16, 3), np.uint8))


# -- frozen-state cache --------------------------------------------------------------------------------


def perturb_top(encoder: ContentEncoder, k: int) -> None:
    """Pretend training moved the top ``k`` layers and the head."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in list(encoder.transformer_layers())[len(encoder.transformer_layers()) - k:]:
            for p in layer.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        encoder.projections[0].weight.add_(0.05 * torch.randn(encoder.projections[0].weight.shape, generator=gen))


@pytest.mark.parametrize("k", [0, 1, 2, 6])
def test_frozen_states_reproduce_the_full_forward(text_model, k, monkeypatch) -> None:
    """Cached path (top layers on stored states) == full path (whole text model) to float rounding."""
    dataset = tiny_dataset(3)
    encoder = make_encoder(text_model, dataset, out_dim=8)
    cached = ContentEncoder(ContentEncoderConfig(out_dim=8), text_model=copy.deepcopy(text_model)).fit(
        dataset, progress=False, keep_frozen_states=k)
    states = cached.frozen_states_
    assert states.n_frozen == 6 - k and states.whole_model_frozen == (k == 0)
    # the same pass gives the pre-trained text embeddings: the fitted heads are identical
    np.testing.assert_allclose(encode_items(cached, dataset, progress=False),
                               encode_items(encoder, dataset, progress=False), atol=1e-6)
    cached.set_trainable(k)
    perturb_top(cached, k)
    import qarm.encode.content as content

    def no_full_pass(*args, **kwargs):
        raise AssertionError("the cached path must not run the whole text model")

    monkeypatch.setattr(content, "encode_texts", no_full_pass)
    fast = encode_items(cached, dataset, progress=False)
    monkeypatch.undo()
    cached.frozen_states_ = None
    full = encode_items(cached, dataset, progress=False)
    np.testing.assert_allclose(fast, full, atol=1e-5)
    # and the training-time forward (chunked, with or without states) agrees too
    cached.frozen_states_ = states
    ids = np.array([5, 0, 11, 3, 5])
    with torch.no_grad():
        cached.eval()
        np.testing.assert_allclose(cached.embed(ids, encoder_inputs(dataset), states=states, chunk_size=2).numpy(),
                                   full[ids], atol=1e-5)
        np.testing.assert_allclose(cached.embed(ids, encoder_inputs(dataset), chunk_size=2).numpy(), full[ids],
                                   atol=1e-5)


def test_frozen_states_are_ragged_and_float16_is_close(text_model) -> None:
    dataset = tiny_dataset(3)
    texts = item_texts(dataset)
    from qarm.encode.frozen import build_text_states
    from qarm.encode.text import tokenize

    states = build_text_states(text_model, texts, 4, progress=False, batch_size=5)
    lengths = tokenize(text_model, sorted(set(texts)))["attention_mask"].sum(dim=1).numpy()
    np.testing.assert_array_equal(states.lengths, lengths)  # only real tokens are stored
    assert states.tokens.shape == (lengths.sum(), 384) and states.tokens.dtype == torch.float32
    hidden, mask = states.padded(np.array([2, 0]))
    assert hidden.shape == (2, max(lengths[[2, 0]]), 384) and mask.sum(dim=1).tolist() == lengths[[2, 0]].tolist()
    assert not hidden[1, lengths[0]:].any()
    half = build_text_states(text_model, texts, 4, progress=False, dtype="float16")
    assert half.tokens.dtype == torch.float16 and half.nbytes < 0.6 * states.nbytes
    torch.testing.assert_close(half.tokens.float(), states.tokens, rtol=2e-3, atol=2e-3)


def test_frozen_states_are_refused_for_other_texts_or_weights(text_model) -> None:
    dataset = tiny_dataset(2)
    encoder = ContentEncoder(ContentEncoderConfig(out_dim=8), text_model=copy.deepcopy(text_model)).fit(
        dataset, progress=False, keep_frozen_states=1).set_trainable(1)
    texts = item_texts(dataset)
    assert encoder.usable_states(texts) is encoder.frozen_states_
    assert encoder.usable_states(texts[::-1]) is None  # other texts
    encoder.set_trainable(2)
    assert encoder.usable_states(texts) is None  # another split
    encoder.set_trainable(1)
    with torch.no_grad():
        encoder.transformer_layers()[0].output.dense.bias.add_(0.1)  # a "frozen" layer changed
    assert encoder.usable_states(texts) is None
    # encode_items then falls back to the whole text model: still right
    full = copy.deepcopy(encoder)
    full.frozen_states_ = None
    np.testing.assert_allclose(encode_items(encoder, dataset, progress=False),
                               encode_items(full, dataset, progress=False), atol=1e-6)


def test_fit_with_a_cached_text_pass_runs_only_the_frozen_layers(text_model, tmp_path, monkeypatch) -> None:
    dataset = tiny_dataset(2)
    cache = VectorCache(tmp_path)
    first = ContentEncoder(ContentEncoderConfig(out_dim=8), text_model=copy.deepcopy(text_model)).fit(
        dataset, progress=False, cache=cache, keep_frozen_states=2)
    import qarm.encode.frozen as frozen

    def no_top_layers(model, hidden, mask, start, stop=None):
        assert stop is not None and stop <= 4, "only the frozen layers may run"
        return original(model, hidden, mask, start, stop)

    original = frozen.run_layers
    monkeypatch.setattr(frozen, "run_layers", no_top_layers)
    second = ContentEncoder(ContentEncoderConfig(out_dim=8), text_model=copy.deepcopy(text_model)).fit(
        dataset, progress=False, cache=cache, keep_frozen_states=2)
    monkeypatch.undo()
    torch.testing.assert_close(second.frozen_states_.tokens, first.frozen_states_.tokens)
    torch.testing.assert_close(second.frozen_states_.pooled, first.frozen_states_.pooled)


# -- the residual MLP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
def test_residual_mlp_starts_as_the_identity(text_model, fusion) -> None:
    """The pre-trained representation does not depend on the residual MLP: its output layer starts at 0."""
    dataset = tiny_dataset(2)
    with_mlp = make_encoder(text_model, dataset, out_dim=8, fusion=fusion, residual_hidden=16)
    without = make_encoder(text_model, dataset, out_dim=8, fusion=fusion, residual_hidden=0)
    assert without.residual is None and with_mlp.residual[0].in_features == 2 * 8
    np.testing.assert_allclose(encode_items(with_mlp, dataset, progress=False),
                               encode_items(without, dataset, progress=False), atol=1e-6)
    with torch.no_grad():  # once trained it changes the vectors, item by item
        with_mlp.residual[2].weight.normal_(0, 0.5)
    moved = encode_items(with_mlp, dataset, progress=False)
    assert np.abs(moved - encode_items(without, dataset, progress=False)).max() > 0.05
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-5)


def test_residual_mlp_round_trips_and_old_records_load_without_it(text_model, tmp_path) -> None:
    dataset = tiny_dataset(2)
    encoder = make_encoder(text_model, dataset, out_dim=8, residual_hidden=16).set_trainable(0)
    with torch.no_grad():
        encoder.residual[2].weight.add_(0.1)
    before = encode_items(encoder, dataset, progress=False)
    save_encoder(encoder, tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc", text_model=copy.deepcopy(text_model))
    np.testing.assert_allclose(encode_items(loaded, dataset, progress=False), before, atol=1e-6)
    # an encoder saved before residual_hidden existed: its record lacks the key and its weights the MLP
    plain = make_encoder(text_model, dataset, out_dim=8, residual_hidden=0).set_trainable(0)
    save_encoder(plain, tmp_path / "old")
    record = json.loads((tmp_path / "old" / "encoder.json").read_text())
    del record["config"]["residual_hidden"]
    (tmp_path / "old" / "encoder.json").write_text(json.dumps(record))
    old = load_encoder(tmp_path / "old", text_model=copy.deepcopy(text_model))
    assert old.residual is None
    np.testing.assert_allclose(encode_items(old, dataset, progress=False),
                               encode_items(plain, dataset, progress=False), atol=1e-6)


def test_residual_hidden_must_be_a_non_negative_int() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="'residual_hidden' parameter of ContentEncoderConfig must be an int >= 0"):
            ContentEncoderConfig(residual_hidden=bad)
