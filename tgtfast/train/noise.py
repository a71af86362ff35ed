"""The trainer's random streams: splitmix64 hashes that key the latent noise and the data order.

Every micro-batch of every optimiser step has its own Philox key
``seed = noise_seed(config.seed, step, micro_batch, round)`` (``round`` 0 is the initial perturbation); the
``samples_per_example`` codes of the example at position ``p`` of the *global* micro-batch are rows
``p * S .. p * S + S - 1`` of that stream, so a rank whose share of the global micro-batch starts at position
``p0`` uses ``offset = p0 * S * d``. The noise an example gets therefore depends only on (seed, step,
micro-batch, its position), not on the number of processes, and a resumed run draws exactly the noise the
interrupted one would have drawn.
"""

from __future__ import annotations

__all__ = ["noise_seed", "splitmix64", "mix"]

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One round of the splitmix64 finaliser on a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, step: int, micro_batch: int = 0, round: int = 0) -> int:
    """The Philox key of the latent noise of optimiser step ``step`` (0-based), micro-batch ``micro_batch`` and
    exploration round ``round`` of a run seeded with ``seed``: a splitmix64 hash of the four, in ``[0, 2**63)``.

    It does not depend on the process: ranks draw disjoint parts of the same stream through the offset (see
    the module docstring)."""
    h = splitmix64(int(seed) & _MASK64)
    for v in (step, micro_batch, round):
        h = splitmix64(h ^ (int(v) & _MASK64))
    return h & _MASK63


def mix(*values: int) -> int:
    """A splitmix64 hash of ``values`` in ``[0, 2**63)`` (seeds of the data order and of torch's generator)."""
    h = 0
    for v in values:
        h = splitmix64(h ^ (int(v) & _MASK64))
    return h & _MASK63
