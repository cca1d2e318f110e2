"""Solution of exercise 5: the RoPE backward.

The exercise file as shipped (its forward and helpers, exercises/05_rope.py) with the learner's
part written out below."""

from tests.exercise_solutions import exercise

stub = exercise("05_rope.py")
globals().update(stub)                                              # the stub's forward and helpers
_pairs, _unpairs = stub["_pairs"], stub["_unpairs"]                 # used below by name


def rope_backward(dout, cache):
    """``dx`` given ``dout = dL/dy``."""
    cos, sin, interleaved = cache
    g1, g2 = _pairs(dout, interleaved)
    return _unpairs(g1 * cos + g2 * sin, g2 * cos - g1 * sin, interleaved)     # R(-theta): eq. (9.6)
