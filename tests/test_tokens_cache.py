"""The token-count cache: exact counts, bounded memory, safe from threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from gateway.tokens import CountCache, count_messages, encoding

O200K = encoding("o200k_base")
CL100K = encoding("cl100k_base")
TEXT = ("Shipment BX-4471 left Rotterdam on 3 March with 14 pallets of ceramic tiles; the "
        "customs broker flagged two pallets for inspection.")


def test_cached_counts_equal_fresh_counts_per_encoding() -> None:
    cache = CountCache()
    expected = len(O200K.encode_ordinary(TEXT))
    assert cache.count(TEXT, O200K) == expected
    assert cache.count(TEXT, O200K) == expected  # from the cache
    assert cache.count(TEXT, CL100K) == len(CL100K.encode_ordinary(TEXT))  # other encoding


def test_cache_is_bounded_by_characters_and_evicts_oldest() -> None:
    cache = CountCache(max_chars=1000)
    texts = [f"{i:04d} {TEXT}" for i in range(20)]  # ~135 chars each
    counts = [cache.count(t, O200K) for t in texts]
    assert cache._chars <= 1000 and len(cache._counts) == 7
    assert ("o200k_base", texts[0]) not in cache._counts
    assert ("o200k_base", texts[-1]) in cache._counts
    assert counts == [len(O200K.encode_ordinary(t)) for t in texts]


def test_short_and_huge_texts_are_counted_not_kept() -> None:
    cache = CountCache(max_chars=4000)
    assert cache.count("hello world", O200K) == 2
    huge = TEXT * 10  # more than a quarter of the cache
    assert cache.count(huge, O200K) == len(O200K.encode_ordinary(huge))
    assert len(cache._counts) == 0


def test_threads_and_chat_counts_agree_with_uncached_counting() -> None:
    cache = CountCache(max_chars=20_000)
    texts = [f"{i} {TEXT}" for i in range(200)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: cache.count(t, O200K), texts * 3))
    assert results == [len(O200K.encode_ordinary(t)) for t in texts] * 3
    assert cache._chars == sum(len(("o200k_base", t)[1]) for (_, t) in cache._counts)
    messages = [{"role": "system", "content": TEXT}, {"role": "user", "content": TEXT}]
    assert count_messages(messages, O200K) == count_messages(messages, O200K) == (
        3 + 2 * (3 + 1 + len(O200K.encode_ordinary(TEXT))))
