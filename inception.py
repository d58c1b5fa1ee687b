"""The 2015 TensorFlow Inception graph of the FID / IS literature, in plain PyTorch, and its weight loader.

The ADM evaluator (Dhariwal & Nichol 2021, the suite behind REPA's and REG's FID / sFID / IS / precision /
recall) runs TensorFlow's `classify_image_graph_def.pb` ("inception-2015-12-05"). That graph is an Inception-v3
(Szegedy et al. 2016) with a few quirks that change its activations, all reproduced here:

    input           float images in [0, 255], NHWC, any size
    ResizeBilinear  to 299 x 299, TF1 semantics (align_corners=False, no half-pixel centres, no antialias)
    Sub, Mul        x -> (x - 128) / 128                                  (not 2 x / 255 - 1)
    pooling         the avg-pool branches of the Mixed blocks ignore the zero padding (count_include_pad=False);
                    the pool branch of the last block (mixed_10 = Mixed_7c) is a 3x3 *max* pool
    softmax         1008 classes (1000 ImageNet classes and 8 unused ones)

Outputs used by the evaluator:

    pool_3          [N, 2048]  global average pool of the last block               FID, precision / recall
    mixed_6/conv    [N, 17, 17, 192] the 1x1 branch of mixed_6 (= Mixed_6d); its first 7 channels, flattened in
                    TF's NHWC order (h, w, c), give the [N, 2023] spatial feature of sFID
    logits          pool_3 @ W, *without* the bias (ADM and the original IS code take only the weight matrix)

Weights: the published PyTorch conversion of that graph, `pt_inception-2015-12-05-6726825d.pth`, a state dict in
torchvision's Inception3 layout (num_classes=1008, no auxiliary head), released by the pytorch-fid project:
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
`load_inception` checks every key and shape and returns the file's SHA-256. torch.hub names weight files with the
first hex digits of their SHA-256, so the published file should hash to 6726825d...; evaluate.py warns otherwise
(not verified against the published file here: the development machine is offline).
"""
import hashlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import MissingFileError, UsageError, load_torch_file, show_some, state_dict_mismatch

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 of mixed_6/conv's 192 channels: 7 * 17 * 17 = 2023 features


# ----------------------------------------------------------------------------------------------------------------
# Input: TF1 ResizeBilinear and the graph's scaling
# ----------------------------------------------------------------------------------------------------------------

def _tf1_lerp_indices(in_size, out_size, device):
    """Source rows for TF1's legacy bilinear resize (align_corners=False, half_pixel_centers=False):

        src = dst * (in_size / out_size),  lo = floor(src),  hi = min(lo + 1, in_size - 1),  frac = src - lo

    all in float32 as the TF kernel computes them (its scale is a float32 quotient)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = src.floor()
    frac = (src - lo).to(device)
    lo = lo.long()
    return lo.to(device), (lo + 1).clamp(max=in_size - 1).to(device), frac


def resize_tf1(x, size=INPUT_SIZE):
    """Bilinear resize of x [N, C, H, W] (float) to size x size, as TF1's ResizeBilinear op in the 2015 graph.
    Unlike torch's F.interpolate(align_corners=False) the sample points are src = dst * H / size (no half-pixel
    shift), and the interpolation runs in the op's order:

        top = tl + (tr - tl) * fx,  bottom = bl + (br - bl) * fx,  out = top + (bottom - top) * fy"""
    top, bottom, fy = _tf1_lerp_indices(x.shape[2], size, x.device)
    left, right, fx = _tf1_lerp_indices(x.shape[3], size, x.device)
    rows_t, rows_b = x[:, :, top], x[:, :, bottom]
    t = rows_t[..., left] + (rows_t[..., right] - rows_t[..., left]) * fx
    b = rows_b[..., left] + (rows_b[..., right] - rows_b[..., left]) * fx
    return t + (b - t) * fy[:, None]


def scale_input(x):
    """The graph's Sub and Mul nodes: x in [0, 255] -> (x - 128) / 128, i.e. [-1, 0.9921875]."""
    return (x - 128.0) * 0.0078125


# ----------------------------------------------------------------------------------------------------------------
# Network (parameter names as torchvision's Inception3, which is the layout of the published weight file)
# ----------------------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, the graph's) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x, kind):
    """3x3 stride-1 pool of the Mixed blocks' pool branch. TF's SAME avg pool averages over the valid pixels
    only (count_include_pad=False); the graph's last block uses a max pool here instead."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool_branch(x, "avg")),
        ], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | pool-1x1.
    The 1x1 branch comes first in the output, so output[:, :k] are its first k channels."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(dbl)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_pool_branch(x, "avg")),
        ], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(b7),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.
    pool: 'avg' (mixed_9 = Mixed_7b) or 'max' (mixed_10 = Mixed_7c, the graph's quirk)."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(_pool_branch(x, self.pool)),
        ], 1)


class InceptionV3TF(nn.Module):
    """The 2015 graph. forward(images) with images [N, 3, H, W] float in [0, 255] returns

        pool_3   [N, 2048]   float32
        spatial  [N, 2023]   mixed_6/conv[..., :7] flattened in NHWC order (row, column, channel)

    and logits(pool_3) -> [N, 1008] (no bias, as the IS code of ADM)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)   # TF: mixed
        self.Mixed_5c = InceptionA(256, 64)   # mixed_1
        self.Mixed_5d = InceptionA(288, 64)   # mixed_2
        self.Mixed_6a = InceptionB(288)       # mixed_3
        self.Mixed_6b = InceptionC(768, 128)  # mixed_4
        self.Mixed_6c = InceptionC(768, 160)  # mixed_5
        self.Mixed_6d = InceptionC(768, 160)  # mixed_6: its 1x1 branch is mixed_6/conv, the sFID layer
        self.Mixed_6e = InceptionC(768, 192)  # mixed_7
        self.Mixed_7a = InceptionD(768)       # mixed_8
        self.Mixed_7b = InceptionE(1280, "avg")  # mixed_9
        self.Mixed_7c = InceptionE(2048, "max")  # mixed_10
        self.fc = nn.Linear(2048, 1008)       # softmax/logits

    def forward(self, images):
        x = scale_input(resize_tf1(images.float()))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        # The join of mixed_6 starts with its 1x1 branch (mixed_6/conv), so its first 7 channels are the sFID
        # channels. ADM flattens TF's NHWC tensor: permute before flattening so the stored reference statistics
        # (mu_s, sigma_s) line up feature by feature.
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        return x.mean((2, 3)), spatial  # pool_3: the 8x8 average pool

    def logits(self, pool):
        """softmax/logits without the bias: pool_3 @ W (ADM's Inception Score graph)."""
        return pool @ self.fc.weight.t()


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------

def default_weight_paths():
    """Where the weight file is looked for when no path is given: the working directory, then torch.hub's
    checkpoint folder (where pytorch-fid leaves its download)."""
    return [WEIGHTS_NAME, os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)]


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_state_dict(sd, expected, path):
    """Every parameter / buffer of the network, with its shape; BatchNorm's num_batches_tracked is optional
    (older files do not have it and it plays no part in eval mode)."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path} is not a state dict (a dict of tensors); expected torchvision's Inception3 "
                         f"layout, e.g. Conv2d_1a_3x3.conv.weight {list(expected['Conv2d_1a_3x3.conv.weight'])}, "
                         f"fc.weight {list(expected['fc.weight'])} (the file {WEIGHTS_NAME})")
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing, unexpected, wrong = state_dict_mismatch(expected, sd, optional)
    missing, unexpected = sorted(missing), sorted(unexpected)
    wrong = sorted(f"{k}: {list(sd[k].shape)} (expected {list(expected[k])})" for k in wrong)
    if missing or unexpected or wrong:
        parts = [f"missing {show_some([f'{k} {list(expected[k])}' for k in missing], 6)}" if missing else "",
                 f"unexpected {show_some(unexpected, 6)}" if unexpected else "",
                 f"wrong shape {show_some(wrong, 6)}" if wrong else ""]
        raise UsageError(f"{path} is not the FID Inception state dict ({'; '.join(p for p in parts if p)}). "
                         f"Expected {len(expected) - len(optional)} tensors in torchvision's Inception3 layout "
                         f"with a 1008-way fc (fc.weight [1008, 2048]), as in {WEIGHTS_NAME} from {WEIGHTS_URL}")


def load_inception(path=None, device="cpu"):
    """The network with the weights of `path` (default: the first of default_weight_paths() that exists), in
    eval mode. Returns (model, sha256 of the file). path='random' gives random weights (speed tests only)."""
    model = InceptionV3TF().eval().requires_grad_(False)
    if path == "random":
        return model.to(device), None
    candidates = [path] if path else default_weight_paths()
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise MissingFileError(f"Inception weights not found (looked for {', '.join(candidates)}). Download "
                               f"{WEIGHTS_NAME} (the pytorch-fid conversion of TF's 2015 Inception graph, about "
                               f"90 MB) from {WEIGHTS_URL} and pass its path with --inception")
    try:
        sd = load_torch_file(found)
    except Exception as e:  # a truncated download, an HTML error page, a pickle with code in it
        raise UsageError(f"cannot read {found} as a torch weight file ({type(e).__name__}: {str(e)[:200]}). "
                         f"Download {WEIGHTS_NAME} again from {WEIGHTS_URL}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_state_dict(sd, expected, found)
    model.load_state_dict(sd, strict=False)  # strictness checked above, with num_batches_tracked optional
    return model.to(device), file_sha256(found)
