"""MeMa sampling (paper, Step 2): conditions drawn to follow the real patients (conditions.py, no
jax) and the sampler that turns them into a MeMa-layout folder (sampler.py)."""
