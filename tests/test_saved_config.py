"""config.json is the config a run used: settings derived from others are fixed before it is
written (a trainer's ``resolve_config``), and a trainer that changes its config during the run is
an error naming the keys, so a saved config can never silently differ from the run's."""
import json
import textwrap

import ml_collections
import pytest

from launch import main as launch_main


def _trainer_module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return ml_collections.ConfigDict({"trainer": name, "total_steps": 10, "num_epochs": 2, "optim": {"lr": 0.1}})


def test_a_trainer_that_changes_its_config_during_the_run_is_an_error_naming_the_keys(tmp_path, monkeypatch):
    config = _trainer_module(tmp_path, monkeypatch, "mutating_trainer", """
        def train_and_evaluate(config, workdir):
            config.total_steps = 99
            config.optim.lr = 1.0
            return {}
        """)
    with pytest.raises(RuntimeError, match=r"mutating_trainer.train_and_evaluate changed config optim\.lr, "
                                           r"total_steps after .*config\.json"):
        launch_main.run(config, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 10


def test_derived_settings_are_resolved_before_config_json_is_written(tmp_path, monkeypatch):
    config = _trainer_module(tmp_path, monkeypatch, "resolving_trainer", """
        def resolve_config(config):
            config.total_steps = config.num_epochs * 7
            return config

        def train_and_evaluate(config, workdir):
            return {"steps": config.total_steps}
        """)
    assert launch_main.run(config, str(tmp_path / "run")) == {"steps": 14}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 14


def test_diffusion_total_steps_come_from_epochs_before_the_run(synth_dataset_32):
    from configs import mema_lora
    from mema_jax.trainers import diffusion

    config = mema_lora.get_config("tiny")
    config.data.root = str(synth_dataset_32.root)
    config.num_epochs, config.batch_size = 3, 8
    train_images = len(synth_dataset_32.split("train"))
    assert diffusion.resolve_config(config).total_steps == -(-3 * train_images // 8)
