"""Face networks implemented here: ArcFace's IResNet (insightface ``arcface_torch`` layout, so its
``backbone.pth`` files load by key) and MTCNN (P/R/O-Net) for the standard five landmarks.

MTCNN weights ship in the package (``data/mtcnn.safetensors``, from facenet-pytorch, MIT).
IResNet weights come from the user (e.g. the paper's Glint360K CosFace r100 ``backbone.pth``).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# IResNet (Deng et al., ArcFace), block layout as in insightface/recognition/arcface_torch.
# --------------------------------------------------------------------------------------------

IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6)}


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """(B, 3, 112, 112) RGB in [-1, 1] -> (B, num_features) identity features (not normalised)."""

    def __init__(self, layers=IRESNET_LAYERS["r100"], num_features: int = 512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
        layers = [IBasicBlock(self.inplanes, planes, 2, down)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 7, 7)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet_layers_from_state_dict(state: dict) -> tuple[int, int, int, int]:
    """Blocks per stage, read from ``layerN.M.*`` keys of an arcface_torch state dict."""
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not idx:
            raise ValueError(f"no layer{stage}.* keys")
        counts.append(max(idx) + 1)
    return tuple(counts)


# --------------------------------------------------------------------------------------------
# MTCNN (Zhang et al. 2016): three cascaded networks, weights as in facenet-pytorch.
# --------------------------------------------------------------------------------------------


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1, self.pool1 = nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)  # box offsets, face probability maps


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1, self.pool1 = nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2, self.pool2 = nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()  # the original (Caffe) flatten order
        x = self.prelu4(self.dense4(x.flatten(1)))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1, self.pool1 = nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2, self.pool2 = nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3, self.pool3 = nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)  # boxes, landmarks, probs


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; ``method`` "union" (IoU) or "min" (overlap / smaller area)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)
    keep = []
    while order.size:
        i = order[-1]
        keep.append(i)
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2], b[:, 3] = b[:, 0] + side, b[:, 1] + side
    return b


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, :4] += reg * np.stack([w, h, w, h], 1)
    return b


class MTCNN:
    """Face boxes and five landmarks (eye centres, nose tip, mouth corners), as ArcFace expects.

    Follows the standard three-stage cascade (min face 20 px, scale factor 0.709, thresholds
    0.6/0.7/0.7) with the packaged weights.
    """

    def __init__(self, weights: dict[str, torch.Tensor], min_face: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        self.pnet, self.rnet, self.onet = PNet().eval(), RNet().eval(), ONet().eval()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            net.load_state_dict({k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")})
        self.min_face, self.thresholds, self.factor = min_face, thresholds, factor

    def _crops(self, img: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
        _, h, w = img.shape
        out = []
        for x1, y1, x2, y2 in boxes[:, :4].astype(np.int64):
            x1, y1, x2, y2 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
            patch = img[:, y1 - 1 : y2, x1 - 1 : x2].unsqueeze(0)
            out.append(F.interpolate(patch, size=(size, size), mode="area"))
        return (torch.cat(out) - 127.5) * 0.0078125

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB -> boxes (N, 5: x1, y1, x2, y2, score) and landmarks (N, 5, 2)."""
        img = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)  # (3, H, W)
        _, h, w = img.shape
        m = 12.0 / self.min_face
        scales, side = [], min(h, w) * m
        while side >= 12:
            scales.append(m * self.factor ** len(scales))
            side *= self.factor
        found = []
        for scale in scales:  # stage 1: proposals over an image pyramid
            data = F.interpolate(img[None], size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, prob = self.pnet((data - 127.5) * 0.0078125)
            p = prob[0, 1].numpy()
            ys, xs = np.nonzero(p >= self.thresholds[0])
            if not len(ys):
                continue
            cells = np.stack([xs, ys], 1).astype(np.float64)
            q1, q2 = np.floor((2 * cells + 1) / scale), np.floor((2 * cells + 12) / scale)
            offsets = reg[0].numpy()[:, ys, xs].T
            b = np.hstack([q1, q2, p[ys, xs][:, None], offsets])
            found.append(b[_nms(b[:, :4], b[:, 4], 0.5)])
        if not found:
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        b = np.vstack(found)
        b = b[_nms(b[:, :4], b[:, 4], 0.7)]
        boxes = _square(np.hstack([_regress(b[:, :4], b[:, 5:9]), b[:, 4:5]]))
        # stage 2: refine
        reg, prob = self.rnet(self._crops(img, boxes, 24))
        keep = prob[:, 1].numpy() > self.thresholds[1]
        boxes, reg = np.hstack([boxes[keep, :4], prob[keep, 1].numpy()[:, None]]), reg[keep].numpy()
        if not len(boxes):
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        pick = _nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        # stage 3: output boxes and landmarks
        reg, pts, prob = self.onet(self._crops(img, boxes, 48))
        keep = prob[:, 1].numpy() > self.thresholds[2]
        boxes, reg, pts = np.hstack([boxes[keep, :4], prob[keep, 1].numpy()[:, None]]), reg[keep].numpy(), pts[keep].numpy()
        if not len(boxes):
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        xs = bw[:, None] * pts[:, :5] + boxes[:, 0:1] - 1
        ys = bh[:, None] * pts[:, 5:] + boxes[:, 1:2] - 1
        landmarks = np.stack([xs, ys], -1)  # (N, 5, 2)
        boxes = _regress(boxes, reg)
        pick = _nms(boxes[:, :4], boxes[:, 4], 0.7, "min")
        return boxes[pick], landmarks[pick]
