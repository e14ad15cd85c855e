"""The model implementations (torch, numpy, the C kernel) and their KV caches."""

# the types a model's matrices may be held in (--dtype, a speculative draft's draft_weights)
WEIGHT_TYPES = ("float32", "bfloat16")
