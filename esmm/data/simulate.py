"""Impression simulator with known ground truth: the built-in default data source.

It writes the canonical impression table (esmm/data/table.py) with an Ali-CCP-like field set and
two ground-truth columns that are never features: ``true_ctr`` = p(click | impression) and
``true_cvr`` = p(conversion | click, impression), defined for every impression, clicked or not,
so models can be scored on the entire space and sample selection bias measured directly.

The hidden world (users, items, their latents) depends on ``(preset, seed)`` only; one day's
impressions on ``(preset, seed, day)`` only. A later day can therefore be appended to an
existing table and it continues the same world.

Generative model, per impression of item i to user u in slot ``pos`` at ``hour``::

    intent   ~ N(0, intent_scale)                        hidden, in no feature
    match    = item category in u's interest categories
    affinity = pref[segment(u), category(i)] + pref_shop[segment(u), shop(i)]
    ctr_logit = b_ctr + look_i + 0.5 quality_i + 0.8 match + affinity + click_bias_u
                - 0.5 log(pos) + hour_effect(hour) - 0.1 price_z_i + intent
    cvr_logit = b_cvr + fit_i + 0.6 quality_i + 0.8 match + affinity + buy_bias_u
                - price_sensitivity(city_tier(u)) price_z_i + intent
    true_ctr = sigmoid(ctr_logit); true_cvr = sigmoid(cvr_logit)
    click ~ Bernoulli(true_ctr); conversion = click * Bernoulli(true_cvr)

``look`` (attractiveness) drives clicks only, ``fit`` (value for money) conversions only,
``quality`` both; a fraction of items are clickbait (look up, fit down). Item latents are
partly shared by their category, shop and brand, so those fields generalise to rare items. The
hidden ``intent`` raises both probabilities, so clicked impressions convert more often than
unclicked ones with the same features: training on clicks alone is biased. The intercepts
``b_ctr``/``b_cvr`` are solved by bisection on a calibration draw so the realised CTR and
conversions per click hit the preset's targets.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import pyarrow as pa

from esmm.data.table import CLICK, CONVERSION, DAY, TRUTH_COLUMNS, FieldKind, TableSchema

TRUE_CTR, TRUE_CVR = TRUTH_COLUMNS

_FIELD_KINDS: dict[str, FieldKind] = {
    "user_id": FieldKind.SINGLE,
    "user_age_bucket": FieldKind.SINGLE,
    "user_gender": FieldKind.SINGLE,
    "user_city_tier": FieldKind.SINGLE,
    "user_interest_categories": FieldKind.MULTI,
    "item_id": FieldKind.SINGLE,
    "item_category": FieldKind.SINGLE,
    "item_shop": FieldKind.SINGLE,
    "item_brand": FieldKind.SINGLE,
    "item_price_bucket": FieldKind.SINGLE,
    "user_segment_x_category": FieldKind.SINGLE,
    "user_segment_x_shop": FieldKind.SINGLE,
    "context_position": FieldKind.SINGLE,
    "context_hour": FieldKind.SINGLE,
    "item_price_log": FieldKind.DENSE,
}

# Effect sizes of the generative model (module docstring). Latent scales are ~0.5-0.8 sd.
_MATCH_EFFECT = 0.8  # item category among the user's interests (click and conversion)
_POSITION_EFFECT = 0.5  # ctr_logit -= this * log(slot)
_HOUR_EFFECT = 0.15  # evening peak of the click logit
_PRICE_ON_CLICK = 0.1  # ctr_logit -= this * price_z
_QUALITY_ON_CLICK, _QUALITY_ON_CONVERSION = 0.5, 0.6
_CLICKBAIT_SHIFT = 1.5  # clickbait items: look += shift, fit -= shift
_MAX_INTERESTS = 6
_INTEREST_COUNT_P = np.array([0.2, 0.25, 0.2, 0.15, 0.1, 0.1])  # 1..6 interest categories
_N_HOURS = 24
_LOGIT_BOUND = 30.0  # keeps true_ctr/true_cvr strictly inside (0, 1)

# Independent random streams: the world, the intercept calibration draw, one stream per day.
_WORLD_STREAM, _CALIBRATION_STREAM, _DAY_STREAM = 0, 1, 2


@dataclass(frozen=True)
class SimulatorPreset:
    """Sizes and target rates of one simulated world.

    Popularity of users and items is Zipf-Mandelbrot: impression probability of the item of
    popularity rank r is proportional to 1 / (r + offset)^zipf (ranks shuffled over ids).
    ``targeted_fraction`` of impressions show an item from one of the user's interest
    categories (as a recommender would), the rest a popular item regardless of the user.
    """

    name: str
    target_ctr: float  # clicks per impression
    target_cvr: float  # conversions per click
    n_users: int
    n_items: int
    n_categories: int
    n_shops: int
    n_brands: int
    n_positions: int = 10
    n_age_buckets: int = 7
    n_genders: int = 2
    n_city_tiers: int = 5
    n_price_buckets: int = 10
    user_zipf: float = 1.0
    user_zipf_offset: float = 20.0
    item_zipf: float = 1.05
    item_zipf_offset: float = 5.0
    clickbait_fraction: float = 0.08
    targeted_fraction: float = 0.35
    intent_scale: float = 1.0
    calibration_rows: int = 400_000

    def __post_init__(self) -> None:
        if not (0 < self.target_ctr < 1 and 0 < self.target_cvr < 1):
            raise ValueError(f"preset {self.name!r}: target rates must lie in (0, 1)")
        if self.n_categories < _MAX_INTERESTS:
            raise ValueError(f"preset {self.name!r}: needs at least {_MAX_INTERESTS} categories")
        if min(self.n_items, self.n_shops, self.n_brands) < self.n_categories:
            raise ValueError(
                f"preset {self.name!r}: every category needs an item, a shop and a brand"
            )


PRESETS: dict[str, SimulatorPreset] = {
    # Enough conversions for stable metrics on a few hundred thousand impressions.
    "default": SimulatorPreset(
        name="default",
        target_ctr=0.08,
        target_cvr=0.12,
        n_users=20_000,
        n_items=5_000,
        n_categories=100,
        n_shops=600,
        n_brands=400,
    ),
    # Public Ali-CCP rates (CTR 3.9%, conversions per click 0.55%), larger vocabularies.
    "ali-ccp": SimulatorPreset(
        name="ali-ccp",
        target_ctr=0.039,
        target_cvr=0.0055,
        n_users=100_000,
        n_items=200_000,
        n_categories=400,
        n_shops=20_000,
        n_brands=10_000,
    ),
}


def simulator_schema() -> TableSchema:
    """The feature fields of a simulated table (labels, ``day`` and ground truth excluded)."""
    return TableSchema.of(_FIELD_KINDS)


def simulate_impressions(
    n_rows: int,
    *,
    preset: str = "default",
    n_days: int = 8,
    start_day: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> pa.Table:
    """``n_rows`` impressions over days ``start_day .. start_day + n_days - 1``.

    Rows split evenly across days; the remainder of ``n_rows / n_days`` goes one row each to
    the last days. The result equals the concatenation of :func:`simulate_day` for each day
    with its share of rows, so a later day continues the same world.
    """
    if n_rows <= 0:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    if n_days <= 0:
        raise ValueError(f"n_days must be positive, got {n_days}")
    if n_rows < n_days:
        raise ValueError(f"n_rows ({n_rows}) must be at least n_days ({n_days})")
    world = _world(_preset(preset), seed)
    base, remainder = divmod(n_rows, n_days)
    rows = [base + (day >= n_days - remainder) for day in range(n_days)]
    days = range(start_day, start_day + n_days)
    tables = []
    with _progress(f"simulating {n_rows:,} impressions", n_rows, enabled=progress) as advance:
        for day, n in zip(days, rows, strict=True):
            tables.append(_day_table(world, day, n))
            advance(n)
    return pa.concat_tables(tables)


def simulate_day(day: int, n_rows: int, *, preset: str = "default", seed: int = 0) -> pa.Table:
    """One day's ``n_rows`` impressions; depends on ``(preset, seed, day)`` and ``n_rows`` only."""
    if n_rows <= 0:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    return _day_table(_world(_preset(preset), seed), day, n_rows)


def _preset(name: str) -> SimulatorPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown simulator preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


@contextmanager
def _progress(description: str, total: int, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr, advanced by the yielded function; a no-op if disabled."""
    if not enabled:
        yield lambda _: None
        return
    from esmm.progress import progress_bar

    with progress_bar("rows") as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _rng(seed: int, preset: SimulatorPreset, *stream: int) -> np.random.Generator:
    key = zlib.crc32(preset.name.encode())  # stable across processes, unlike hash()
    return np.random.default_rng(np.random.SeedSequence([seed, key, *stream]))


@dataclass(frozen=True)
class _GroupedSampler:
    """Draws members of a given group with probability proportional to their weights."""

    order: np.ndarray  # member ids sorted by group
    cumulative: np.ndarray  # 0, then cumulative weights in that order
    start: np.ndarray  # per group: first position in ``order``
    end: np.ndarray  # per group: one past the last position

    @classmethod
    def build(cls, group: np.ndarray, weight: np.ndarray, n_groups: int) -> _GroupedSampler:
        order = np.argsort(group, kind="stable")
        sorted_group = group[order]
        groups = np.arange(n_groups)
        return cls(
            order=order,
            cumulative=np.concatenate([[0.0], np.cumsum(weight[order])]),
            start=np.searchsorted(sorted_group, groups, side="left"),
            end=np.searchsorted(sorted_group, groups, side="right"),
        )

    def sample(self, groups: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        start, end = self.start[groups], self.end[groups]
        low, high = self.cumulative[start], self.cumulative[end]
        position = np.searchsorted(self.cumulative, low + uniform * (high - low), side="right") - 1
        return self.order[np.clip(position, start, end - 1)]


@dataclass(frozen=True)
class _World:
    """The hidden world: per-user and per-item attributes and latents, and the intercepts."""

    preset: SimulatorPreset
    seed: int
    user_cdf: np.ndarray
    user_age: np.ndarray
    user_gender: np.ndarray
    user_city_tier: np.ndarray
    user_segment: np.ndarray
    user_click_bias: np.ndarray
    user_buy_bias: np.ndarray
    user_price_sensitivity: np.ndarray
    interest_offsets: np.ndarray  # CSR over users: int32 offsets, sorted int64 category ids
    interest_values: np.ndarray
    interest_keys: np.ndarray  # sorted user * n_categories + category, for membership tests
    item_cdf: np.ndarray
    items_by_category: _GroupedSampler
    item_category: np.ndarray
    item_shop: np.ndarray
    item_brand: np.ndarray
    item_price_log: np.ndarray
    item_price_z: np.ndarray
    item_price_bucket: np.ndarray
    item_look: np.ndarray
    item_fit: np.ndarray
    item_quality: np.ndarray
    category_pref: np.ndarray  # [segment, category]
    shop_pref: np.ndarray  # [segment, shop]
    position_cdf: np.ndarray
    hour_cdf: np.ndarray
    hour_effect: np.ndarray
    ctr_intercept: float = 0.0
    cvr_intercept: float = 0.0


@lru_cache(maxsize=4)
def _world(preset: SimulatorPreset, seed: int) -> _World:
    world = _build_world(preset, seed)
    return _calibrate(world, _rng(seed, preset, _CALIBRATION_STREAM))


def _build_world(p: SimulatorPreset, seed: int) -> _World:
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    rng = _rng(seed, p, _WORLD_STREAM)
    n_segments = p.n_age_buckets * p.n_genders

    # Categories, shops and brands: each shop and brand sells in one category.
    category_weight = _zipf_weights(rng, p.n_categories, 0.8, 2.0)
    shop_category = _assign_groups(rng, p.n_shops, category_weight)
    brand_category = _assign_groups(rng, p.n_brands, category_weight)
    shop_weight = _zipf_weights(rng, p.n_shops, 1.0, 5.0)
    brand_weight = _zipf_weights(rng, p.n_brands, 1.0, 5.0)

    # Items: a category, then a shop and a brand of that category.
    category = _assign_groups(rng, p.n_items, category_weight)
    shops = _GroupedSampler.build(shop_category, shop_weight, p.n_categories)
    brands = _GroupedSampler.build(brand_category, brand_weight, p.n_categories)
    shop = shops.sample(category, rng.random(p.n_items))
    brand = brands.sample(category, rng.random(p.n_items))

    def normal(size: int | tuple[int, int], scale: float = 1.0) -> np.ndarray:
        return rng.normal(0.0, scale, size)

    n_items, n_cat, n_shops, n_brands = p.n_items, p.n_categories, p.n_shops, p.n_brands
    look = 0.5 * normal(n_cat)[category] + 0.4 * normal(n_brands)[brand] + 0.4 * normal(n_items)
    fit = 0.4 * normal(n_cat)[category] + 0.5 * normal(n_shops)[shop] + 0.4 * normal(n_items)
    quality = (
        0.3 * normal(n_cat)[category]
        + 0.4 * normal(n_shops)[shop]
        + 0.3 * normal(n_brands)[brand]
        + 0.4 * normal(n_items)
    )
    clickbait = rng.random(n_items) < p.clickbait_fraction
    look = look + _CLICKBAIT_SHIFT * clickbait
    fit = fit - _CLICKBAIT_SHIFT * clickbait
    price_log = (
        4.0
        + normal(n_cat, 0.8)[category]
        + normal(n_brands, 0.3)[brand]
        + 0.3 * quality
        + normal(n_items, 0.35)
    )
    price_z = (price_log - price_log.mean()) / price_log.std()
    edges = np.quantile(price_log, np.linspace(0.0, 1.0, p.n_price_buckets + 1)[1:-1])
    item_weight = _zipf_weights(rng, n_items, p.item_zipf, p.item_zipf_offset)

    # Users: demographics, a segment (age x gender), activity and taste.
    user_weight = _zipf_weights(rng, p.n_users, p.user_zipf, p.user_zipf_offset)
    age = rng.choice(
        p.n_age_buckets, p.n_users, p=_normalised(np.hanning(p.n_age_buckets + 2)[1:-1])
    )
    gender = rng.integers(0, p.n_genders, p.n_users)
    city_tier = 1 + rng.choice(
        p.n_city_tiers, p.n_users, p=_normalised(np.arange(p.n_city_tiers) + 1.0)
    )
    segment = age * p.n_genders + gender
    category_pref = normal((n_segments, n_cat), 0.5)
    shop_pref = normal((n_segments, n_shops), 0.25)
    offsets, values = _interests(rng, segment, np.log(category_weight) + category_pref)

    positions = np.arange(1, p.n_positions + 1)
    hours = np.arange(_N_HOURS)
    hour_weight = 1.0 - 0.8 * np.cos(2 * np.pi * (hours - 4) / _N_HOURS)  # fewest at 4 am
    user_of_value = np.repeat(np.arange(p.n_users), np.diff(offsets))
    return _World(
        preset=p,
        seed=seed,
        user_cdf=np.cumsum(user_weight),
        user_age=age,
        user_gender=gender,
        user_city_tier=city_tier,
        user_segment=segment,
        user_click_bias=normal(p.n_users, 0.3),
        user_buy_bias=normal(p.n_users, 0.3),
        user_price_sensitivity=0.3 + 0.08 * city_tier,  # smaller cities: more price-sensitive
        interest_offsets=offsets,
        interest_values=values,
        interest_keys=user_of_value * n_cat + values,
        item_cdf=np.cumsum(item_weight),
        items_by_category=_GroupedSampler.build(category, item_weight, n_cat),
        item_category=category,
        item_shop=shop,
        item_brand=brand,
        item_price_log=price_log.astype(np.float32),
        item_price_z=price_z,
        item_price_bucket=np.searchsorted(edges, price_log, side="right"),
        item_look=look,
        item_fit=fit,
        item_quality=quality,
        category_pref=category_pref,
        shop_pref=shop_pref,
        position_cdf=np.cumsum(1.0 / np.sqrt(positions)),  # top slots are shown more often
        hour_cdf=np.cumsum(hour_weight),
        hour_effect=_HOUR_EFFECT * np.cos(2 * np.pi * (hours - 21) / _N_HOURS),
    )


def _zipf_weights(rng: np.random.Generator, n: int, s: float, offset: float) -> np.ndarray:
    """Zipf-Mandelbrot weights 1 / (rank + offset)^s, ranks shuffled over the ids."""
    weight = np.empty(n)
    weight[rng.permutation(n)] = 1.0 / (np.arange(1, n + 1) + offset) ** s
    return weight


def _assign_groups(rng: np.random.Generator, n: int, group_weight: np.ndarray) -> np.ndarray:
    """A group per member, by weight; the first members cover every group once."""
    n_groups = group_weight.size
    rest = rng.choice(n_groups, n - n_groups, p=_normalised(group_weight))
    return np.concatenate([np.arange(n_groups), rest])


def _normalised(weight: np.ndarray) -> np.ndarray:
    return weight / weight.sum()


def _interests(
    rng: np.random.Generator, segment: np.ndarray, score: np.ndarray, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """1..6 distinct interest categories per user, drawn without replacement with probability
    ~ exp(score[segment]) (Gumbel top-k), as CSR: int32 offsets and sorted int64 ids."""
    n_users, n_categories = segment.size, score.shape[1]
    count = 1 + rng.choice(_MAX_INTERESTS, n_users, p=_INTEREST_COUNT_P)
    top = np.empty((n_users, _MAX_INTERESTS), dtype=np.int64)
    for begin in range(0, n_users, chunk):
        rows = slice(begin, min(begin + chunk, n_users))
        noisy = score[segment[rows]] + rng.gumbel(size=(segment[rows].size, n_categories))
        best = np.argpartition(-noisy, _MAX_INTERESTS - 1, axis=1)[:, :_MAX_INTERESTS]
        rank = np.argsort(-np.take_along_axis(noisy, best, axis=1), axis=1)
        top[rows] = np.take_along_axis(best, rank, axis=1)
    keep = np.arange(_MAX_INTERESTS) < count[:, None]
    chosen = np.sort(np.where(keep, top, np.iinfo(np.int64).max), axis=1)
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int32)
    return offsets, chosen[keep]


def _calibrate(world: _World, rng: np.random.Generator) -> _World:
    """Solve the intercepts so the mean true_ctr and the conversions per click (mean true_cvr
    weighted by true_ctr) of a large draw hit the preset's targets."""
    p = world.preset
    draw = _draw(world, rng, p.calibration_rows)
    ctr_intercept = _bisect(lambda b: _sigmoid(draw.ctr_logit + b).mean() - p.target_ctr)
    ctr = _sigmoid(draw.ctr_logit + ctr_intercept)
    cvr_intercept = _bisect(
        lambda b: np.dot(ctr, _sigmoid(draw.cvr_logit + b)) / ctr.sum() - p.target_cvr
    )
    return replace(world, ctr_intercept=ctr_intercept, cvr_intercept=cvr_intercept)


def _bisect(
    excess: Callable[[float], float], low: float = -_LOGIT_BOUND, high: float = _LOGIT_BOUND
) -> float:
    """The root of an increasing function on [low, high]."""
    for _ in range(60):
        middle = 0.5 * (low + high)
        if excess(middle) > 0:
            high = middle
        else:
            low = middle
    return 0.5 * (low + high)


def _sigmoid(logit: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logit, -_LOGIT_BOUND, _LOGIT_BOUND)))


@dataclass(frozen=True)
class _Draw:
    """Impressions as indices into the world, with logits before the intercepts."""

    user: np.ndarray
    item: np.ndarray
    position: np.ndarray
    hour: np.ndarray
    ctr_logit: np.ndarray
    cvr_logit: np.ndarray


def _draw(world: _World, rng: np.random.Generator, n: int) -> _Draw:
    p = world.preset
    user = _sample_cdf(world.user_cdf, rng.random(n))
    # Targeted impressions: an item of one of the user's interest categories.
    targeted = rng.random(n) < p.targeted_fraction
    first, count = world.interest_offsets[user], np.diff(world.interest_offsets)[user]
    interest = world.interest_values[first + (rng.random(n) * count).astype(np.int64)]
    item = np.where(
        targeted,
        world.items_by_category.sample(interest, rng.random(n)),
        _sample_cdf(world.item_cdf, rng.random(n)),
    )
    position = 1 + _sample_cdf(world.position_cdf, rng.random(n))
    hour = _sample_cdf(world.hour_cdf, rng.random(n))
    intent = rng.normal(0.0, p.intent_scale, n)

    category, segment = world.item_category[item], world.user_segment[user]
    key = user * p.n_categories + category
    found = np.minimum(np.searchsorted(world.interest_keys, key), world.interest_keys.size - 1)
    match = _MATCH_EFFECT * (world.interest_keys[found] == key)
    affinity = (
        world.category_pref[segment, category] + world.shop_pref[segment, world.item_shop[item]]
    )
    quality, price_z = world.item_quality[item], world.item_price_z[item]
    shared = match + affinity + intent
    ctr_logit = (
        shared
        + world.item_look[item]
        + _QUALITY_ON_CLICK * quality
        + world.user_click_bias[user]
        - _POSITION_EFFECT * np.log(position)
        + world.hour_effect[hour]
        - _PRICE_ON_CLICK * price_z
    )
    cvr_logit = (
        shared
        + world.item_fit[item]
        + _QUALITY_ON_CONVERSION * quality
        + world.user_buy_bias[user]
        - world.user_price_sensitivity[user] * price_z
    )
    return _Draw(user, item, position, hour, ctr_logit, cvr_logit)


def _sample_cdf(cdf: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Indices drawn with probability proportional to the steps of the unnormalised ``cdf``."""
    return np.minimum(np.searchsorted(cdf, uniform * cdf[-1], side="right"), cdf.size - 1)


def _day_table(world: _World, day: int, n: int) -> pa.Table:
    if day < 0:
        raise ValueError(f"day must be non-negative, got {day}")
    rng = _rng(world.seed, world.preset, _DAY_STREAM, day)
    draw = _draw(world, rng, n)
    true_ctr = _sigmoid(draw.ctr_logit + world.ctr_intercept)
    true_cvr = _sigmoid(draw.cvr_logit + world.cvr_intercept)
    click = rng.random(n) < true_ctr
    conversion = click & (rng.random(n) < true_cvr)

    p, user, item = world.preset, draw.user, draw.item
    segment = world.user_segment[user]
    interests = pa.ListArray.from_arrays(
        pa.array(world.interest_offsets), pa.array(world.interest_values)
    )
    columns = {
        DAY: np.full(n, day, dtype=np.int64),
        "user_id": user,
        "user_age_bucket": world.user_age[user],
        "user_gender": world.user_gender[user],
        "user_city_tier": world.user_city_tier[user],
        "user_interest_categories": interests.take(pa.array(user)),
        "item_id": item,
        "item_category": world.item_category[item],
        "item_shop": world.item_shop[item],
        "item_brand": world.item_brand[item],
        "item_price_bucket": world.item_price_bucket[item],
        "user_segment_x_category": segment * p.n_categories + world.item_category[item],
        "user_segment_x_shop": segment * p.n_shops + world.item_shop[item],
        "context_position": draw.position,
        "context_hour": draw.hour,
        "item_price_log": world.item_price_log[item],
        CLICK: click.astype(np.int8),
        CONVERSION: conversion.astype(np.int8),
        TRUE_CTR: true_ctr,
        TRUE_CVR: true_cvr,
    }
    return pa.table(
        {
            name: values if isinstance(values, pa.Array) else pa.array(_int64(values))
            for name, values in columns.items()
        }
    )


def _int64(values: np.ndarray) -> np.ndarray:
    """Integer ids as int64 (labels stay int8, floats as they are)."""
    if values.dtype.kind in "iu" and values.dtype != np.int8:
        return values.astype(np.int64, copy=False)
    return values
