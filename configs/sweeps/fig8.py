r"""Fig. 8: MedSem-DeID's loss weights, one varied with the other held at the paper's value.

  python -m launch.sweep run --sweep=configs/sweeps/fig8.py --workdir=runs/fig8                    # here
  python -m launch.sweep run --sweep=configs/sweeps/fig8.py:paper --workdir=runs/fig8_paper --submit=slurm \
      --slurm_partition=gpu --slurm_gpus_per_node=1 --slurm_hours=48
  python -m launch.sweep collect --workdir=runs/fig8          # results.md / .csv, plot_loss.lambda_med.png, ...

lambda_med in {1, 2.5, 5, 7.5, 10} at lambda_rev = 0.1 and lambda_rev in {0.01, 0.05, 0.1, 0.5, 1} at
lambda_med = 5 (the paper's values are 5 and 0.1; it does not list the grid, these points bracket them):
9 runs (the paper's point is shared).  Argument: the configs/medsem_deid.py variant (default synth,
which needs the quickstart's UNet and ArcFace: pass --config.medical_encoder.source=... and
--config.identity.weights=... after the sweep flags, as for a single run).
"""
from configs.sweeps import chain, product

LAMBDA_MED = (1.0, 2.5, 5.0, 7.5, 10.0)
LAMBDA_REV = (0.01, 0.05, 0.1, 0.5, 1.0)


def get_sweep(arg=None):
    return {"config": f"configs/medsem_deid.py:{arg or 'synth'}",
            "runs": chain(product({"loss.lambda_med": LAMBDA_MED}, fixed={"loss.lambda_rev": 0.1}),
                          product({"loss.lambda_rev": LAMBDA_REV}, fixed={"loss.lambda_med": 5.0}))}
