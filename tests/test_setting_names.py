"""A setting added later meets run and sweep folders saved before it: whether such a folder resumes
under the new setting (config_diff.missing_setting_keeps_results) must be decided when it is added.
A methods sweep was refused on resume for want of that decision (distill.feature_storage)."""
from kdistill.config import config_from_dict
from kdistill.config_diff import _setting_names

# Every setting as of 2026-12-06; a new one joins after its decision in config_diff.
KNOWN = {
    "augment", "baseline", "cache_dir", "compile", "cutmix_alpha", "data", "ddp_timeout_s", "deploy_check",
    "device", "distill.alpha", "distill.at.p", "distill.at.student_layers", "distill.at.teacher_layers",
    "distill.at.weight", "distill.born_again.base", "distill.born_again.generations", "distill.crd.feat_dim",
    "distill.crd.momentum", "distill.crd.nce_k", "distill.crd.nce_temperature", "distill.crd.student_layer",
    "distill.crd.teacher_layer", "distill.crd.weight", "distill.dist.beta", "distill.dist.ce_weight",
    "distill.dist.gamma", "distill.dist.tau", "distill.dkd.nckd_weight", "distill.dkd.tckd_weight",
    "distill.dkd.warmup_fraction", "distill.dml.peer", "distill.ensemble_weights", "distill.feature_storage",
    "distill.fitnets.hint_weight", "distill.fitnets.kd", "distill.fitnets.student_layer",
    "distill.fitnets.teacher_layer", "distill.lskd.base_temperature", "distill.lskd.ce_weight",
    "distill.lskd.kd_weight", "distill.max_signal_memory_gb", "distill.method", "distill.pefd.projectors",
    "distill.pefd.student_layer", "distill.pefd.teacher_layer", "distill.pefd.weight",
    "distill.pkt.student_layer", "distill.pkt.teacher_layer", "distill.pkt.weight", "distill.rkd.angle_weight",
    "distill.rkd.distance_weight", "distill.rkd.student_layer", "distill.rkd.teacher_layer",
    "distill.sp.student_layer", "distill.sp.teacher_layer", "distill.sp.weight", "distill.teacher_signal",
    "distill.temperature", "distill.unlabeled", "distill.views", "ensemble", "image_size", "keep_checkpoints",
    "loggers", "max_image_pixels", "mix", "mixup_alpha", "out", "precision", "rrc_ratio", "rrc_scale", "seed",
    "seeds", "skip_bad", "student.arch", "student.batch_size", "student.decay_norm_and_bias", "student.dropout",
    "student.ema", "student.epochs", "student.input_size", "student.label_smoothing", "student.lr",
    "student.lr_gamma", "student.lr_step", "student.momentum", "student.normalize", "student.optimizer",
    "student.patience", "student.progressive_from", "student.progressive_until", "student.schedule",
    "student.steps", "student.warmup_epochs", "student.weight_decay", "student.weights", "sync_bn",
    "teacher.arch", "teacher.batch_size", "teacher.decay_norm_and_bias", "teacher.dropout", "teacher.ema",
    "teacher.epochs", "teacher.head_epochs", "teacher.input_size", "teacher.label_smoothing", "teacher.lr",
    "teacher.lr_gamma", "teacher.lr_step", "teacher.mode", "teacher.momentum", "teacher.normalize",
    "teacher.optimizer", "teacher.patience", "teacher.progressive_from", "teacher.progressive_until",
    "teacher.schedule", "teacher.steps", "teacher.warmup_epochs", "teacher.weight_decay", "teacher.weights",
    "threads", "val_fraction", "workers"
}


def test_every_new_setting_was_decided_for_folders_saved_before_it():
    names = _setting_names(config_from_dict({"data": "unused"}).to_dict())
    new = sorted(names - KNOWN)
    assert not new, (f"new settings {new}: decide in kdistill/config_diff.py (missing_setting_keeps_results) "
                     "whether a folder saved before them resumes unchanged under them, then add them to KNOWN")
    assert not KNOWN - names, f"settings gone: {sorted(KNOWN - names)}; take them out of KNOWN"
