r"""A two-run sweep of the tiny classifier (seconds a run): the tests' and SLURM check's sweep.

  python -m launch.sweep run --sweep=configs/sweeps/tiny.py --workdir=runs/sweep_tiny [--submit=slurm ...]
"""
from configs.sweeps import product


def get_sweep(arg=None):
    return {"config": "configs/quickstart.py:tiny", "runs": product({"optim.lr": [1e-3, 3e-3]}),
            "fixed": {"total_steps": int(arg or 8), "checkpoint_every": 4}}
