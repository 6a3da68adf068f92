import pytest

from kdistill.config import build_config, preset_names, result_differences
from kdistill.errors import KdistillError


def test_presets_hold_the_seed_recipes():
    assert {"seed-nguyen", "seed-shen", "demo"} <= set(preset_names())
    nguyen = build_config("seed-nguyen")
    assert (nguyen.teacher.mode, nguyen.teacher.dropout, nguyen.teacher.epochs, nguyen.teacher.batch_size) == \
        ("head", 0.5, 10, 64)
    assert (nguyen.student.epochs, nguyen.student.lr_step, nguyen.distill.temperature, nguyen.distill.alpha) == \
        (40, 10, 2.0, 0.25)
    shen = build_config("seed-shen")
    assert (shen.teacher.epochs, shen.teacher.batch_size, shen.student.epochs, shen.student.batch_size) == (5, 32, 50, 32)
    assert (shen.teacher.dropout, shen.distill.temperature, shen.distill.alpha) == (0.0, 4.0, 0.7)


def test_layers_override_in_order(tmp_path):
    file = tmp_path / "my.yaml"
    file.write_text("image_size: 96\nstudent:\n  epochs: 7\n")
    cfg = build_config("seed-shen", (str(file),), {"seed": 3}, ["student.epochs=20", "distill.alpha=0.5"])
    assert (cfg.image_size, cfg.student.epochs, cfg.distill.alpha, cfg.seed) == (96, 20, 0.5, 3)
    assert cfg.teacher.epochs == 5  # untouched preset value


@pytest.mark.parametrize("setting, fragment", [
    ("distill.temperature=0", "distill.temperature"),
    ("distill.alpha=1.5", "distill.alpha"),
    ("student.arch=resnet999", "student.arch"),
    ("teacher.epochs=0", "teacher.epochs"),
    ("student.lr=-1", "student.lr"),
    ("teacher.weights=/nonexistent.pth", "teacher.weights"),
    ("teacher.arch=nosuchmodule:build", "teacher.arch"),
    ("image_size=big", "image_size"),
    ("colour=red", "colour"),
    ("student.unknown_key=1", "student.unknown_key"),
    ("augment=rotate", "augment"),
    ("augment=flip", None),  # valid
])
def test_bad_settings_fail_up_front_naming_the_setting(setting, fragment):
    if fragment is None:
        assert build_config("seed-nguyen", sets=[setting]).augment == "flip"
        return
    with pytest.raises(KdistillError) as error:
        build_config("seed-nguyen", sets=[setting])
    assert fragment in str(error.value) and "\n" not in str(error.value)


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


def test_yaml_with_code_is_not_executed(tmp_path):
    file = tmp_path / "evil.yaml"
    file.write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(KdistillError, match="not valid YAML"):
        build_config(config_files=(str(file),))


def test_result_differences_ignore_settings_that_do_not_change_numbers():
    old = build_config(overrides={"device": "cpu", "out": "a"}).to_dict()
    new = build_config(overrides={"device": "cuda", "out": "b"}, sets=["student.epochs=3"]).to_dict()
    assert result_differences(old, new) == ["student.epochs (40 -> 3)"]
