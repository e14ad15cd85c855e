"""Particle filtering over steps (Puri et al. 2025, the formulation of its_hub).

``n`` particles each extend their path one step at a time. After every step each
particle is weighted by the step scorer's value of its path, and the set is resampled
in proportion to softmax(value / T): likely-good paths are duplicated, unlikely ones
die out, while sampling keeps some diversity that a beam would prune. A finished
particle is carried as it is. The answer is the finished particle scored best.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

from ...errors import SettingError
from ...types import Generation, Usage
from .base import StepSearch, Tree, best_terminal


class ParticleFilter(StepSearch):
    strategy = "particles"

    def __init__(self, lm: Any, scorer: Any, n: int = 16, temperature: float = 0.1, **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SettingError(f"n (particles) must be an integer >= 1; got {n!r}")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise SettingError(f"temperature (of the resampling softmax) must be > 0; got {temperature!r}")
        self.n, self.temperature = n, float(temperature)

    async def search(self, prompt: str, seed: int) -> Generation:
        rng = random.Random(seed)
        tree = Tree()
        (particles,) = await self.expand(prompt, tree, [tree.root], self.n, seed)
        usage, depth = Usage(), 1
        fresh = particles
        while True:
            usage = usage + await self.score(prompt, fresh, seed + 31 * depth)
            if all(p.terminal for p in particles):
                break
            top = max(p.score for p in particles)
            w = [math.exp((p.score - top) / self.temperature) for p in particles]
            drawn = rng.choices(range(len(particles)), weights=w, k=self.n)
            counts = Counter(drawn)
            carried = [particles[i] for i in sorted(counts) for _ in range(counts[i]) if particles[i].terminal]
            grow = [(particles[i], counts[i]) for i in sorted(counts) if not particles[i].terminal]
            kids = await self.expand(prompt, tree, [p for p, _ in grow], [k for _, k in grow], seed + depth)
            fresh = [c for cs in kids for c in cs]
            particles = carried + fresh
            depth += 1
        best = best_terminal(particles) or max(particles, key=lambda p: p.score)
        return self.result(tree.root, best, usage, depth=depth)
