"""Config loading: YAML + dotted overrides, strict keys and types, hashes that drive resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser, main
from pipeline.config import DEFAULT_HEAD, ConfigError, RunCfg, config_hash, diff_keys, dump_yaml, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input: s3://bkt/train-{000000..000009}.tar\noutput: s3://bkt/out\nmodel:\n  name: ViT-B-16\n")
    cfg = load_config(str(path), ["model.precision=bf16", "infer.crop=224", "head.options.ks_thresh=0.9"])
    assert cfg.input == ["s3://bkt/train-{000000..000009}.tar"]
    assert cfg.model.name == "ViT-B-16"
    assert cfg.model.precision == "bf16"
    assert cfg.infer.crop == 224
    assert cfg.head.options == {"ks_thresh": 0.9}
    assert cfg.infer.stride == 0  # untouched keys keep their defaults


def test_ints_widen_to_floats_but_not_the_reverse():
    assert load_config(None, ["infer.logit_scale=50"]).infer.logit_scale == 50.0
    with pytest.raises(ConfigError, match="infer.batch_size: expected a whole number"):
        load_config(None, ["infer.batch_size=1.5"])


def test_numbers_in_exponent_form_read_as_numbers(tmp_path):
    """PyYAML takes `1e-4` (no dot) for text; a float key still reads it as the number it is."""
    path = tmp_path / "run.yaml"
    path.write_text("infer:\n  conf_threshold: 5e-1\n")
    cfg = load_config(str(path), ["infer.logit_scale=1E2"])
    assert cfg.infer.conf_threshold == 0.5 and cfg.infer.logit_scale == 100.0
    for text, shown in (("nan", "'nan'"), (".nan", "nan"), ("-.inf", "-inf")):  # text, and YAML's own floats
        with pytest.raises(ConfigError, match=f"infer.logit_scale: expected a finite number, got {shown}"):
            load_config(None, [f"infer.logit_scale={text}"])
    with pytest.raises(ConfigError, match="infer.logit_scale: expected a number, got '1e-4x'"):
        load_config(None, ["infer.logit_scale=1e-4x"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.nme=x", "unknown config key 'model.nme'; allowed keys: name, pretrained, precision, device"),
        ("modle.name=x", "unknown config key 'modle'"),
        ("model.precision=fp8", "model.precision: 'fp8' is not allowed; choose one of auto, fp32, bf16, fp16"),
        ("zoom.enabled=maybe", "zoom.enabled: expected true or false"),
        ("model=3", "model: expected a mapping of ModelCfg keys"),
        ("novalue", "is not of the form key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_a_choice_of_numbers_takes_exactly_one_of_them():
    from pipeline.train.config import FinetuneCfg

    assert load_config(None, ["student.fpn_levels=3"], cls=FinetuneCfg).student.fpn_levels == 3
    for text, shown in (("5", "5"), ("3.0", "3.0"), ("true", "True")):  # 3.0 == 3 and True == 1 in Python
        with pytest.raises(ConfigError, match=f"student.fpn_levels: {shown} is not allowed; choose one of 2, 3, 4"):
            load_config(None, [f"student.fpn_levels={text}"], cls=FinetuneCfg)


def test_an_unnamed_head_hashes_as_the_default_head():
    # Labels of an unnamed head and of DEFAULT_HEAD are alike, and outputs written while the default
    # was DEFAULT_HEAD by name must keep their hash to resume (pipeline.outputs).
    unnamed = load_config(None, ["head.name=null"])
    assert unnamed.head.name is None and unnamed == RunCfg()
    assert config_hash(unnamed) == config_hash(load_config(None, [f"head.name={DEFAULT_HEAD}"]))
    assert config_hash(unnamed) == config_hash(load_config(None, ["head.name="]))  # "" is unset too
    assert config_hash(unnamed) != config_hash(load_config(None, ["head.name=naclip"]))


def test_dump_roundtrips(tmp_path):
    cfg = load_config(None, ["input=[a.tar, b.tar]", "vocab.classes=[cat, 'tv, monitor']", "zoom.enabled=true"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_hash_ignores_execution_keys_only():
    base = RunCfg()
    moved = load_config(None, ["output=s3://elsewhere", "distribute.num_actors=8"])
    changed = load_config(None, ["head.name=sclip"])
    assert config_hash(base) == config_hash(moved)
    assert config_hash(base) != config_hash(changed)
    assert diff_keys(base, changed) == ["head.name"]


def test_config_show_cli(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("input: [a.tar]\noutput: out\n")
    assert main(["config", "show", str(path), "infer.crop=224"]) == 0
    shown = capsys.readouterr().out
    assert "crop: 224" in shown and "name: shapes-clip" in shown
    assert main(["config", "show", str(path), "infer.crop=big"]) == 2
    assert "infer.crop: expected a whole number, got 'big'" in capsys.readouterr().err


def test_config_show_knows_a_retrain_config_by_its_models_key(capsys):
    shipped = Path(__file__).resolve().parents[1] / "k8s/base/configs/retrain.yaml"
    given = yaml.safe_load(shipped.read_text())
    assert main(["config", "show", str(shipped), "eval_batch_size=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["models"] == given["models"] and shown["finetune"] == given["finetune"]
    assert shown["eval_batch_size"] == 4 and shown["lease_seconds"] == 300.0  # overridden, and a default
    # Overrides alone: `labels` makes a fine-tune config unless --job or `models` says retrain.
    assert main(["config", "show", "labels=[run]"]) == 0
    assert "output: ''" in capsys.readouterr().out
    for argv in (["--job", "retrain", "labels=[run]"], ["labels=[run]", "models=s3://b/m"]):
        assert main(["config", "show", *argv]) == 0
        assert "lease_seconds: 300.0" in capsys.readouterr().out, argv
    assert main(["config", "show", "--job", "retrain", "models=m", "min_gain=big"]) == 2
    assert "min_gain: expected a number, got 'big'" in capsys.readouterr().err


def test_global_flags_work_before_and_after_the_command(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input: [a.tar]\noutput: out\n")
    for argv in (
        ["-v", "config", "show", str(path)],
        ["config", "show", "-v", str(path)],
        ["config", "show", str(path), "--verbose"],
    ):
        assert main(argv) == 0
        assert logging.getLogger().level == logging.DEBUG, argv
    assert main(["config", "show", str(path)]) == 0  # a flag not given after the command keeps its default
    assert logging.getLogger().level == logging.INFO
    assert build_parser().parse_args(["label", "run.yaml", "-v"]).verbose


def test_finetune_takes_overrides_without_a_config_file(tmp_path, capsys):
    missing = tmp_path / "no-run"
    assert main(["finetune", f"labels=[{missing}]", f"output={tmp_path / 'out'}"]) == 2
    # The overrides were read as the config (as label and retrain read them), not as a file name.
    assert f"{missing} is not a labeling run's output" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_warmup_as_long_as_the_schedule_is_warned_about(caplog):
    from pipeline.train.config import FinetuneCfg, check

    short = ["labels=[run]", "output=out", "optim.steps=20"]
    with caplog.at_level("WARNING"):
        check(load_config(None, [*short, "optim.warmup=50"], cls=FinetuneCfg))
    assert "optim.warmup (50) is not shorter than optim.steps (20)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check(load_config(None, [*short, "optim.warmup=10"], cls=FinetuneCfg))
    assert not caplog.records
