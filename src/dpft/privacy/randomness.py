"""Where a DP run's randomness comes from: secret OS entropy, or an explicitly unsafe seed.

DP-SGD's guarantee rests on randomness the adversary does not know: which units each step samples
(privacy amplification by sampling), which records a user keeps, and the noise. Whoever knows a
seed that generates them knows every batch (sampling then amplifies nothing) and can regenerate
and subtract the noise (no privacy at all). So:

- `Randomness.secure()` (the default): every draw takes fresh bits from the OS (`secrets`), used
  once and never stored. Nothing of it can be written to a file, so no file can leak it, and a
  resumed run simply draws fresh bits: the accountant needs the sampling *law*, not the stream.
- `Randomness.unsafe_seeded(seed)`: every draw is derived from (seed, purpose, key), so a run is
  reproducible and a resumed run redraws the same stream without saving any state. For tests and
  debugging only: the guarantee then holds only against someone who does not know the seed.

Draws are keyed (purpose, step) or (purpose, unit), never taken from one shared stream, so
removing one user changes no other user's draws.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch

# One stream family per use, so that sampling, capping and noise never share draws.
_PURPOSES = {"sample": 1, "cap": 2, "noise": 3}


class Randomness:
    """The source of a run's sampling, per-user capping and noise randomness.

    Use the constructors `secure()` and `unsafe_seeded(seed)`.
    """

    def __init__(self, seed: int | None):
        self._seed = seed

    @classmethod
    def secure(cls) -> Randomness:
        """Fresh OS entropy for every draw (the default for every DP run)."""
        return cls(None)

    @classmethod
    def unsafe_seeded(cls, seed: int) -> Randomness:
        """Reproducible draws from `seed`: UNSAFE, for tests and debugging only."""
        return cls(int(seed))

    @property
    def mode(self) -> str:
        """ "os-entropy" or "seeded": what privacy.json and the model card state."""
        return "os-entropy" if self._seed is None else "seeded"

    def numpy(self, purpose: str, key: int | str) -> np.random.Generator:
        """A generator for one draw: (purpose, key) is e.g. ("sample", step) or ("cap", user id)."""
        if self._seed is None:
            return np.random.Generator(np.random.PCG64(secrets.randbits(128)))
        return np.random.Generator(np.random.PCG64(self._sequence(purpose, key)))

    def torch(self, purpose: str, key: int | str, device: torch.device) -> torch.Generator:
        """A torch generator on `device` for one draw (seeded mode only; secure noise uses `numpy`)."""
        state = self._sequence(purpose, key).generate_state(1, np.uint64)[0]
        generator = torch.Generator(device=device)
        generator.manual_seed(int(state) & ((1 << 63) - 1))
        return generator

    def _sequence(self, purpose: str, key: int | str) -> np.random.SeedSequence:
        if self._seed is None:
            raise ValueError("secure randomness has no seed sequence")
        return np.random.SeedSequence([self._seed, _PURPOSES[purpose], _key(key)])


def _key(key: int | str) -> int:
    """A stable non-negative integer for a step number or a unit id (str hashes vary per process)."""
    if isinstance(key, int):
        return key
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
