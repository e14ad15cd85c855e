"""Step-level search: one file per algorithm, each readable on its own, all on ``base.py``.

The policy is any ``TextLM``: a step is what it generates up to the step delimiter
(``stop``), so these searches run unchanged on a remote text-only server. A step scorer
(a PRM, an exact step checker) rates partial paths. Every search returns the tree it
built (``Generation.meta["tree"]``, JSON-serialisable).
"""
