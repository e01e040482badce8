"""What one training step optimises: the model (backbone + the head its objective asks for, with the
distilled layer exposed, and the frozen teacher when the objective asks for one) and the configured
objective's loss (`mfr_ray.train.objectives`)."""

from __future__ import annotations

import types

import torch
from torch import nn

from mfr_ray.train.config import TrainConfig
from mfr_ray.train.objectives.base import EMBEDDING_LAYER, LossTerms, Objective, StepOutputs


class LayerTap:
    """The output of one backbone module, captured by a forward hook: the distilled layer when it is not
    the embedding itself."""

    def __init__(self, backbone: nn.Module, layer: str):
        modules = dict(backbone.named_modules())
        if layer not in modules:
            raise ValueError(f"distill_layer {layer!r} is not a module of the backbone")
        self.output: torch.Tensor | None = None
        modules[layer].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self.output = output


def distilled_features(backbone: nn.Module, tap: LayerTap | None, images: torch.Tensor):
    """(embeddings, distilled features) of one forward pass."""
    embeddings = backbone(images)
    return embeddings, embeddings if tap is None else tap.output.flatten(1)


class FrozenTeacher(nn.Module):
    """The starting checkpoint, frozen: always in eval mode (BatchNorm uses and keeps its running
    statistics), no parameter requires a gradient, forward runs without autograd."""

    def __init__(self, backbone: nn.Module, distill_layer: str = EMBEDDING_LAYER):
        super().__init__()
        self.backbone = backbone
        self._tap = None if distill_layer == EMBEDDING_LAYER else LayerTap(backbone, distill_layer)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return distilled_features(self.backbone, self._tap, images)[1]


class FaceTrainModel(nn.Module):
    """Backbone + optional classification head in one module, so DDP synchronises both. `forward` returns
    the embeddings, the head's logits (None without a head) and the distilled layer's output.

    The frozen teacher rides along as a plain attribute, not a registered submodule: it moves with the
    model (`.to(device)`), but stays out of `state_dict` (state.pt, model.pt), `parameters()` (optimiser,
    gradient clipping) and DDP's gradient and buffer synchronisation."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None,
        distill_layer: str = EMBEDDING_LAYER,
        teacher: FrozenTeacher | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.distill_layer = distill_layer
        self._tap = None if distill_layer == EMBEDDING_LAYER else LayerTap(backbone, distill_layer)
        object.__setattr__(self, "teacher", teacher)  # bypasses nn.Module's registration on purpose

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        embeddings, features = distilled_features(self.backbone, self._tap, images)
        logits = self.head(embeddings, labels) if self.head is not None and labels is not None else None
        return embeddings, logits, features


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_batchnorm(backbone: nn.Module) -> int:
    """Keep every BatchNorm layer of `backbone` in eval mode whatever `.train()` later asks (it normalises
    with, and keeps, the checkpoint's running statistics; its scale and shift still train). Returns how
    many layers were frozen."""
    layers = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.train = types.MethodType(_stay_in_eval, layer)
        layer.train(False)
    return len(layers)


def build_model(cfg: TrainConfig, num_classes: int) -> FaceTrainModel:
    """Backbone (from the configured checkpoint, or fresh), the head sized to the label map when the
    objective needs one and, when it needs the frozen teacher, a second copy of the checkpoint read from
    where it is stored (so a resumed run gets the same teacher, whatever the training state holds)."""
    from mfr_ray.models import create_head

    objective = cfg.loss
    backbone = cfg.model.load(cfg.storage).train()  # a file, s3:// or models:/, weights only
    if cfg.model.batchnorm == "frozen":
        freeze_batchnorm(backbone)
    head = None
    if objective.needs_head:
        head = create_head(cfg.model.head, backbone.embedding_size, num_classes, **cfg.model.head_kwargs)
    teacher = None
    if objective.needs_teacher:  # TrainConfig refuses a frozen teacher without model.checkpoint
        teacher = FrozenTeacher(cfg.model.load(cfg.storage), objective.feature_layer)
    return FaceTrainModel(backbone, head, objective.feature_layer, teacher)


def compute_loss(
    objective: Objective,
    model: nn.Module,
    unmasked: torch.Tensor,
    masked: torch.Tensor | None,
    labels: torch.Tensor,
) -> LossTerms:
    """One forward pass over the unmasked and masked crops stacked together (plus the frozen teacher's on
    the unmasked crops, when there is one), and the objective's loss. `model` is the FaceTrainModel or its
    DDP wrapper."""
    with_masked = masked is not None
    images = torch.cat([unmasked, masked]) if with_masked else unmasked
    row_labels = torch.cat([labels, labels]) if with_masked else labels
    embeddings, logits, features = model(images, row_labels)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    teacher_features = core.teacher(unmasked).float() if core.teacher is not None else None
    outputs = StepOutputs(embeddings, logits, features, labels, row_labels, with_masked, teacher_features)
    return objective.loss(outputs)
