"""Which settings change a run's numbers: what a resumed run, a sweep point and the processes of a
distributed run must agree on, and what a run folder saved before a setting existed may lack."""
from __future__ import annotations

import functools

from .compute import Ranks
from .config import Config, upsampled_side
from .errors import KdistillError
from .student_plan import BORN_AGAIN, METHODS

# Settings that change where or how fast a run goes, never its numbers.
NON_RESULT_KEYS = {"out", "device", "threads", "workers", "loggers", "keep_checkpoints", "cache_dir", "skip_bad",
                   "baseline", "compile", "deploy_check", "ddp_timeout_s"}
# Model settings added later whose value then reproduces what kdistill did before them.
LATER_MODEL_SETTINGS = {"steps": 0, "patience": 0, "progressive_from": 1.0, "progressive_until": 0.75,
                        "head_epochs": 0}
# Other settings added later whose given value reproduces what kdistill did before them (float16 was the
# only storage for teacher features; auto may store them in 8 bits where float16 does not fit).
LATER_SETTINGS = {"distill.feature_storage": "float16"}


def _unused_method_section(section: str, *methods: str | None) -> bool:
    """Whether distill.<section> holds the settings of a method none of methods is: they change no number."""
    return section in METHODS and section not in methods


def _methods_of(distill: dict) -> tuple[str | None, ...]:
    """The methods a saved distill section uses: distill.method, and for born_again the base its
    generations are distilled with."""
    method = distill.get("method")
    return (method, distill.get(BORN_AGAIN, {}).get("base")) if method == BORN_AGAIN else (method,)


def missing_setting_keeps_results(name: str, cfg: Config) -> bool:
    """Whether a run folder saved before setting `name` existed resumes unchanged under cfg: the setting
    changes no numbers, or belongs to a method cfg does not use, or holds the value that reproduces what
    kdistill did before it (several processes and several teachers came later; stored features too)."""
    top, _, rest = name.partition(".")
    if top in NON_RESULT_KEYS or top == "sync_bn":  # sync_bn acts only with several processes
        return True
    if top == "distill" and "." in rest:
        return _unused_method_section(rest.split(".")[0], cfg.distill.method, cfg.distilling_method())
    if rest in LATER_MODEL_SETTINGS and (top in ("teacher", "student") or top.startswith("ensemble")):
        return getattr(cfg.student if top == "student" else cfg.teacher, rest) == LATER_MODEL_SETTINGS[rest]
    return ((name == "ensemble" and not cfg.ensemble)
            or (name == "distill.ensemble_weights" and not cfg.distill.ensemble_weights)
            or (name in ("distill.max_signal_memory_gb", "distill.feature_storage")
                and not cfg.distiller().teacher_features())
            or (name in LATER_SETTINGS and functools.reduce(getattr, name.split("."), cfg) == LATER_SETTINGS[name])
            or (name == "teacher.input_size" and not upsampled_side(cfg.teacher, cfg.image_size))
            or (name == "student.input_size" and not upsampled_side(cfg.student, cfg.image_size)))


def result_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring settings that don't change results:
    those in NON_RESULT_KEYS, and the section distill.<method> of a method neither config uses."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if not prefix and key in NON_RESULT_KEYS:
            continue
        if prefix == "distill." and _unused_method_section(key, *_methods_of(old), *_methods_of(new)):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += result_differences(a, b, prefix=f"{name}.")
        elif a != b:
            diffs.append(f"{name} ({a!r} -> {b!r})")
    return diffs


def check_same_experiment(ranks: Ranks, settings: dict, data_identity: dict) -> None:
    """Processes started with other settings or other data would train together on different things
    (or hang in a collective when their epochs differ): each process compares what it was given with
    rank 0's, so all of them stop alike, in one line naming the first difference."""
    if not ranks.joined:
        return
    # The data is compared by content: nodes may mount the same images at different paths.
    settings = {key: value for key, value in settings.items() if key != "data"}
    given = ranks.gather({"settings": settings, "data": data_identity})
    for rank, theirs in enumerate(given[1:], 1):
        differences = result_differences(given[0]["settings"], theirs["settings"])
        if theirs["data"] != given[0]["data"]:
            differences.append(f"the data (content key {given[0]['data'].get('key')} -> {theirs['data'].get('key')})")
        if differences:
            raise KdistillError(f"process {rank} of {ranks.world_size} was given another experiment than process 0: "
                                f"{differences[0]}; start every process with the same settings and data")


def _setting_names(settings: dict, prefix: str = "") -> set[str]:
    names = set()
    for key, value in settings.items():
        names |= _setting_names(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return names


def _copy_setting(source: dict, target: dict, name: str) -> None:
    *sections, key = name.split(".")
    for section in sections:
        source, target = source[section], target.setdefault(section, {})
    target[key] = source[key]


def saved_differences(saved: dict, cfg: Config, holder: str) -> list[str]:
    """The result-relevant differences between a run folder's saved settings and cfg. A setting the
    folder lacks (saved before it existed) counts as the same where its value reproduces what kdistill
    did before it; any other missing setting is refused, in one line starting with holder."""
    current = cfg.to_dict()
    missing = sorted(_setting_names(current) - _setting_names(saved))
    for name in [name for name in missing if missing_setting_keeps_results(name, cfg)]:
        missing.remove(name)
        _copy_setting(current, saved, name)  # so that it is not reported as a difference below
    if missing:
        repeat = [f"{name}={LATER_SETTINGS[name]}" for name in missing if name in LATER_SETTINGS]
        raise KdistillError(f"{holder} a run made by an older kdistill (it has no setting "
                            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); use another --out"
                            + (f", or set {' '.join(repeat)} to go on as it began" if repeat else ""))
    return result_differences(saved, current)
