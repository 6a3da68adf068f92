"""The presets: each one's keys are settings, and what each promises (seed-nguyen's schedule and head,
the recommended preset's stored hint and the layers it finds at each image size) holds."""
import pytest
import torch

from kdistill.config import Config, build_config, input_side, load_preset, preset_names, upsampled_side
from kdistill.features import output_shapes, resolve_auto_layers
from kdistill.models import build_model, trainable_part
from kdistill.settings import leaves
from kdistill.teacher_signal import COMPACT_DTYPE, feature_megabytes
from lr_rates import learning_rates

SETTING_NAMES = [name for name, _, _ in leaves(Config())]


def test_seed_nguyen_student_learning_rate_drops_tenfold_every_ten_epochs():
    rates = learning_rates(build_config("seed-nguyen").student, 1)
    assert rates == pytest.approx([1e-3] * 10 + [1e-4] * 10 + [1e-5] * 10 + [1e-6] * 10, rel=1e-9)
    shen = learning_rates(build_config("seed-shen").student, 1)
    assert len(shen) > 1 and len(set(shen)) == 1  # Shen: a constant learning rate


def test_seed_nguyen_teacher_trains_only_a_dropout_linear_head():
    teacher = build_config("seed-nguyen").teacher
    model, head = build_model(teacher.arch, 10, teacher.dropout, weights="none")
    layers = list(model.get_submodule(head).children())
    assert [type(layer) for layer in layers] == [torch.nn.Dropout, torch.nn.Linear]
    assert layers[0].p == 0.5 and layers[1].out_features == 10
    trainable = trainable_part(model, head, teacher.mode == "head")
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert trained == {id(p) for p in layers[1].parameters()} == {id(p) for p in trainable.parameters()}


@pytest.mark.parametrize("preset", preset_names())
def test_preset_keys_are_all_settings(preset):
    def names(mapping: dict, prefix: str = "") -> set[str]:
        found = set()
        for key, value in mapping.items():
            found |= names(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
        return found

    assert names(load_preset(preset)) <= set(SETTING_NAMES)
    build_config(preset)  # every value valid


def test_the_recommended_preset_stores_kd_and_the_hint_for_each_view():
    """Its teacher's logits and hint features are stored for as many views as student epochs where
    they fit. At 64 px both models see 128 px; the hint is matched at 64 px: EfficientNet-Lite0's
    _blocks.10 for 7,800 images x 30 views (3.1 GiB) fits the default memory limit in float16, the
    default ResNet34's layer3 (7.1 GiB) does not, but does in 8 bits (3.6 GiB), so auto stores it so
    rather than running that teacher online (tests/test_compact_features.py)."""
    for teacher, layer, hint, fits in (("resnet34", "layer3", (256, 8, 8), False),
                                       ("kdistill.zoo:efficientnet_lite0", "_blocks.10", (112, 8, 8), True)):
        cfg = resolve_auto_layers(build_config("recommended", overrides={"image_size": 64},
                                               sets=[f"teacher.arch={teacher}", "teacher.weights=none"]),
                                  lambda message: None)
        assert (input_side(cfg.teacher, 64), input_side(cfg.student, 64)) == (128, 128)
        hint_settings = (cfg.distill.method, cfg.distill.fitnets.kd, cfg.distill.fitnets.teacher_layer)
        assert hint_settings == ("fitnets", True, layer)
        assert cfg.signal_mode() == "views" and cfg.distill.views == cfg.student.epochs
        assert dict(output_shapes(cfg.teacher.arch, 128))[layer] == hint
        gigabytes = feature_megabytes({layer: hint}, 7800 * cfg.distill.views) / 1024
        assert (gigabytes < cfg.distill.max_signal_memory_gb) == fits
        in_8_bits = feature_megabytes({layer: hint}, 7800 * cfg.distill.views, COMPACT_DTYPE) / 1024
        assert in_8_bits < cfg.distill.max_signal_memory_gb and cfg.distill.feature_storage == "auto"


def test_auto_layers_match_the_teacher_at_the_size_it_sees():
    """A teacher that sees 64 px views at 128 px has the student's 8x8 layer2 map one stage deeper."""
    cfg = build_config("recommended", overrides={"image_size": 64}, sets=["teacher.input_size=128"])
    assert resolve_auto_layers(cfg, lambda message: None).distill.fitnets.teacher_layer == "layer3"
    assert dict(output_shapes(cfg.teacher.arch, 128))["layer3"] == (256, 8, 8)


def test_input_size_is_a_smallest_side_so_larger_images_are_left_as_they_are():
    for image_size, side, upsampled in ((64, 128, 128), (128, 128, 0), (224, 128, 0)):
        cfg = build_config("recommended", overrides={"image_size": image_size}, sets=["student.input_size=128"])
        assert (input_side(cfg.student, image_size), upsampled_side(cfg.student, image_size)) == (
            max(side, image_size), upsampled)
    assert upsampled_side(Config().teacher, 64) == 0  # input_size 0: image_size


def test_auto_layers_match_the_students_map_at_image_size_not_its_upsampling():
    """A student that sees 64 px views at 128 px has a 16x16 layer2, pooled to the teacher's 8x8 in
    training: the teacher's module stays the one for 64 px, and so does the size of its features."""
    for student_size in (0, 128):
        cfg = build_config("recommended", overrides={"image_size": 64},
                           sets=["teacher.input_size=128", f"student.input_size={student_size}"])
        assert resolve_auto_layers(cfg, lambda message: None).distill.fitnets.teacher_layer == "layer3"
    assert dict(output_shapes(cfg.student.arch, 128))["layer2"] == (128, 16, 16)


def test_the_recommended_preset_finds_a_hint_layer_where_no_teacher_map_has_the_students_size():
    """Both models see 128 px below it, so a student's layer2 at image_size has no teacher map of its
    size between 64 and 128 px: auto takes the nearest, and at 112 px that is the teacher's 16x16
    layer2, the map the student's layer2 gives at the 128 px it sees."""
    for teacher in ("resnet34", "kdistill.zoo:efficientnet_lite0"):
        for image_size in (48, 80, 112):  # no teacher map has the student's size (64 px: the test above)
            cfg = build_config("recommended", overrides={"image_size": image_size},
                               sets=[f"teacher.arch={teacher}", "teacher.weights=none"])
            layer = resolve_auto_layers(cfg, lambda message: None).distill.fitnets.teacher_layer
            teacher_map = dict(output_shapes(teacher, input_side(cfg.teacher, image_size)))[layer]
            student_map = dict(output_shapes("resnet18", image_size))["layer2"]
            assert 1 / 2 < teacher_map[1] / student_map[1] < 2, (teacher, image_size, layer)
    logged = []
    resolve_auto_layers(build_config("recommended", overrides={"image_size": 112}), logged.append)
    assert logged == ["distill.fitnets.teacher_layer: auto is the teacher's layer2 (128, 16, 16), for the student's "
                      "layer2 (128, 14, 14) at 112 px; it sees 128 px, where that map is (128, 16, 16)"]
    resolve_auto_layers(build_config("recommended", overrides={"image_size": 64}), logged.append)
    assert logged[1].endswith("at 64 px; it sees 128 px, where that map is (128, 16, 16); in training the larger "
                              "is average-pooled to 8x8")


def test_layers_override_in_order(tmp_path):
    file = tmp_path / "my.yaml"
    file.write_text("image_size: 96\nstudent:\n  epochs: 7\n")
    cfg = build_config("seed-shen", (str(file),), {"seed": 3}, ["student.epochs=20", "distill.alpha=0.5"])
    assert (cfg.image_size, cfg.student.epochs, cfg.distill.alpha, cfg.seed) == (96, 20, 0.5, 3)
    assert cfg.teacher.epochs == 5  # untouched preset value

