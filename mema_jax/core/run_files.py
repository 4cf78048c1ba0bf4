"""Names of the files a training run writes into its workdir; light (no jax), for the tools that
read runs (launch.sweep collect) as well as the loop that writes them."""

CONFIG_FILE = "config.json"                # the run's config, written before training (launch.main)
FINAL_METRICS_FILE = "final_metrics.json"  # written when a run reaches total_steps: sweeps read it
METRICS_TABLE = "metrics.csv"              # every logged scalar, one row per (step, name)

