"""A deterministic synthetic short-video dataset whose latent truth is known (loader ``"synthetic"``).

It carries the structure the QARM paper is about: what an item *says* (its content topic, visible in
its title) only partly agrees with how users *behave* towards it (its business group). The model::

    topic        t_i ~ Uniform(n_topics)                            -> title words, category
    business     g_i = map(t_i): some topics split into two groups, some pairs of topics merge into
                 one group, the rest map 1:1; a fraction of items get a random group instead
    item vector  b_i = c_{g_i} + noise          (c_g: unit centroid of group g in R^business_dim)
    user         theta_u ~ Dirichlet(interest_alpha) over groups,  v_u = sum_g theta_ug c_g + noise
    popularity   w_i = rank_i^-zipf_exponent   (ranks a random permutation: a long tail)
    arrival      created_at_i: part of the catalogue exists before the window, the rest arrives
                 uniformly during it; an exposure at time t only shows items created before t
    exposure     interest-driven: g ~ theta_u, then an available item of g by popularity;
                 otherwise popularity-driven: an available item by popularity
    click        p_click = (1 - label_noise) * sigmoid(a <v_u, b_i> + b quality_i + c) + label_noise / 2
    conversion   only after a click, with probability
                 sigmoid(a' <v_u, b_i> + b' quality_i + offset_{g_i} + c')

Every stage draws from its own random stream seeded by ``(seed, stage)``, so a dataset is a pure
function of its :class:`SyntheticConfig`. The latent truth is kept in ``Dataset.ground_truth``
(``items``, ``users``, ``interactions``, ``topic_business``) for evaluating alignment and models
against the generator; no model reads it.

Everything is vectorised (``np.searchsorted`` over cumulative popularity of the items sorted by
creation time, processed in chunks of exposures): 1M items and 10M exposures take well under two
minutes (see ``benchmarks/synthetic_scale.py``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qarm.config import to_dict
from qarm.data import schema as S
from qarm.data.build import sequence_numbers
from qarm.data.loaders.registry import register
from qarm.data.schema import Dataset, DatasetMeta
from qarm.data.validate import validate_dataset
from qarm.errors import ConfigError

WORDS_FILE = "synthetic_words.json"
EPOCH_2024 = 1_704_067_200  # 2024-01-01T00:00:00Z
DAY = 86_400
AGE_BUCKETS = 6
REGIONS = 8
TOP_INTERESTS = 3  # interest groups kept per user in the ground truth
CHUNK = 1_000_000  # exposures simulated at a time (bounds the temporary memory)

# Topic kinds in the topic -> business map.
SPLIT = "split"
MERGE = "merge"
ONE_TO_ONE = "one_to_one"

# Random stream of each stage; a new stage takes a new number, so old ones keep their draws.
_STREAMS = {"business_map": 0, "groups": 1, "items": 2, "titles": 3, "users": 4, "activity": 5, "times": 6,
            "exposures": 7}


@dataclass
class SyntheticConfig:
    """Parameters of the generator. Every default is chosen for a small, quick dataset whose
    structure (long tail, cold items, split / merged topics) is still clearly measurable."""

    seed: int = 0  # the dataset is a pure function of the config; 0 is the documented default
    n_items: int = 5000  # enough items for a long tail and a cold-start tail, small enough for tests
    n_users: int = 2000  # about 100 exposures per user on average: sequences long enough for models
    n_interactions: int = 200_000  # exposures (clicked or not); a few seconds to train on with a CPU
    n_topics: int = 20  # content topics, each with its own title vocabulary (up to 24 word lists ship)
    n_split_topics: int = 3  # topics whose items split into two business groups (same words, two behaviours)
    n_merged_pairs: int = 3  # pairs of topics sharing one business group (different words, same users)
    random_business_fraction: float = 0.05  # items whose business group ignores their topic entirely
    business_dim: int = 16  # dimension of business vectors: enough room for ~20 near-orthogonal centroids
    item_noise: float = 0.35  # norm of an item's offset from its unit group centroid: groups stay separable
    user_noise: float = 0.35  # norm of a user's offset from their interest mix: tastes are not exact mixes
    zipf_exponent: float = 1.0  # popularity ~ rank^-s; s = 1 is the classic long tail of video views
    interest_alpha: float = 0.1  # Dirichlet concentration of user interests; < 1 gives 1-3 dominant groups
    interest_fraction: float = 0.7  # exposures driven by interest (the rest by global popularity)
    user_activity_sigma: float = 1.0  # lognormal sigma of exposures per user: a few heavy users
    min_user_exposures: int = 5  # every user has a sequence to split into train / valid / test
    start_time: int = EPOCH_2024  # first second of the exposure window (unix seconds)
    time_span_seconds: int = 90 * DAY  # a quarter of a year: room for many item arrivals
    initial_item_fraction: float = 0.5  # items created before the window; the rest arrive during it (cold)
    click_affinity: float = 4.0  # a: weight of <user vector, item business vector> in the click logit
    click_quality: float = 0.5  # b: weight of the latent item quality (~N(0, 1)) in the click logit
    click_bias: float = -3.0  # c: sets the overall click rate near 20% of exposures
    convert_affinity: float = 2.0  # weight of the affinity in the conversion logit (given a click)
    convert_quality: float = 0.5  # weight of the item quality in the conversion logit
    convert_bias: float = -2.0  # sets conversion near a third of clicks, i.e. about 6% of exposures
    group_convert_spread: float = 1.0  # std of per-group conversion logit offsets (business behaviour)
    label_noise: float = 0.02  # fraction of clicks that are coin flips (accidental clicks / misses)

    def __post_init__(self) -> None:
        at_least = {
            "n_items": 1, "n_users": 1, "n_topics": 1, "business_dim": 1, "min_user_exposures": 1,
            "time_span_seconds": 1, "seed": 0, "n_split_topics": 0, "n_merged_pairs": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        non_negative = ("item_noise", "user_noise", "zipf_exponent", "user_activity_sigma", "group_convert_spread")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("random_business_fraction", "interest_fraction", "label_noise"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if not 0 < self.initial_item_fraction <= 1:
            raise ConfigError(f"initial_item_fraction must be in (0, 1], got {self.initial_item_fraction}")
        if not self.interest_alpha > 0:
            raise ConfigError(f"interest_alpha must be > 0, got {self.interest_alpha}")
        for name in ("click_affinity", "click_quality", "click_bias", "convert_affinity", "convert_quality",
                     "convert_bias"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        available = len(_words()["topics"])
        if self.n_topics > available:
            raise ConfigError(f"n_topics must be <= {available} (the word lists in {WORDS_FILE}), "
                              f"got {self.n_topics}")
        used = self.n_split_topics + 2 * self.n_merged_pairs
        if used > self.n_topics:
            raise ConfigError(f"n_split_topics + 2 * n_merged_pairs must be <= n_topics ({self.n_topics}), "
                              f"got {used}")
        needed = self.n_users * self.min_user_exposures
        if self.n_interactions < needed:
            raise ConfigError(f"n_interactions must be >= n_users * min_user_exposures ({needed}), "
                              f"got {self.n_interactions}")

    @property
    def n_groups(self) -> int:
        """Number of business groups: one per topic, plus one per split, minus one per merged pair."""
        return self.n_topics + self.n_split_topics - self.n_merged_pairs


@register(
    "synthetic",
    config=SyntheticConfig,
    description="generated short videos with known topics, business groups and click model (no download)",
    needs_source=False,
    shared_folder=None,
)
def load_synthetic(source: Path | None, config: SyntheticConfig) -> Dataset:
    """The registry's entry point; ``source`` is ignored (the data is generated)."""
    return generate(config)


def generate(config: SyntheticConfig | None = None, *, timings: dict[str, float] | None = None) -> Dataset:
    """Generate the dataset described in the module docstring.

    Parameters
    ----------
    config : the generator parameters (defaults when ``None``).
    timings : if given, filled with the wall seconds of each phase (``items``, ``users``, ...).

    Returns
    -------
    A validated :class:`Dataset`: ``items`` (n_items rows), ``users`` (n_users rows), ``interactions``
    (n_interactions rows sorted by user then time, labels ``click`` / ``convert`` as int8) and
    ``ground_truth`` with the latent model.
    """
    config = config or SyntheticConfig()
    clock = _Clock(timings)

    table = topic_business_table(config)
    centroids, convert_offset = _business_groups(config)
    clock.lap("business_map")

    items = _make_items(config, table, centroids)
    clock.lap("items")
    titles = _make_titles(config, items.topic)
    clock.lap("titles")
    users = _make_users(config, centroids)
    clock.lap("users")
    user_ids, times = _exposure_slots(config)
    clock.lap("exposure_times")
    events = _simulate(config, items, users, convert_offset, user_ids, times)
    clock.lap("exposures")

    dataset = _assemble(config, table, items, titles, users, user_ids, times, events)
    clock.lap("assemble")
    validate_dataset(dataset)
    clock.lap("validate")
    return dataset


def topic_business_table(config: SyntheticConfig | None = None) -> pd.DataFrame:
    """The topic -> business group map of ``config``: one row per (topic, group) pair.

    Columns: ``topic`` (int), ``topic_name``, ``kind`` (``"split"``: the topic's items divide between
    two groups; ``"merge"``: the group also holds another topic; ``"one_to_one"``), ``business_group``
    (int, ``0..n_groups-1``) and ``business_name``. Which topics split or merge is drawn from the seed.
    """
    config = config or SyntheticConfig()
    names = [t["name"] for t in _words()["topics"][: config.n_topics]]
    order = _rng(config.seed, "business_map").permutation(config.n_topics)
    n_split = config.n_split_topics
    split = set(order[:n_split].tolist())
    partner = {}
    for a, b in order[n_split: n_split + 2 * config.n_merged_pairs].reshape(-1, 2).tolist():
        partner[a], partner[b] = b, a

    rows: list[tuple[int, str, str, int, str]] = []
    group_of: dict[int, int] = {}
    next_group = 0
    for topic, name in enumerate(names):
        if topic in split:
            for part in ("1", "2"):
                rows.append((topic, name, SPLIT, next_group, f"{name}/{part}"))
                next_group += 1
        elif topic in partner:
            other = partner[topic]
            if other not in group_of:
                group_of[topic] = next_group
                next_group += 1
            else:
                group_of[topic] = group_of[other]
            pair = "+".join(names[t] for t in sorted((topic, other)))
            rows.append((topic, name, MERGE, group_of[topic], pair))
        else:
            rows.append((topic, name, ONE_TO_ONE, next_group, name))
            next_group += 1
    return pd.DataFrame(rows, columns=["topic", "topic_name", "kind", "business_group", "business_name"])


def business_vectors(ground_truth_items: pd.DataFrame) -> np.ndarray:
    """The ``(n_items, business_dim)`` float32 business vectors (columns ``b0..``) of the truth table."""
    columns = [c for c in ground_truth_items.columns if c.startswith("b") and c[1:].isdigit()]
    columns.sort(key=lambda c: int(c[1:]))
    return ground_truth_items[columns].to_numpy(dtype=np.float32)


def business_similarity(ground_truth_items: pd.DataFrame, a_ids: Any, b_ids: Any) -> np.ndarray:
    """Cosine similarity of the business vectors of items ``a_ids[k]`` and ``b_ids[k]``.

    ``a_ids`` and ``b_ids`` are item ids (broadcastable integer arrays, e.g. both shape ``(n,)``); the
    result has their broadcast shape, float32 in ``[-1, 1]``.
    """
    vectors = business_vectors(ground_truth_items)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, np.float32(1e-12))
    a = unit[np.asarray(a_ids, dtype=np.int64)]
    b = unit[np.asarray(b_ids, dtype=np.int64)]
    return np.einsum("...d,...d->...", a, b).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Stages


@dataclass
class _Items:
    """Item latents, arrays of length n_items: ``topic``, ``group`` (business group), ``random_group``
    (bool), ``vectors`` ``(n_items, business_dim)`` float32, ``quality`` float32, ``popularity``
    (normalised weights, float64), ``created_at`` int64 unix seconds."""

    topic: np.ndarray
    group: np.ndarray
    random_group: np.ndarray
    vectors: np.ndarray
    quality: np.ndarray
    popularity: np.ndarray
    created_at: np.ndarray


@dataclass
class _Users:
    """User latents: ``interest`` ``(n_users, n_groups)`` float32 rows summing to 1, ``vectors``
    ``(n_users, business_dim)`` float32, side features ``age_bucket`` and ``region`` (int16)."""

    interest: np.ndarray
    vectors: np.ndarray
    age_bucket: np.ndarray
    region: np.ndarray


def _business_groups(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Unit centroids ``(n_groups, business_dim)`` float32 and conversion offsets ``(n_groups,)``."""
    rng = _rng(config.seed, "groups")
    centroids = rng.standard_normal((config.n_groups, config.business_dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    offsets = rng.normal(0.0, config.group_convert_spread, config.n_groups)
    return centroids.astype(np.float32), offsets.astype(np.float32)


def _make_items(config: SyntheticConfig, table: pd.DataFrame, centroids: np.ndarray) -> _Items:
    rng = _rng(config.seed, "items")
    n, dim = config.n_items, config.business_dim
    topic = rng.integers(0, config.n_topics, n)
    # A split topic's groups are consecutive: its items take the first or the second at random.
    first_group = table.groupby("topic")["business_group"].min().to_numpy()
    is_split = (table.groupby("topic")["kind"].first() == SPLIT).to_numpy()
    group = first_group[topic] + (is_split[topic] & (rng.random(n) < 0.5))
    random_group = rng.random(n) < config.random_business_fraction
    group[random_group] = rng.integers(0, config.n_groups, int(random_group.sum()))

    noise = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(config.item_noise / math.sqrt(dim))
    vectors = centroids[group] + noise
    quality = rng.standard_normal(n, dtype=np.float32)
    ranks = rng.permutation(n) + 1.0
    popularity = ranks ** -config.zipf_exponent
    popularity /= popularity.sum()

    span = config.time_span_seconds
    initial = rng.random(n) < config.initial_item_fraction
    initial[rng.integers(0, n)] = True  # at least one item exists before the first exposure
    offset = rng.integers(0, span, n)
    created_at = np.where(initial, config.start_time - span + offset, config.start_time + offset)
    return _Items(topic.astype(np.int16), group.astype(np.int16), random_group, vectors, quality, popularity,
                  created_at.astype(np.int64))


def _make_titles(config: SyntheticConfig, topic: np.ndarray) -> list[str]:
    """Short-video titles, ``"<opener> <2-4 topic words> <closer> #<topic tag> [#<generic tag>]"``, with
    opener and closer optional. Built with element-wise string addition on object arrays."""
    rng = _rng(config.seed, "titles")
    words = _words()
    topics = words["topics"][: config.n_topics]
    n = len(topic)

    def tokens(values: list[str], prefix: str = " ") -> np.ndarray:
        return np.array([prefix + v for v in values], dtype=object)

    vocab = np.stack([tokens(t["words"]) for t in topics])  # (n_topics, L)
    tags = np.stack([tokens(t["hashtags"], " #") for t in topics])  # (n_topics, H)
    n_vocab = vocab.shape[1]
    # Distinct words: start anywhere and step by a number coprime with the list length.
    steps = np.array([k for k in range(1, n_vocab) if math.gcd(k, n_vocab) == 1] or [1])
    start = rng.integers(0, n_vocab, n)
    step = steps[rng.integers(0, len(steps), n)]
    n_words = rng.integers(2, 5, n)

    def optional(choices: np.ndarray, probability: float) -> np.ndarray:
        picked = choices[rng.integers(0, len(choices), n)]
        return np.where(rng.random(n) < probability, picked, "")

    title = optional(tokens(words["openers"]), 0.6)
    for j in range(4):
        word = vocab[topic, (start + j * step) % n_vocab]
        title = title + np.where(j < n_words, word, "")
    title = title + optional(tokens(words["closers"]), 0.7)
    title = title + tags[topic, rng.integers(0, tags.shape[1], n)]
    title = title + optional(tokens(words["generic_hashtags"], " #"), 0.4)
    return [t[1:] for t in title]  # every token starts with a space


def _make_users(config: SyntheticConfig, centroids: np.ndarray) -> _Users:
    rng = _rng(config.seed, "users")
    n, dim = config.n_users, config.business_dim
    interest = rng.dirichlet(np.full(config.n_groups, config.interest_alpha), n)
    # Tiny concentrations can underflow every component of a row; such a user likes one group.
    empty = ~(interest.sum(axis=1) > 0)
    interest[empty] = np.eye(config.n_groups)[rng.integers(0, config.n_groups, int(empty.sum()))]
    interest = interest.astype(np.float32)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(config.user_noise / math.sqrt(dim))
    vectors = interest @ centroids + noise

    # Side features: the age bucket follows the top interest group's audience (strongly), the region
    # weakly; each group has a home bucket / region.
    top = interest.argmax(axis=1)
    home_age = rng.integers(0, AGE_BUCKETS, config.n_groups)
    home_region = rng.integers(0, REGIONS, config.n_groups)
    age = np.where(rng.random(n) < 0.7, home_age[top], rng.integers(0, AGE_BUCKETS, n))
    region = np.where(rng.random(n) < 0.3, home_region[top], rng.integers(0, REGIONS, n))
    return _Users(interest, vectors, age.astype(np.int16), region.astype(np.int16))


def _exposure_slots(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Who is exposed when: ``user_ids`` and ``times`` (int64, length n_interactions), sorted by user
    then time. Exposures per user are ``min_user_exposures`` plus a lognormal-weighted share of the rest."""
    rng = _rng(config.seed, "activity")
    weight = rng.lognormal(0.0, config.user_activity_sigma, config.n_users)
    extra = config.n_interactions - config.n_users * config.min_user_exposures
    counts = config.min_user_exposures + rng.multinomial(extra, weight / weight.sum())

    rng = _rng(config.seed, "times")
    span = config.time_span_seconds
    user_ids = np.repeat(np.arange(config.n_users, dtype=np.int64), counts)
    # One sort of (user, offset) keys orders every user's exposures in time.
    keys = user_ids * span + rng.integers(0, span, config.n_interactions)
    keys.sort()
    user_ids = keys // span
    times = keys - user_ids * span + config.start_time
    return user_ids, times


class _Catalogue:
    """Sampling by popularity among the items of a group created before a time, vectorised.

    Items are sorted by ``(group, created_at)``; ``keys`` encode that order as one int64 and ``mass``
    is the cumulative popularity (``mass[k]`` = weight of the first ``k`` sorted items). The items of
    group ``g`` available at time ``t`` are the sorted positions ``[start[g], searchsorted(keys,
    key(g, t)))``, and an inverse-CDF draw inside that range is another ``searchsorted``.
    """

    def __init__(self, group: np.ndarray, created_at: np.ndarray, popularity: np.ndarray, n_groups: int,
                 latest: int) -> None:
        self.origin = int(created_at.min())
        self.stride = int(max(latest, int(created_at.max())) - self.origin + 1)
        self.order = np.lexsort((created_at, group))
        group = group.astype(np.int64)
        self.keys = group[self.order] * self.stride + (created_at[self.order] - self.origin)
        self.mass = np.concatenate([[0.0], np.cumsum(popularity[self.order])])
        self.start = np.searchsorted(group[self.order], np.arange(n_groups))

    def sample(self, group: np.ndarray, t: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item ids drawn for queries ``(group[k], t[k])`` with uniforms ``u[k]`` in [0, 1), and a mask of
        the queries that had at least one available item (the others hold an arbitrary id)."""
        lo = self.start[group]
        hi = np.searchsorted(self.keys, group.astype(np.int64) * self.stride + (t - self.origin), side="left")
        found = hi > lo
        target = self.mass[lo] + u * (self.mass[hi] - self.mass[lo])
        position = np.searchsorted(self.mass, target, side="right") - 1
        position = np.clip(position, lo, np.maximum(hi - 1, lo))
        return self.order[np.minimum(position, len(self.order) - 1)], found


@dataclass
class _Events:
    """Per-exposure outcomes, aligned with the exposure slots: ``item_id`` int64, ``click`` and
    ``convert`` int8, ``p_click`` and ``p_convert`` float32, ``interest_driven`` bool."""

    item_id: np.ndarray
    click: np.ndarray
    convert: np.ndarray
    p_click: np.ndarray
    p_convert: np.ndarray
    interest_driven: np.ndarray


def _simulate(config: SyntheticConfig, items: _Items, users: _Users, convert_offset: np.ndarray,
              user_ids: np.ndarray, times: np.ndarray) -> _Events:
    """Pick the item of every exposure and draw its labels, ``CHUNK`` exposures at a time."""
    n = len(user_ids)
    latest = config.start_time + config.time_span_seconds
    by_group = _Catalogue(items.group, items.created_at, items.popularity, config.n_groups, latest)
    everything = _Catalogue(np.zeros(config.n_items, dtype=np.int16), items.created_at, items.popularity, 1,
                            latest)
    interest_cdf = np.cumsum(users.interest, axis=1)
    events = _Events(np.empty(n, np.int64), np.empty(n, np.int8), np.empty(n, np.int8), np.empty(n, np.float32),
                     np.empty(n, np.float32), np.empty(n, bool))

    for chunk, lo in enumerate(range(0, n, CHUNK)):
        rng = _rng(config.seed, "exposures", chunk)
        hi = min(lo + CHUNK, n)
        m = hi - lo
        user, t = user_ids[lo:hi], times[lo:hi]

        item, _ = everything.sample(np.zeros(m, dtype=np.int64), t, rng.random(m))
        driven = rng.random(m) < config.interest_fraction
        rows = np.flatnonzero(driven)
        cdf = interest_cdf[user[rows]]
        group = (cdf < rng.random(len(rows), dtype=np.float32)[:, None] * cdf[:, -1:]).sum(axis=1)
        chosen, found = by_group.sample(np.minimum(group, config.n_groups - 1), t[rows], rng.random(len(rows)))
        item[rows[found]] = chosen[found]
        driven[rows[~found]] = False  # the group had nothing yet: the popularity draw stands

        affinity = np.einsum("ij,ij->i", users.vectors[user], items.vectors[item])
        quality = items.quality[item]
        p_click = (1 - config.label_noise) * _sigmoid(
            config.click_affinity * affinity + config.click_quality * quality + config.click_bias
        ) + config.label_noise / 2
        p_given_click = _sigmoid(config.convert_affinity * affinity + config.convert_quality * quality
                                 + convert_offset[items.group[item]] + config.convert_bias)
        click = rng.random(m) < p_click
        convert = click & (rng.random(m) < p_given_click)

        events.item_id[lo:hi] = item
        events.click[lo:hi] = click
        events.convert[lo:hi] = convert
        events.p_click[lo:hi] = p_click
        events.p_convert[lo:hi] = p_click * p_given_click
        events.interest_driven[lo:hi] = driven
    return events


def _assemble(config: SyntheticConfig, table: pd.DataFrame, items: _Items, titles: list[str], users: _Users,
              user_ids: np.ndarray, times: np.ndarray, events: _Events) -> Dataset:
    """The contract tables, the metadata and the ground truth."""
    n_items, n_users, dim = config.n_items, config.n_users, config.business_dim
    item_ids = np.arange(n_items, dtype=np.int64)
    topic_names = np.array([t["name"] for t in _words()["topics"][: config.n_topics]], dtype=object)
    items_table = pd.DataFrame({
        S.ITEM_ID: item_ids,
        S.SOURCE_ID: item_ids.astype(str),
        "title": titles,
        S.CATEGORY: topic_names[items.topic],
        S.CREATED_AT: items.created_at,
    })
    users_table = pd.DataFrame({
        S.USER_ID: np.arange(n_users, dtype=np.int64),
        S.SOURCE_ID: np.arange(n_users).astype(str),
        "age_bucket": users.age_bucket,
        "region": users.region,
    })
    interactions = pd.DataFrame({
        S.USER_ID: user_ids,
        S.ITEM_ID: events.item_id,
        S.TIME: times,
        S.SEQ: sequence_numbers(user_ids),
        "click": events.click,
        "convert": events.convert,
    })

    kind = table.groupby("topic")["kind"].first().to_numpy()
    truth_items = pd.concat([
        pd.DataFrame({
            S.ITEM_ID: item_ids,
            "topic": items.topic,
            "topic_name": topic_names[items.topic],
            "business_group": items.group,
            "topic_kind": kind[items.topic],
            "random_business": items.random_group,
            "quality": items.quality,
            "popularity": items.popularity.astype(np.float32),
        }),
        pd.DataFrame(items.vectors, columns=[f"b{k}" for k in range(dim)]),
    ], axis=1)

    n_top = min(TOP_INTERESTS, config.n_groups)
    top = np.argsort(-users.interest, axis=1, kind="stable")[:, :n_top]
    top_weight = np.take_along_axis(users.interest, top, axis=1)
    truth_users: dict[str, np.ndarray] = {S.USER_ID: np.arange(n_users, dtype=np.int64)}
    for k in range(TOP_INTERESTS):
        has = k < n_top
        truth_users[f"top{k + 1}_group"] = top[:, k].astype(np.int16) if has else np.full(n_users, -1, np.int16)
        truth_users[f"top{k + 1}_weight"] = top_weight[:, k] if has else np.zeros(n_users, np.float32)
    truth_users_table = pd.concat([pd.DataFrame(truth_users),
                                   pd.DataFrame(users.vectors, columns=[f"u{k}" for k in range(dim)])], axis=1)
    truth_interactions = pd.DataFrame({
        "p_click": events.p_click,
        "p_convert": events.p_convert,
        "interest_driven": events.interest_driven,
    })

    meta = DatasetMeta(
        name="synthetic",
        source="generated",
        loader="synthetic",
        config=to_dict(config),
        seed=config.seed,
        time_unit="seconds",
        text_columns=["title"],
        label_columns=["click", "convert"],
        user_feature_columns=["age_bucket", "region"],
        positive_only=False,
        notes=[
            f"synthetic: {config.n_topics} content topics (title words) mapped to {config.n_groups} business "
            f"groups ({config.n_split_topics} topics split in two, {config.n_merged_pairs} pairs merged, "
            f"{config.random_business_fraction:.0%} of items in a random group)",
            "exposures: interest-driven (group ~ user interest, item by Zipf popularity among items created "
            "before the exposure) or popularity-driven; click ~ sigmoid(a <user, item business vector> + "
            "b quality + c), conversion only after a click",
            "ground_truth/: items (topic, business group, vectors b*), users (top interests, vectors u*), "
            "interactions (p_click, p_convert, interest_driven; row-aligned), topic_business (the map)",
        ],
    )
    dataset = Dataset(
        items=items_table,
        interactions=interactions,
        users=users_table,
        meta=meta,
        ground_truth={
            "items": truth_items,
            "users": truth_users_table,
            "interactions": truth_interactions,
            "topic_business": table,
        },
    )
    dataset.meta.counts = dataset.compute_counts()
    return dataset


# --------------------------------------------------------------------------------------------------
# Helpers


class _Clock:
    """Records the wall time of consecutive phases into ``timings`` (when given)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[phase] = now - self.last
        self.last = now


@lru_cache(maxsize=1)
def _words() -> dict[str, Any]:
    """The packaged word lists (``synthetic_words.json``)."""
    text = resources.files("qarm.data").joinpath(WORDS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _rng(seed: int, stream: str, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], *index])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
