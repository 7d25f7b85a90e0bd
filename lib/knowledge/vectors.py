"""Vectors as bytes (float32, what PostgreSQL keeps in a bytea column) and exact search."""
import numpy


def to_bytes(vector):
    return numpy.asarray(vector, dtype=numpy.float32).tobytes()


def from_bytes(data, dimensions=None):
    vector = numpy.frombuffer(bytes(data), dtype=numpy.float32)
    if dimensions and vector.shape[0] != dimensions:
        raise ValueError('a stored vector has %d dimensions, not %d' % (vector.shape[0], dimensions))
    return vector


def normalized(vector):
    vector = numpy.asarray(vector, dtype=numpy.float32)
    norm = float(numpy.linalg.norm(vector))
    return vector / norm if norm else vector


def exact_top(matrix, ids, query, k):
    """The `k` rows of `matrix` (normalised vectors) most similar to `query` by cosine:
    [(id, score)], best first."""
    if not len(ids) or k <= 0:
        return []
    scores = matrix.dot(normalized(query))
    k = min(k, len(ids))
    top = numpy.argpartition(-scores, k - 1)[:k]
    top = top[numpy.argsort(-scores[top], kind='stable')]
    return [(int(ids[i]), float(scores[i])) for i in top]
