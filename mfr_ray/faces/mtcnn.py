"""MTCNN's three stages as facenet-pytorch runs them (`detect_face`: same thresholds, pyramid and NMS),
for a batch of same-sized images, with every candidate box of a stage resampled at once by exact area
pooling (`area_crops`) instead of one interpolate call per box. The stage networks themselves may run on
an inference runtime (`mfr_ray.runtime.mtcnn`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def area_crops(integral: np.ndarray, image_inds: np.ndarray, y, ey, x, ex, size: tuple[int, int]) -> torch.Tensor:
    """Every box `[y-1:ey, x-1:ex]` of its image resampled to `size` (height, width) exactly as
    `interpolate(mode="area")` (= adaptive average pooling: output row i averages input rows
    floor(i*n/size) .. ceil((i+1)*n/size) - 1), for all boxes at once from the images' integral images
    (B, H+1, W+1, C, integers), instead of one interpolate call per box (a third of MTCNN's time)."""
    import torch

    def edges(start: np.ndarray, stop: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        n = (stop - start)[:, None]
        i = np.arange(size)[None, :]
        return start[:, None] + (i * n) // size, start[:, None] - ((-(i + 1) * n) // size)

    r0, r1 = edges(np.asarray(y, np.int64) - 1, np.asarray(ey, np.int64), size[0])
    c0, c1 = edges(np.asarray(x, np.int64) - 1, np.asarray(ex, np.int64), size[1])
    height, width, channels = integral.shape[1:]
    base = (np.asarray(image_inds, dtype=np.int64) * height)[:, None, None]
    flat = integral.reshape(-1, channels)

    def at(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:  # (K, size, size, C)
        index = (base + rows[:, :, None]) * width + cols[:, None, :]
        return flat.take(index.ravel(), axis=0).reshape(*index.shape, channels)

    sums = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    counts = (r1 - r0)[:, :, None, None] * (c1 - c0)[:, None, :, None]
    return torch.from_numpy((sums / counts).astype(np.float32).transpose(0, 3, 1, 2).copy())


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """P-Net's image scales: the smallest face maps to its 12 px window, then shrinking by `factor` while
    the shorter side stays at least 12 px."""
    scale, minl, scales = 12.0 / min_face_size, min(height, width) * 12.0 / min_face_size, []
    while minl >= 12:
        scales.append(scale)
        scale, minl = scale * factor, minl * factor
    return scales


def _normalised(crops: torch.Tensor) -> torch.Tensor:
    return (crops - 127.5) * 0.0078125


class _Stack:
    """A (B, H, W, 3) uint8 batch as integral images, so any set of boxes is resampled in one call."""

    def __init__(self, images: np.ndarray):
        import cv2

        self.batch, self.height, self.width = images.shape[:3]
        depth = cv2.CV_32S if 255 * self.height * self.width < 2**31 else cv2.CV_64F  # exact integer sums
        self.integral = np.stack([cv2.integral(image, sdepth=depth) for image in images])

    def level(self, scale: float) -> torch.Tensor:
        """Every image resampled at one pyramid scale."""
        ones, size = np.ones(self.batch), (int(self.height * scale + 1), int(self.width * scale + 1))
        full_h, full_w = np.full(self.batch, self.height), np.full(self.batch, self.width)
        return _normalised(area_crops(self.integral, np.arange(self.batch), ones, full_h, ones, full_w, size))

    def boxes(self, boxes, image_inds, size: int):
        """The boxes' (size x size) crops; boxes with an empty crop are dropped (facenet-pytorch would fail)."""
        import torch
        from facenet_pytorch.models.utils.detect_face import pad

        y, ey, x, ex = pad(boxes, self.width, self.height)
        keep = (ey > y - 1) & (ex > x - 1)
        if not keep.all():
            keep_t = torch.from_numpy(keep)
            boxes, image_inds = boxes[keep_t], image_inds[keep_t]
            y, ey, x, ex = y[keep], ey[keep], x[keep], ex[keep]
        crops = area_crops(self.integral, image_inds.numpy(), y, ey, x, ex, (size, size))
        return boxes, image_inds, _normalised(crops)


def _proposals(mtcnn, stack: _Stack, threshold: float):
    """Stage 1: P-Net over the pyramid, NMS per scale and across scales, boxes regressed and squared."""
    import torch
    from facenet_pytorch.models.utils.detect_face import batched_nms, generateBoundingBox, rerec

    boxes, image_inds, levels = [], [], []
    scales = pyramid_scales(stack.height, stack.width, mtcnn.min_face_size, mtcnn.factor)
    for level, scale in enumerate(scales):
        reg, probs = mtcnn.pnet(stack.level(scale))
        boxes_scale, inds_scale = generateBoundingBox(reg, probs[:, 1], scale, threshold)
        boxes.append(boxes_scale)
        image_inds.append(inds_scale)
        levels.append(torch.full_like(inds_scale, level))
    boxes, image_inds, levels = torch.cat(boxes), torch.cat(image_inds), torch.cat(levels)
    # NMS per image and pyramid level, as facenet-pytorch does level by level, in one call (one group each)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds * len(scales) + levels, 0.5)
    boxes, image_inds = boxes[pick], image_inds[pick]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack(
        [boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]]
    ).permute(1, 0)
    return rerec(boxes), image_inds


def _refine(mtcnn, stack: _Stack, boxes, image_inds, threshold: float):
    """Stage 2: R-Net scores and regresses the proposals' 24x24 crops."""
    import torch
    from facenet_pytorch.models.utils.detect_face import batched_nms, bbreg, rerec

    boxes, image_inds, im_data = stack.boxes(boxes, image_inds, 24)
    out0, out1 = (o.permute(1, 0) for o in mtcnn.rnet(im_data))
    score = out1[1, :]
    ipass = score > threshold
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    image_inds, mv = image_inds[ipass], out0[:, ipass].permute(1, 0)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    return rerec(bbreg(boxes[pick], mv[pick])), image_inds[pick]


def _output(mtcnn, stack: _Stack, boxes, image_inds, threshold: float):
    """Stage 3: O-Net scores the 48x48 crops and places the five landmarks; final NMS ("Min" overlap)."""
    import torch
    from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg

    boxes, image_inds, im_data = stack.boxes(boxes, image_inds, 48)
    out0, out1, out2 = (o.permute(1, 0) for o in mtcnn.onet(im_data))
    score = out2[1, :]
    ipass = score > threshold
    points = out1[:, ipass]
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    image_inds, mv = image_inds[ipass], out0[:, ipass].permute(1, 0)
    w_i, h_i = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    points_x = w_i.repeat(5, 1) * points[:5, :] + boxes[:, 0].repeat(5, 1) - 1
    points_y = h_i.repeat(5, 1) * points[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
    points = torch.stack((points_x, points_y)).permute(2, 1, 0)
    boxes = bbreg(boxes, mv)
    pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
    return boxes[pick], image_inds[pick], points[pick]


def mtcnn_detect(mtcnn, images: np.ndarray, thresholds: tuple[float, float, float] | None = None):
    """`MTCNN.detect(images, landmarks=True)` for a (B, H, W, 3) uint8 stack (keep_all, no sorting),
    with the boxes of the second and third stage resampled together (`area_crops`); same stages,
    thresholds and NMS as facenet-pytorch's `detect_face`, landmarks equal to 0.01 px. `thresholds`
    replaces the three stage thresholds of `mtcnn` for this call (the aligner's rescue pass)."""
    import torch

    stack = _Stack(images)
    first, second, third = thresholds or mtcnn.thresholds
    with torch.no_grad():
        boxes, image_inds = _proposals(mtcnn, stack, first)
        points = torch.zeros(0, 5, 2)
        if len(boxes) > 0:
            boxes, image_inds = _refine(mtcnn, stack, boxes, image_inds, second)
        if len(boxes) > 0:
            boxes, image_inds, points = _output(mtcnn, stack, boxes, image_inds, third)
    boxes, points, image_inds = boxes.numpy(), points.numpy(), image_inds.numpy()
    found = [np.flatnonzero(image_inds == i) for i in range(stack.batch)]
    return (
        [boxes[f, :4] if len(f) else None for f in found],
        [boxes[f, 4] if len(f) else [None] for f in found],
        [points[f] if len(f) else None for f in found],
    )
