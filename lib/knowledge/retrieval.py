"""Retrieval within the caller's rights: top-k counts only chunks the caller may read.

The store ranks by similarity without knowing who asks; `readable(ids)` (the ORM's record rules,
access rights and companies, checked now, at answer time) keeps the chunks whose source record
the caller can read. When too few remain, more are fetched (4x each round) until k are found or
the store has no more above the threshold."""


def readable_top_k(search, readable, k, threshold=None, first=None):
    """search(n) -> [(chunk id, score)] best first (at most n); readable(ids) -> the readable
    subset. -> [(chunk id, score)], at most k, best first, all readable, all >= threshold."""
    if k <= 0:
        return []
    n = first or max(4 * k, 16)
    found, checked = [], set()
    while True:
        hits = search(n)
        exhausted = len(hits) < n
        fresh = []
        for chunk_id, score in hits:
            if threshold is not None and score < threshold:
                exhausted = True  # best first: nothing further down passes either
                break
            if chunk_id not in checked:
                fresh.append((chunk_id, score))
        checked.update(chunk_id for chunk_id, _ in fresh)
        allowed = set(readable([chunk_id for chunk_id, _ in fresh])) if fresh else set()
        found.extend(hit for hit in fresh if hit[0] in allowed)
        if len(found) >= k or exhausted:
            found.sort(key=lambda hit: -hit[1])
            return found[:k]
        n *= 4


def merge(results, k):
    """The best k of several collections' results [(id, score)]."""
    return sorted((hit for hits in results for hit in hits), key=lambda hit: -hit[1])[:k]
