import dataclasses
import re

import pytest
import yaml

from kdistill import cli
from kdistill.config import Config, build_config, save_config
from kdistill.config_diff import NON_RESULT_KEYS, result_differences
from kdistill.errors import KdistillError
from kdistill.settings import leaves, read_yaml

SETTING_NAMES = [name for name, _, _ in leaves(Config())]


def nested_yaml(name: str, text: str) -> str:
    """`teacher.lr`, `1e-4` -> "teacher:\n  lr: 1e-4\n": one setting as a --config file's text."""
    *sections, key = name.split(".")
    lines = [f"{'  ' * depth}{section}:" for depth, section in enumerate(sections)]
    return "\n".join(lines + [f"{'  ' * len(sections)}{key}: {text}"]) + "\n"


def from_yaml(tmp_path, name: str, text: str) -> Config:
    file = tmp_path / "settings.yaml"
    file.write_text(nested_yaml(name, text))
    return build_config(config_files=(str(file),))


def value_of(cfg: Config, name: str):
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    assert re.search(rf"\bsetting {re.escape(name)}(?![\w.])", message), message
    return message


# ---------------------------------------------------------------- small traps


@pytest.mark.parametrize("name, text, expected", [
    ("student.lr", "1e-4", 1e-4),
    ("student.lr", "1E-3", 1e-3),
    ("distill.temperature", "3.", 3.0),
    ("distill.alpha", ".5", 0.5),
    ("max_image_pixels", "1_000", 1000),
    ("image_size", "10.0", 10),  # an int with no fraction
])
def test_numbers_in_any_usual_notation_parse(tmp_path, name, text, expected):
    assert value_of(build_config(sets=[f"{name}={text}"]), name) == expected
    assert value_of(from_yaml(tmp_path, name, text), name) == expected


def test_quoted_whole_number_is_an_int_and_a_fraction_is_refused(tmp_path):
    assert from_yaml(tmp_path, "image_size", '"10"').image_size == 10
    for refuse in (lambda: build_config(sets=["image_size=10.5"]), lambda: from_yaml(tmp_path, "image_size", "10.5")):
        with pytest.raises(KdistillError, match="whole number") as error:
            refuse()
        assert_one_line_naming(error, "image_size")


@pytest.mark.parametrize("text, expected", [("true", True), ("False", False), ("yes", True), ("no", False),
                                            ("on", True), ("OFF", False), ("1", True), ("0", False)])
def test_boolean_settings_read_the_usual_words(tmp_path, text, expected):
    assert build_config(sets=[f"baseline={text}"]).baseline is expected
    assert from_yaml(tmp_path, "baseline", text).baseline is expected


def test_a_missing_config_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(KdistillError, match="does not exist") as error:
        build_config(config_files=(str(missing),))
    assert str(missing) in str(error.value)
    assert cli.main(["config", "--config", str(missing)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"kdistill: error: config file {missing} does not exist"]


def choice_fields() -> dict[str, list[str]]:
    """Each setting with a fixed set of values, and those values as its error must list them."""
    fields = {name: list(f.metadata["choices"]) for name, f, _ in leaves(Config()) if f.metadata["choices"]}
    return {**fields, "device": ["auto", "cpu", "mps", "cuda", "cuda:N"]}


def test_the_settings_with_fixed_values_are_declared():
    assert {"augment", "teacher.mode", "distill.method", "distill.teacher_signal", "precision",
            "teacher.normalize", "student.normalize"} < set(choice_fields())


@pytest.mark.parametrize("name", sorted(choice_fields()))
def test_a_value_not_allowed_lists_the_allowed_values(tmp_path, name):
    for refuse in (lambda: build_config(sets=[f"{name}=no"]), lambda: from_yaml(tmp_path, name, "no")):
        with pytest.raises(KdistillError) as error:
            refuse()
        message = assert_one_line_naming(error, name)
        assert "'no'" in message and all(value in message for value in choice_fields()[name]), message


def test_yaml_with_code_is_not_executed(tmp_path):
    created = tmp_path / "pwned"
    file = tmp_path / "evil.yaml"
    file.write_text(f"seed: !!python/object/apply:os.system ['touch {created}']\n")
    with pytest.raises(KdistillError, match="not valid YAML"):
        build_config(config_files=(str(file),))
    assert not created.exists()


@pytest.mark.parametrize("setting, message", [
    ("colour=red", "unknown setting 'colour'"),
    ("student.unknown_key=1", "unknown setting 'student.unknown_key'"),
    ("teacher=resnet34", "setting teacher must be a mapping of settings"),
    ("teacher.arch.depth=3", "setting teacher.arch must be text, got {'depth': '3'}"),
])
def test_unknown_or_misplaced_settings_are_refused(setting, message):
    with pytest.raises(KdistillError) as error:
        build_config(sets=[setting])
    assert str(error.value) == message


# ---------------------------------------------------------------- every setting's validation

# setting -> (a value refused, a value accepted, what the accepted one reads as); values are YAML/--set text.
CASES = {
    "data": ("[a, b]", "photos/set 1", "photos/set 1"),
    "out": ("{a: 1}", "runs/x", "runs/x"),
    "image_size": ("7", "10.0", 10),
    "val_fraction": ("1", ".25", 0.25),
    "seed": ("-1", "1_000", 1000),
    "seeds": ("1,1", "[0, 1, 2]", [0, 1, 2]),
    "loggers": ("[wandb]", "[tensorboard]", ["tensorboard"]),
    "keep_checkpoints": ("maybe", "true", True),
    "device": ("cuda:x", "cuda:1", "cuda:1"),
    "precision": ("fp16", "bf16", "bf16"),
    "threads": ("-2", "4", 4),
    "baseline": ("maybe", "no", False),
    "skip_bad": ("2", "on", True),
    "augment": ("rotate", "crop_flip", "crop_flip"),
    "rrc_scale": ("0.5, 1.5", "[0.2, 1]", [0.2, 1.0]),
    "rrc_ratio": ("0, 2", "[0.5, 2]", [0.5, 2.0]),
    "mix": ("mixcut", "both", "both"),
    "mixup_alpha": ("0", "0.4", 0.4),
    "cutmix_alpha": ("-1", "0.5", 0.5),
    "cache_dir": ("[c]", "some/cache", "some/cache"),
    "workers": ("-1", "3", 3),
    "max_image_pixels": ("0", "1E6", 1_000_000),
    "compile": ("yes please", "true", True),
    "ensemble": ("[resnet18]", "[{arch: resnet18, epochs: 3}]", [{"arch": "resnet18", "epochs": 3}]),
    "deploy_check": ("sometimes", "off", False),
    "sync_bn": ("maybe", "off", False),
    "ddp_timeout_s": ("0", "30", 30),
    "teacher.arch": ("nosuchmodule:build", "resnet18", "resnet18"),
    "teacher.weights": ("/nonexistent.pth", "none", "none"),
    "teacher.dropout": ("1", "0.3", 0.3),
    "teacher.epochs": ("0", "3", 3),
    "teacher.steps": ("-1", "300", 300),
    "teacher.patience": ("-2", "3", 3),
    "teacher.batch_size": ("8.5", "8", 8),
    "teacher.lr": ("-1", "1e-4", 1e-4),
    "teacher.lr_step": ("-1", "5", 5),
    "teacher.lr_gamma": ("0", "0.5", 0.5),
    "teacher.weight_decay": ("-1e-4", "1e-4", 1e-4),
    "teacher.optimizer": ("lion", "sgd", "sgd"),
    "teacher.momentum": ("1", "0.95", 0.95),
    "teacher.schedule": ("linear", "cosine", "cosine"),
    "teacher.progressive_from": ("0", "0.5", 0.5),
    "teacher.head_epochs": ("-1", "0", 0),
    "teacher.progressive_until": ("1.5", "0.5", 0.5),
    "teacher.warmup_epochs": ("1", "0.0", 0),  # warmup needs cosine or onecycle; the default is step
    "teacher.decay_norm_and_bias": ("sometimes", "false", False),
    "teacher.label_smoothing": ("1", "0.1", 0.1),
    "teacher.ema": ("1", "0.999", 0.999),
    "teacher.normalize": ("standard", "dataset", "dataset"),
    "teacher.mode": ("frozen", "full", "full"),
    "teacher.input_size": ("4", "128", 128),
    "student.arch": ("resnet999", "mobilenet_v3_small", "mobilenet_v3_small"),
    "student.weights": ("imagenet1k", "imagenet", "imagenet"),
    "student.dropout": ("-0.1", "0.5", 0.5),
    "student.epochs": ("many", "12", 12),
    "student.steps": ("-5", "600", 600),
    "student.patience": ("-1", "5", 5),
    "student.batch_size": ("0", "32", 32),
    "student.lr": ("nan", "3e-3", 3e-3),
    "student.lr_step": ("2.5", "10", 10),
    "student.lr_gamma": ("1.5", "1", 1.0),
    "student.weight_decay": ("true", "0.01", 0.01),
    "student.optimizer": ("nesterov", "adamw", "adamw"),
    "student.momentum": ("-0.1", "0", 0.0),
    "student.schedule": ("cos", "onecycle", "onecycle"),
    "student.progressive_from": ("1.01", "0.25", 0.25),
    "student.progressive_until": ("0", "1", 1.0),
    "student.warmup_epochs": ("-1", "0", 0),
    "student.decay_norm_and_bias": ("2", "off", False),
    "student.label_smoothing": ("-0.1", "0", 0.0),
    "student.ema": ("-0.5", "0.99", 0.99),
    "student.normalize": ("no", "imagenet", "imagenet"),
    "student.input_size": ("7", "96", 96),
    "distill.method": ("hinton", "dkd", "dkd"),
    "distill.temperature": ("0", "2", 2.0),
    "distill.alpha": ("1.5", "0.9", 0.9),
    "distill.teacher_signal": ("exact", "online", "online"),
    "distill.views": ("0", "4", 4),
    "distill.max_signal_memory_gb": ("0", "0.5", 0.5),
    "distill.feature_storage": ("int4", "int8", "int8"),
    "distill.ensemble_weights": ("-1", "[2]", [2.0]),
    "distill.unlabeled": ("/no/such/folder", "test", "test"),
    "distill.dkd.tckd_weight": ("-1", "2", 2.0),
    "distill.dkd.nckd_weight": ("-1", "0.5", 0.5),
    "distill.dkd.warmup_fraction": ("1.5", "0.25", 0.25),
    "distill.dist.ce_weight": ("-1", "0.5", 0.5),
    "distill.dist.beta": ("-1", "1", 1.0),
    "distill.dist.gamma": ("-1", "1", 1.0),
    "distill.dist.tau": ("0", "4", 4.0),
    "distill.lskd.ce_weight": ("-1", "0.1", 0.1),
    "distill.lskd.kd_weight": ("-1", "3", 3.0),
    "distill.lskd.base_temperature": ("0", "3", 3.0),
    "distill.fitnets.student_layer": ("layer 2", "layer3", "layer3"),
    "distill.fitnets.teacher_layer": ("layer 2", "layer3", "layer3"),
    "distill.fitnets.hint_weight": ("-1", "10", 10.0),
    "distill.fitnets.kd": ("maybe", "true", True),
    "distill.at.student_layers": ('["layer 1", "layer2", "layer3", "layer4"]',
                                  '["layer1", "layer2", "layer3", "layer4.1"]',
                                  ["layer1", "layer2", "layer3", "layer4.1"]),
    "distill.at.teacher_layers": ("[]", '["layer1", "layer2", "layer3", "layer4.2"]',
                                  ["layer1", "layer2", "layer3", "layer4.2"]),
    "distill.at.p": ("0", "1", 1.0),
    "distill.at.weight": ("-1", "100", 100.0),
    "distill.pefd.student_layer": ("layer 2", "layer4", "layer4"),
    "distill.pefd.teacher_layer": ("layer 2", "layer4", "layer4"),
    "distill.pefd.projectors": ("0", "2", 2),
    "distill.pefd.weight": ("-1", "10", 10.0),
    "distill.rkd.student_layer": ("layer 4", "layer4", "layer4"),
    "distill.rkd.teacher_layer": ("layer 4", "layer4", "layer4"),
    "distill.rkd.distance_weight": ("-1", "1", 1.0),
    "distill.rkd.angle_weight": ("-1", "2", 2.0),
    "distill.pkt.student_layer": ("layer 4", "layer4", "layer4"),
    "distill.pkt.teacher_layer": ("layer 4", "layer4", "layer4"),
    "distill.pkt.weight": ("-1", "100", 100.0),
    "distill.sp.student_layer": ("layer 3", "layer3", "layer3"),
    "distill.sp.teacher_layer": ("layer 3", "layer3", "layer3"),
    "distill.sp.weight": ("-1", "30", 30.0),
    "distill.crd.student_layer": ("layer 4", "layer4", "layer4"),
    "distill.crd.teacher_layer": ("layer 4", "layer4", "layer4"),
    "distill.crd.weight": ("-1", "1", 1.0),
    "distill.crd.feat_dim": ("0", "64", 64),
    "distill.crd.nce_k": ("0", "4096", 4096),
    "distill.crd.nce_temperature": ("0", "0.1", 0.1),
    "distill.crd.momentum": ("1", "0.9", 0.9),
    "distill.born_again.generations": ("0", "3", 3),
    "distill.born_again.base": ("fitnets", "dkd", "dkd"),
    "distill.dml.peer": ("no_such_net", "resnet34", "resnet34"),
}


def test_the_table_covers_every_setting():
    assert sorted(CASES) == sorted(SETTING_NAMES)


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_setting_refuses_a_bad_value_and_takes_a_good_one(tmp_path, name):
    assert name in CASES, f"add a (bad, good, expected) case for the new setting {name}"
    bad, good, expected = CASES[name]
    with pytest.raises(KdistillError) as error:
        from_yaml(tmp_path, name, bad)
    assert_one_line_naming(error, name)
    if not bad.startswith(("[", "{")):  # --set gives text; only a YAML file can give a list or a mapping
        with pytest.raises(KdistillError) as error:
            build_config(sets=[f"{name}={bad}"])
        assert_one_line_naming(error, name)
    from_file, from_set = from_yaml(tmp_path, name, good), build_config(sets=[f"{name}={good}"])
    assert value_of(from_file, name) == expected and type(value_of(from_file, name)) is type(expected)
    assert from_set == from_file


# ---------------------------------------------------------------- kdistill config / --print-config


def test_every_setting_and_section_has_a_one_line_description():
    def check(target) -> None:
        for f in dataclasses.fields(target):
            text = f.metadata.get("help", "")
            assert text and "\n" not in text, f"{f.name} needs a one-line description"
            if dataclasses.is_dataclass(getattr(target, f.name)):
                check(getattr(target, f.name))

    check(Config())


def test_config_command_prints_a_described_config_file_that_round_trips(tmp_path, capsys):
    sets = ["cache_dir=no", "student.lr=1e-4", "data=dossier été/x: y", "augment=flip"]
    assert cli.main(["config", "--preset", "seed-nguyen", *[arg for s in sets for arg in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    file = tmp_path / "printed.yaml"
    file.write_text(printed, encoding="utf-8")
    expected = build_config("seed-nguyen", sets=sets)
    assert build_config(config_files=(str(file),)) == expected
    for name, f, _ in leaves(Config()):
        key = name.rpartition(".")[2]
        assert re.search(rf"^ *{key}: .+  # {re.escape(f.metadata['help'])}$", printed, re.M), name
    assert "  lr: 0.0001  # learning rate" in printed
    saved = tmp_path / "run" / "config.yaml"  # a run folder's config.yaml is the same text
    save_config(expected, str(saved))
    assert saved.read_text(encoding="utf-8") == printed
    assert read_yaml(str(saved), "saved config") == expected.to_dict()


@pytest.mark.parametrize("command", ["run", "demo"])
def test_print_config_runs_nothing(tmp_path, capsys, command):
    out = tmp_path / "out"
    data = ["--data", str(tmp_path / "data")] if command == "run" else []
    assert cli.main([command, *data, "--out", str(out), "--set", "student.epochs=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["student"]["epochs"] == 3 and printed["out"] == str(out)
    assert not out.exists()


def test_result_differences_ignore_settings_that_do_not_change_numbers():
    old = build_config(overrides={"device": "cpu", "out": "a"}).to_dict()
    new = build_config(overrides={"device": "cuda", "out": "b"}, sets=["student.epochs=3"]).to_dict()
    assert result_differences(old, new) == ["student.epochs (40 -> 3)"]
    # Precision changes the numbers: a run folder made in bf16 is not resumed in fp32.
    assert "precision" not in NON_RESULT_KEYS
    assert result_differences(old, build_config(sets=["precision=fp32"]).to_dict()) == \
        ["precision ('auto' -> 'fp32')"]
    # A method's own section counts only for a run of that method.
    dkd_weight = ["distill.dkd.nckd_weight=2"]
    assert result_differences(old, build_config(sets=dkd_weight).to_dict()) == []
    assert result_differences(build_config(sets=["distill.method=dkd"]).to_dict(),
                              build_config(sets=["distill.method=dkd", *dkd_weight]).to_dict()) == \
        ["distill.dkd.nckd_weight (8.0 -> 2.0)"]


def test_cached_teacher_signal_with_augmentation_is_refused():
    with pytest.raises(KdistillError, match="teacher_signal"):
        build_config(sets=["augment=flip", "distill.teacher_signal=cached"])
    assert build_config().signal_mode() == "cached"
    assert build_config(sets=["augment=flip"]).signal_mode() == "views"  # both flips stored: exact
    assert build_config(sets=["augment=crop_flip"]).signal_mode() == "online"
    assert build_config(sets=["augment=crop_flip", "distill.teacher_signal=views"]).signal_mode() == "views"
    with pytest.raises(KdistillError, match="views needs augmentation"):
        build_config(sets=["distill.teacher_signal=views"])
    with pytest.raises(KdistillError, match="distill.views"):
        build_config(sets=["augment=crop_flip", "distill.views=0"])


@pytest.mark.parametrize("setting", ["seed=99999999999999999999999", "seeds=0,99999999999999999999999",
                                     "student.batch_size=1000000000000", "teacher.batch_size=100000000"])
def test_a_huge_seed_or_batch_size_is_refused_in_one_line(setting, capsys):
    assert cli.main(["config", "--set", setting]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and setting.split("=")[0] in error and "must be in [" in error
