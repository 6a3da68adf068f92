"""The settings of one model (the teacher, an ensemble member, the student): its architecture and
weights, its schedule and optimizer, and the size of the views it sees."""
from __future__ import annotations

from dataclasses import dataclass

from .settings import redefault, setting

MAX_BATCH_SIZE = 65536  # no recipe uses batches this large; torch's allocator would fail with a traceback


@dataclass
class TrainConfig:
    arch: str = setting("resnet18", "a torchvision classification model name, timm:NAME (pip install "
                                    "'kdistill[timm]'), or module:callable (optionally with literal keyword "
                                    "arguments, module:callable(width=2)) returning an nn.Module")
    weights: str = setting("none", "imagenet (the library's pretrained weights: torchvision's IMAGENET1K_V1, "
                                   "timm's default), none (random init, or whatever a module:callable returns) or a "
                                   "local .pth/.safetensors state_dict; a teacher with epochs 0 loads it whole, head "
                                   "included, or a kdistill student.pt bundle")
    dropout: float = setting(0.0, "> 0: the head is Dropout(p) + Linear, else a plain Linear", ge=0, lt=1)
    epochs: int = setting(10, "training epochs", ge=0)
    patience: int = setting(0, "stop training when this many epochs bring no better val accuracy than the best "
                               "(the best epoch's weights are kept, as always); 0: train every epoch", ge=0)
    steps: int = setting(0, "optimizer steps to train for (0: epochs decides); > 0 sets epochs to the fewest whole "
                            "epochs that reach it on the run's training images (the student's: with the transfer "
                            "set; the baseline gets as many steps on its own), so a recipe fits datasets of any "
                            "size", ge=0)
    batch_size: int = setting(64, "images per training step", ge=1, le=MAX_BATCH_SIZE)
    optimizer: str = setting("adam", "adam, adamw (decoupled weight decay) or sgd (Nesterov, with momentum)",
                             choices=("adam", "adamw", "sgd"))
    momentum: float = setting(0.9, "momentum of sgd (unused by adam and adamw)", ge=0, lt=1)
    lr: float = setting(1e-3, "learning rate (the peak of cosine and onecycle)", gt=0)
    schedule: str = setting(
        "step", "step: StepLR every lr_step epochs; cosine: linear warmup over warmup_epochs from lr/100, then "
                "cosine annealing to 0; onecycle: OneCycleLR peaking at lr; cosine and onecycle step every batch",
        choices=("step", "cosine", "onecycle"))
    lr_step: int = setting(0, "StepLR step size in epochs (schedule step); 0 keeps the learning rate constant", ge=0)
    lr_gamma: float = setting(0.1, "factor applied to the learning rate every lr_step epochs", gt=0, le=1)
    warmup_epochs: int = setting(0, "epochs of rising learning rate: cosine's linear warmup, onecycle's rise "
                                    "(0: OneCycleLR's default 30% of training)", ge=0)
    weight_decay: float = setting(0.0, "weight decay (L2 in adam and sgd, decoupled in adamw)", ge=0)
    decay_norm_and_bias: bool = setting(True, "false: biases and norm weights (every parameter with ndim <= 1) "
                                              "get no weight decay")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy term, in [0, 1)", ge=0, lt=1)
    ema: float = setting(0.0, "decay of an exponential moving average of the weights, updated every step and "
                              "evaluated beside them (the better is kept as best); 0: off", ge=0, lt=1)
    normalize: str = setting(
        "auto", "input standardization: imagenet statistics, the training set's, or auto (imagenet for "
                "pretrained weights, the training set's for a model trained from scratch)",
        choices=("auto", "imagenet", "dataset"))
    input_size: int = setting(0, "smallest side in pixels of the images the model sees: where image_size is "
                                 "smaller, every batch (the student's and the teacher's one exact view) is resized "
                                 "up to it, bilinearly, inside the model, in training and deployed; 0: image_size. "
                                 "A network made for ImageNet does better on a larger view of small images, at the "
                                 "cost of its compute")
    progressive_from: float = setting(1.0, "progressive resizing: the share of its side the model's training views "
                                           "start at (e.g. 0.5), growing linearly to the whole side by "
                                           "progressive_until of the epochs; evaluation always sees the whole side; "
                                           "1: off", gt=0, le=1)
    progressive_until: float = setting(0.75, "the share of the epochs after which training views are whole",
                                       gt=0, le=1)


@dataclass
class TeacherConfig(TrainConfig):
    arch: str = redefault(TrainConfig, "arch", "resnet34")
    weights: str = redefault(TrainConfig, "weights", "imagenet")
    mode: str = setting("head", "head: backbone frozen, only the new head trains; full: fine-tune all",
                        choices=("head", "full"))
    head_epochs: int = setting(0, "mode full: the first head_epochs epochs train the new head alone on the frozen "
                                  "backbone (its BatchNorm statistics kept), the rest the whole model (linear "
                                  "probing, then fine-tuning); 0: the whole model from the start", ge=0)


def input_side(part: TrainConfig, image_size: int) -> int:
    """The side of the images a model sees: its input_size where larger than image_size."""
    return max(part.input_size, image_size)


def upsampled_side(part: TrainConfig, image_size: int) -> int:
    """The side a model resizes its views up to (models.Standardized's input_size); 0: none."""
    return part.input_size if part.input_size > image_size else 0


@dataclass
class StudentConfig(TrainConfig):
    epochs: int = redefault(TrainConfig, "epochs", 40)
