"""Config: defaults, YAML files, overrides, shortcuts and the errors a user sees."""
import pytest
import yaml

import run_vae
from run_vae import ConfigError, load_config, parse_args


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_overrides_defaults_and_keeps_the_rest(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n  lr: 1e-4\nmodel:\n  conditional: true\n"))
    assert cfg["train"]["epochs"] == 3
    assert cfg["train"]["lr"] == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; we parse it
    assert isinstance(cfg["train"]["lr"], float)
    assert cfg["model"]["conditional"] is True
    assert cfg["model"]["latent_dim"] == run_vae.DEFAULTS["model"]["latent_dim"] == 128


def test_config_path_without_extension(tmp_path):
    write(tmp_path, "run:\n  name: noext\n", "train_x.yaml")
    assert load_config(str(tmp_path / "train_x"))["run"]["name"] == "noext"


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope")


def test_unknown_key_names_it_suggests_and_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  epoch: 3\n"))
    msg = str(e.value)
    assert "train.epoch" in msg and "Did you mean 'epochs'" in msg and "batch_size" in msg


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  epochs: 3\n"))


@pytest.mark.parametrize("override,expected", [
    ("train.epochs=three", "train.epochs must be int"),
    ("model.conditional=5", "model.conditional must be bool"),
    ("train.lr=abc", "train.lr must be float"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("data.image_size=50", "multiple of 16"),
    ("train.lr_warmup=-1", "train.lr_warmup must be at least 0"),
    ("model.res_blocks=-1", r"model.res_blocks must be in \[0, 9\)"),
    ("model.channels=4", r"model.channels must be in \[8, 1025\)"),
    ("model.prior_components=0", r"model.prior_components must be in \[1, 257\)"),
    ("model.prior_components=3 model.prior=standard", "set model.prior=fitted, or model.prior_components=1"),
    ("model.class_norm=true", "set model.conditional=true, or model.class_norm=false"),
    ("epochs=3", "section.key=value"),
])
def test_wrong_values_are_errors(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, override.split())


def test_overrides_are_typed_yaml():
    cfg = load_config(None, ["train.epochs=3", "model.latent_dim=64", "train.beta=0.5", "wandb.tags=[a, b]",
                             "train.lr=3e-4", "model.conditional=true"])
    assert cfg["train"]["epochs"] == 3 and cfg["model"]["latent_dim"] == 64
    assert cfg["train"]["beta"] == 0.5 and cfg["wandb"]["tags"] == ["a", "b"]
    assert cfg["train"]["lr"] == pytest.approx(3e-4) and cfg["model"]["conditional"] is True


def test_int_given_for_float_is_accepted():
    assert load_config(None, ["train.beta=2"])["train"]["beta"] == 2.0


def test_seed_style_shortcut_flags():
    args = parse_args(["--config", "x", "--conditional", "--latent_dim", "32", "--beta_warmup", "4",
                       "--beta_cycle", "6", "train.epochs=2"])
    cfg = load_config(None, args.overrides)
    assert cfg["model"]["conditional"] is True and cfg["model"]["latent_dim"] == 32
    assert cfg["train"]["beta_warmup"] == 4 and cfg["train"]["beta_cycle"] == 6 and cfg["train"]["epochs"] == 2


def test_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=some/data"])
    assert cfg["data"]["root"] == str(tmp_path / "some" / "data")


def test_shipped_configs_all_load():
    from pathlib import Path
    configs = sorted((Path(run_vae.__file__).parent / "config").glob("*.yaml"))
    names = {p.stem for p in configs}
    assert {"train_apples", "test_apples", "train_impressionism", "test_impressionism",
            "train_demo", "test_demo"} <= names
    for path in configs:
        if path.stem.startswith(("train_", "test_")):
            cfg = load_config(path)
            assert cfg["run"]["mode"] == ("test" if path.stem.startswith("test_") else "train"), path


def test_main_prints_config_errors_without_traceback(tmp_path, capsys):
    code = run_vae.main(["--config", str(write(tmp_path, "train:\n  batchsize: 3\n"))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "train.batchsize" in err and "Traceback" not in err


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(None, ["train.epochs=7"])
    assert yaml.safe_load(run_vae.config_to_yaml(cfg)) == cfg
