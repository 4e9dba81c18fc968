"""CAVP: Contrastive Audio-Visual Pairing for audio-visual segmentation, in one file.

Paper: Chen et al., "Unraveling Instance Associations: A Closer Look for Audio-Visual
Segmentation", CVPR 2024 (papers/cavp_vpo_cvpr2024.txt). Equation numbers below are the
paper's. Where the authors' released code departs from the paper, this file follows the
paper and says so in a comment.

    python vpo_make.py --synthetic --out data          # the built-in VPO (CPU-sized)
    python cavp.py --data vpo_msmi --epochs 80         # train + evaluate
    python cavp.py --data vpo_msmi --eval-only --ckpt runs/<run>/best.pt   # -> eval-real.json
    python cavp.py --data vpo_msmi --eval-only --ckpt runs/<run>/best.pt --eval-audio silence
    torchrun --nproc_per_node=8 cavp.py --data vpo_msmi --data-root /path/to/VPO

Defaults are the paper's recipe (App. B.1: DeepLabV3+ on ResNet-50, SGD 0.9 / 5e-4,
lr 1e-3 for batch 16, poly 0.9, 80 epochs, crop 512). On the built-in synthetic VPO
(written by `vpo_make.py --synthetic`) the backbone, weights, crop and lr default to
CPU-sized settings instead; every such default is listed in `--help`.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import metrics

# ----------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad flags: one line on stderr, exit code 2."""
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--data", default="vpo_msmi", choices=["vpo_ss", "vpo_ms", "vpo_msmi"], help="VPO subset (paper Sec. 3)")
    a("--data-root", default="data", help="folder holding VPO-SS/, VPO-MS/, VPO-MSMI/ (and audio/)")
    a("--audio-root", default=None, help="folder of {vgg_file}.wav clips (default: DATA_ROOT/audio)")
    a("--mono", action="store_true", help="mono audio instead of stereo (Fig. 7 / Table 8 ablation)")
    a("--crop", type=int, default=None,
      help="training crop size (default: 512 as App. B.1; built-in VPO: its image size)")
    a("--limit", type=int, default=None, help="use only the first N samples of each split (quick checks)")
    a("--workers", type=int, default=2, help="data loader worker processes per rank")
    # model
    a("--backbone", default=None, choices=["resnet50", "resnet18"],
      help="DeepLabV3+ encoder (default: resnet50 as the paper; built-in VPO: resnet18)")
    a("--pretrained", default=None,
      help="'imagenet' (torchvision weights API), 'none', or a local .pth state dict "
           "(default: imagenet; built-in VPO: none)")
    a("--output-stride", type=int, default=None, choices=[8, 16],
      help="DeepLabV3+ output stride (default: 8 as the released code; built-in VPO: 16)")
    a("--fusion", default="ca", choices=["ca", "tpavi"],
      help="f_CA with visual query (Sec. 4.1) or the TPAVI-like audio-query fusion (Table 5 row 1)")
    a("--attn", default="sigmoid", choices=["sigmoid", "softmax", "minmax"],
      help="f_CA attention activation (Sec. 4.1, Fig. 6)")
    a("--heads", type=int, default=4, help="f_CA attention heads")
    # loss
    a("--contrast", default="cavp", choices=["none", "supcon", "cavp"],
      help="contrastive term: none, SupCon with uniform sampling, or CAVP mining (Table 5 rows 2-4)")
    a("--positives", default="set", choices=["set", "label"],
      help="Eq. (3) 'same t' for a foreground anchor with multi-source audio: positives share the audio's class "
           "set and the label (set), or the label only, under any audio containing it (label)")
    a("--unknown", default="mismatched", choices=["mismatched", "literal", "none"],
      help="Eq. (2) E_unknown: background pixels of mismatched re-pairs (mismatched, SPEC 4), Eq. (2) as printed, "
           "t != y(w) and y(w) = bg, i.e. every background pixel (literal), or no unknown set (none)")
    a("--bg-groups", default="label", choices=["label", "one"],
      help="anchor sampling of E_bg (Eq. 2): one group per visual label, silenced objects and true background "
           "capped apiece (label), or one group for all of E_bg (one, as SupCon's background label)")
    a("--match", default="class", choices=["class", "side"],
      help="Eq. (1) re-pairs: the audio matches the image when the class sets agree (class), or when also every "
           "shared class sounds from the side of the image where its object is (side, stereo only); a class on "
           "the wrong side is E_unknown")
    a("--bank-sources", default="single", choices=["single", "all"],
      help="App. B balancing: bank audio replaces mismatched re-pairs of single-source images only (single), or "
           "of every image, one bank clip per sounding class panned at that source's position (all)")
    a("--tau", type=float, default=0.1, help="temperature of Eq. (4) (App. B.1)")
    a("--anchors-per-group", type=int, default=None,
      help="at most this many sampled pixels per anchor group per step (default: 512 as the released "
           "code's per-class cap; built-in VPO: 128)")
    a("--pos-share", type=float, default=0.5,
      help="share of mismatched re-pairs turned positive with memory-bank audio (App. B, Table 6: 0.5)")
    a("--bank-size", type=int, default=8, help="waveforms kept per class in the memory bank (FIFO)")
    # optimisation
    a("--epochs", type=int, default=80, help="training epochs (App. B.1: 80)")
    a("--batch-size", type=int, default=16, help="images per step over all ranks (App. B.1: 16)")
    a("--lr", type=float, default=None,
      help="SGD learning rate for --batch-size (default: 1e-3 as App. B.1; built-in VPO: 1e-2, trained from scratch)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (App. B.1)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (App. B.1)")
    a("--poly-power", type=float, default=0.9, help="poly learning-rate decay power, per iteration (App. B.1)")
    a("--head-lr-mult", type=float, default=1.0, help="lr multiplier of the segmentation head (released code: 10)")
    a("--seed", type=int, default=0, help="random seed")
    a("--max-iters", type=int, default=None, help="stop after this many iterations (quick checks)")
    # run
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (auto: cuda when available)")
    a("--no-amp", action="store_true", help="disable bf16 autocast (default: on for CUDA and for CPUs with native bf16, AVX512-BF16 / AMX; "
           "other CPUs emulate it about 20x slower, so they run fp32)")
    a("--out", default=None, help="run folder (default: runs/cavp-<data>-s<seed>-<time>)")
    a("--resume", default=None, help="continue training from this checkpoint (e.g. runs/x/last.pt)")
    a("--eval-only", action="store_true", help="only evaluate --ckpt on the test split")
    a("--ckpt", default=None, help="checkpoint to evaluate with --eval-only")
    a("--eval-audio", default="real", choices=data.EVAL_AUDIO,
      help="with --eval-only: test with the real audio, silence, or a clip of a class absent from the image; "
           "the last two make the target all background, so fg_pred is the false-detection rate")
    a("--coco-ann", default=None,
      help="COCO instances JSON of the test images, for --eval-audio absent (default: the built-in VPO's "
           "DATA_ROOT/sources/coco/annotations/instances_val2017.json)")
    a("--eval-every", type=int, default=5, help="evaluate every N epochs (and after the last)")
    a("--eval-batch-size", type=int, default=None,
      help="test batch size per rank (default: 1 as App. B.1, original resolution; built-in VPO: 16)")
    a("--log-every", type=int, default=10, help="log line every N iterations")
    a("--overlays", type=int, default=4, help="write PNG overlays and attention heatmaps for this many test images")
    args = p.parse_args(argv)
    if args.eval_only and not args.ckpt:
        p.error("--eval-only needs --ckpt PATH")
    if args.eval_audio != "real" and not args.eval_only:
        p.error(f"--eval-audio {args.eval_audio} is for --eval-only")
    for flag in ("epochs", "batch_size", "eval_every", "log_every", "bank_size", "anchors_per_group",
                 "eval_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 <= args.pos_share <= 1:
        p.error("--pos-share must be in [0, 1]")
    if args.match == "side" and args.mono:
        p.error("--match side compares stereo positions: drop --mono or use --match class")
    return args


PAPER = dict(backbone="resnet50", pretrained="imagenet", output_stride=8, crop=512, lr=1e-3, anchors_per_group=512,
             eval_batch_size=1)
# built-in VPO on a CPU: fixed-size 64 px images (crop = image size, so any eval batch size gives the same
# result), trained from scratch; fewer anchors for 1/64 of the paper's crop area
BUILTIN = dict(backbone="resnet18", pretrained="none", output_stride=16, crop=None, lr=1e-2, anchors_per_group=128,
               eval_batch_size=16)
ARCH_KEYS = ("backbone", "output_stride", "fusion", "attn", "heads", "mono")


def resolve_defaults(args):
    """Fill the flags left at None with the paper's values, or CPU-sized ones on the built-in VPO."""
    summary = os.path.join(args.data_root, "vpo_summary.json")
    builtin = None
    if os.path.isfile(summary):
        with open(summary) as f:
            info = json.load(f)
        if info.get("synthetic"):
            builtin = dict(BUILTIN, crop=int(info["image_size"]))
    for key, value in (builtin or PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.builtin = builtin is not None
    return args


# ----------------------------------------------------------------------------- model


def load_backbone_weights(net, name, pretrained):
    """ImageNet weights via torchvision's weights API, or a local state dict."""
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            raise data.DataError(
                f"could not download ImageNet weights for {name} ({type(e).__name__}; offline?): fetch "
                f"{weights.url} elsewhere and pass --pretrained PATH, or train from scratch with --pretrained none")
    else:
        if not os.path.isfile(pretrained):
            raise data.DataError(f"--pretrained {pretrained}: no such file (give 'imagenet', 'none' or a .pth path)")
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    own = net.state_dict()
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not state:
        raise data.DataError(f"--pretrained {pretrained}: no tensor matches a {name}; is it a {name} state dict?")
    net.load_state_dict(state, strict=False)


def dilate(layer, rate):
    """Trade the stride of a ResNet stage for dilation (DeepLab's output stride 8/16)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (rate, rate), (rate, rate)


class ASPP(nn.Module):
    """DeepLabV3 atrous spatial pyramid pooling: 1x1, three atrous 3x3 (6/12/18), image pooling."""

    def __init__(self, cin, cout=256, rates=(6, 12, 18)):
        super().__init__()
        def branch(k, r):
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=0 if k == 1 else r, dilation=r, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Dropout(0.1))

    def forward(self, x):
        pooled = self.pool(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ encoder/decoder up to the 304-channel feature at 1/4 resolution (App. B.1, SPEC 4).

    The released code uses a deep-stem ResNet; torchvision's ResNet is used here so that ImageNet
    weights come from torchvision's weights API.
    """

    def __init__(self, name, pretrained, output_stride):
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        load_backbone_weights(net, name, pretrained)
        if output_stride == 8:
            dilate(net.layer3, 2)
            dilate(net.layer4, 4)
        else:
            dilate(net.layer4, 2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        low, high = net.layer1[-1].conv1.in_channels, net.fc.in_features
        self.aspp = ASPP(high)
        self.low_proj = nn.Sequential(nn.Conv2d(low, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True))

    def forward(self, x):
        low = self.layer1(self.stem(x))
        high = self.aspp(self.layer4(self.layer3(self.layer2(low))))
        high = F.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=False)
        return torch.cat([high, self.low_proj(low)], 1)  # 256 + 48 = 304 channels


class AudioEncoder(nn.Module):
    """ResNet-18 on the log-mel (1 channel mono, 2 stereo), global max pool, FC 512 -> dim (SPEC 1.3)."""

    def __init__(self, channels, dim, pretrained):
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        imagenet = pretrained == "imagenet"  # a local --pretrained file is the image backbone's
        load_backbone_weights(net, "resnet18", "imagenet" if imagenet else "none")
        rgb = net.conv1.weight.data
        net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        if imagenet:
            net.conv1.weight.data = rgb.mean(1, keepdim=True).repeat(1, channels, 1, 1)
        net.fc = nn.Linear(512, dim)
        self.net = net

    def forward(self, mel):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(mel))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return n.fc(torch.amax(x, dim=(2, 3)))


class CrossAttention(nn.Module):
    """f_CA(u_v, u_a) = u_v + f_MHA(u_v, u_a, u_a): visual query, audio key/value (Sec. 4.1).

    The audio is one token, so the attention activation acts over the pixels of each head's map:
    sigmoid (the paper's choice), softmax over the H*W positions, or min-max normalisation (Fig. 6).
    """

    def __init__(self, dim, heads, attn):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.visual_mlp = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(inplace=True), nn.Linear(256, dim))
        self.norm = nn.LayerNorm(dim)  # shared by both modalities
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_mlp, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def activation(self, s):
        if self.attn == "sigmoid":
            return torch.sigmoid(s)
        if self.attn == "softmax":
            return torch.softmax(s, dim=2)
        lo, hi = s.amin(2, keepdim=True), s.amax(2, keepdim=True)
        return (s - lo) / (hi - lo + 1e-6)

    def forward(self, u_v, u_a):
        """u_v (B, N, D) visual tokens, u_a (B, D) audio -> fused z (B, N, D), attention map (B, N)."""
        b, n, d = u_v.shape
        u_v = self.visual_mlp(u_v)
        qv, ka = self.norm(u_v), self.norm(u_a)
        q = self.q(qv).view(b, n, self.heads, -1).transpose(1, 2)        # B h N d'
        k = self.k(ka).view(b, self.heads, -1, 1)                        # B h d' 1
        v = self.v(ka).view(b, self.heads, 1, -1)                        # B h 1 d'
        a = self.activation(q @ k * q.shape[-1] ** -0.5)                 # B h N 1
        x = u_v + self.o((a * v).transpose(1, 2).reshape(b, n, d))       # residual u_v (+) f_MHA
        x = x + self.mlp(self.norm_mlp(x))
        return self.norm_out(x), a.mean(1).squeeze(-1)


class AudioQueryFusion(nn.Module):
    """TPAVI-like fusion of earlier AVS methods: u_v (+) u_v (.) f_MHA(u_a, u_v, u_v) (Sec. 4.1, Table 5 row 1)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, u_v, u_a):
        out, w = self.mha(u_a[:, None], u_v, u_v)                        # audio query, softmax over pixels
        return u_v + u_v * out, w[:, 0]


class CAVPModel(nn.Module):
    """Image encoder f_phi, audio encoder f_gamma, fusion f_CA and the DeepLabV3+ classifier."""

    def __init__(self, args, num_classes, dim=304):
        super().__init__()
        self.visual = DeepLabV3Plus(args.backbone, args.pretrained, args.output_stride)
        self.audio = AudioEncoder(1 if args.mono else 2, dim, args.pretrained)
        self.fusion = AudioQueryFusion(dim, args.heads) if args.fusion == "tpavi" else \
            CrossAttention(dim, args.heads, args.attn)
        self.classifier = nn.Sequential(
            nn.Conv2d(dim, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1))

    def forward(self, image, mel, perm=None, extra_idx=None):
        """image (B,3,H,W), mel (B+k,C,T,F): the B paired clips, then k memory-bank clips.

        Without perm: logits (B,K,H,W), fused features z (B,D,h,w), attention maps (B,h,w).
        With perm (Eq. 1): image i is also fused with audio perm[i], or with bank clip m when
        extra_idx[m] == i; z and the attention maps then hold the B pairs followed by the B
        re-pairs. Image features and the B audio embeddings are computed once and reused; the
        classifier runs on the original pairs only, the only ones with a CE term (Eq. 5).
        """
        feat = self.visual(image)
        b, d, h, w = feat.shape
        tokens = feat.flatten(2).transpose(1, 2)
        u_a = self.audio(mel)
        if perm is not None:
            repaired = u_a[perm].index_copy(0, extra_idx, u_a[b:])
            u_a, tokens = torch.cat([u_a[:b], repaired]), tokens.repeat(2, 1, 1)
        z, attn = self.fusion(tokens, u_a)
        z = z.transpose(1, 2).reshape(-1, d, h, w)
        logits = F.interpolate(self.classifier(z[:b]), size=image.shape[2:], mode="bilinear", align_corners=False)
        return logits, z, attn.reshape(-1, h, w)


# ----------------------------------------------------------------------------- contrastive pairing (Eq. 1-5)


class WaveBank:
    """Per-class FIFO of raw mono waveforms from single-source samples (App. B.1 memory bank)."""

    def __init__(self, num_classes, size, length, device):
        self.waves = torch.zeros(num_classes, size, length, device=device)
        self.count = torch.zeros(num_classes, dtype=torch.long)

    def push(self, wave, audio_classes, audio_pos):
        """Store the sources of single-source samples (audio_pos >= 0); L + R gives back the mono clip."""
        for i in torch.nonzero(audio_pos >= 0).flatten().tolist():
            c = int(audio_classes[i].argmax())
            slot = int(self.count[c]) % self.waves.shape[1]
            self.waves[c, slot] = wave[i].sum(0)
            self.count[c] += 1

    def draw(self, c):
        """A random stored waveform of class c, or None when the class has none yet."""
        n = min(int(self.count[c]), self.waves.shape[1])
        return self.waves[c, torch.randint(n, ()).item()] if n else None


def repair(batch, bank, pos_share, use_bank, bank_sources="single", match_side=False):
    """Eq. (1): image i is re-paired with the audio of image perm[i]. The re-pair matches when the
    audio's class set is the image's; with match_side, also each class must sound from the half of
    the image (left / right of the centre) where its object is (`wrong_side` (B,K) marks the shared
    classes that do not). A share of the mismatched re-pairs instead gets bank audio of the image's own
    classes, each clip panned at its object's position (App. B): single-source images only, or every
    image with bank_sources 'all'. Returns perm, the bank clips (k,C,N) and the k re-pairs they go to,
    the re-paired audio classes, the match flags and wrong_side.

    The released stereo trainer computes this replacement and then discards it; here it is used.
    """
    wave, t, pos, src = batch["wave"], batch["audio_classes"], batch["audio_pos"], batch["source_pos"]
    perm = torch.randperm(wave.shape[0], device=wave.device)
    t2 = t[perm].clone()
    wrong_side = (t > 0) & (t2 > 0) & ((src >= 0.5) != (src[perm] >= 0.5)) if match_side else t2 < 0
    match = (t2 == t).all(1) & ~wrong_side.any(1)
    extra, idx = [], []
    if use_bank:
        for i in torch.nonzero(~match).flatten().tolist():
            if (pos[i] < 0 and bank_sources == "single") or torch.rand(()) >= pos_share:
                continue
            classes = torch.nonzero(t[i]).flatten().tolist()
            clips = [bank.draw(c) for c in classes]
            if any(w is None for w in clips):
                continue
            extra.append(sum(data.pan(w[None], src[i, c], stereo=wave.shape[1] == 2) for w, c in zip(clips, classes)))
            idx.append(i)
            t2[i], match[i], wrong_side[i] = t[i], True, False
    extra = torch.stack(extra) if extra else wave.new_zeros(0, *wave.shape[1:])
    return perm, extra, torch.tensor(idx, dtype=torch.long, device=wave.device), t2, match, wrong_side


def anchor_sets(y, t, match, unknown="mismatched", wrong_side=None):
    """Eq. (2) per pixel. y (N,P) visual labels (255 ignore), t (N,K) audio multi-hot, match (N,)
    whether the audio matches the image (see repair). A pixel is foreground when its class is in the
    audio set (multi-source: t is a set). E_unknown: background of mismatched re-pairs ('mismatched',
    SPEC 4), every background pixel ('literal': t != y(w) and y(w) = bg, as Eq. (2) is printed), or
    nothing ('none'); plus the pixels of classes that wrong_side (N,K) marks. Returns boolean masks
    fg, unknown, bg of shape (N,P)."""
    valid = y != 255
    y0 = torch.where(valid, y, 0)
    obj, bg_px = valid & (y0 != 0), valid & (y0 == 0)
    off_side = obj & torch.gather(wrong_side, 1, y0) if wrong_side is not None else torch.zeros_like(obj)
    fg = obj & (torch.gather(t, 1, y0) > 0) & ~off_side
    unknown = off_side | dict(mismatched=bg_px & ~match[:, None], literal=bg_px, none=off_side)[unknown]
    return fg, unknown, valid & ~fg & ~unknown


def sample_groups(keys, cap):
    """Indices of at most `cap` random members of every group (uniform within a group)."""
    order = torch.randperm(keys.numel(), device=keys.device)
    k = keys[order]
    k, sort = torch.sort(k, stable=True)
    order = order[sort]
    first = torch.searchsorted(k, k, right=False)
    rank = torch.arange(k.numel(), device=k.device) - first
    return order[rank < cap]


def info_nce(z, pos, neg, tau):
    """Eq. (4): for each anchor, mean over positives p of -log(e^{z.z_p/tau} / (e^{z.z_p/tau} +
    sum_n e^{z.z_n/tau})); anchors without positives are dropped; mean over anchors (Eq. 5)."""
    s = z @ z.T / tau
    s = s - s.amax(1, keepdim=True).detach()
    neg_sum = (s.exp() * neg).sum(1, keepdim=True)
    log_prob = s - torch.log(s.exp() + neg_sum)
    n_pos = pos.sum(1)
    keep = n_pos > 0
    if not keep.any():
        return z.sum() * 0
    return (-(log_prob * pos).sum(1)[keep] / n_pos[keep]).mean()


def contrastive_loss(z, y, t, match, mode, tau, cap, positives="set", unknown="mismatched", bg_groups="label",
                     wrong_side=None):
    """Contrastive term of Eq. (5) on fused features z (N,D,h,w) of the 2B pairs.

    mode 'cavp': anchors from E_fg and E_bg (E_unknown never used; see anchor_sets for `unknown` and
    `wrong_side`), foreground sampled per (audio set, visual label) group so hard negatives (same
    audio / other label, other audio / same label) are always present, background per label or as
    one group (`bg_groups`); Eq. (3): a foreground anchor's positives are the E_fg pixels with its
    label and its audio set (positives 'set') or any audio set (positives 'label'), everything else
    in E is a negative; a background anchor's positives are E_bg, its negatives E_fg. mode 'supcon':
    the released code's uniform sampling per segmentation label (object pixels of mismatched
    re-pairs relabelled background), positives = same label.
    """
    n, d, h, w = z.shape
    y = F.interpolate(y[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().flatten(1)  # SPEC 4
    z = F.normalize(z.float().flatten(2).transpose(1, 2), dim=-1).reshape(-1, d)
    k = t.shape[1]
    if mode == "supcon":
        label = torch.where(match[:, None] | (y == 255), y, 0).flatten()
        idx = sample_groups(torch.where(label == 255, -1, label), cap)
        idx = idx[label[idx] != 255]
        same = label[idx, None] == label[None, idx]
        eye = torch.eye(idx.numel(), dtype=torch.bool, device=z.device)
        return info_nce(z[idx], same & ~eye, ~same, tau)
    fg, _, bg = (m.flatten() for m in anchor_sets(y, t, match, unknown, wrong_side))    # Eq. (2)
    _, audio_id = torch.unique(t, dim=0, return_inverse=True)
    audio_id = audio_id[:, None].expand(n, h * w).flatten()
    label = y.flatten()
    group = torch.where(fg, audio_id * k + label, -1 - label if bg_groups == "label" else -1)
    idx = sample_groups(torch.where(fg | bg, group, torch.iinfo(group.dtype).min), cap)
    idx = idx[(fg | bg)[idx]]
    fg, key = fg[idx], (group if positives == "set" else label)[idx]
    eye = torch.eye(idx.numel(), dtype=torch.bool, device=z.device)
    same = fg[None, :] & (key[:, None] == key[None, :])                                 # P^fg: same t, same y
    pos = torch.where(fg[:, None], same, ~fg[None, :]) & ~eye                           # Eq. (3), P^bg = E_bg
    neg = torch.where(fg[:, None], ~same, fg[None, :])                                  # N_hard + N_easy, N^bg = E_fg
    return info_nce(z[idx], pos, neg, tau)


# ----------------------------------------------------------------------------- run helpers


def log(msg, path=None):
    print(msg, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(msg + "\n")


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    """Atomic JSON write; NaN (an undefined metric, e.g. FDR of a never-predicted class) becomes null."""
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(obj), f, indent=1)
    os.replace(tmp, path)


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def native_bf16(device):
    """bf16 autocast pays on CUDA and on CPUs with bf16 instructions; elsewhere it is emulated, ~20x slower."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def save_overlay(path, image, mask, pred, attn):
    """One PNG: image | ground truth | prediction | cross-attention heatmap (App. C, Fig. 10)."""
    img = ((image.cpu().float() * data.STD + data.MEAN).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    pal = data.avss_palette(256)  # the VOC-style bit palette of AVSBench; 255 (ignore) white
    pal[255] = 255

    def blend(lab):  # class colours over the image, background left as it is, 255 white
        lab = lab.cpu().numpy()
        return np.where(lab[..., None] > 0, 0.35 * img + 0.65 * pal[lab], img).astype(np.uint8)
    a = attn.float()[None, None]
    a = F.interpolate(a, size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    a = (a - a.min()) / (a.max() - a.min() + 1e-8)
    heat = np.stack([a, 1 - np.abs(2 * a - 1), 1 - a], -1) * 255  # blue (low) -> green -> red (high)
    tiles = [img, blend(mask), blend(pred), (0.4 * img + 0.6 * heat).astype(np.uint8)]
    Image.fromarray(np.concatenate(tiles, 1)).save(path)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, mel_fn, device, amp, num_classes, overlay_dir, n_overlays, swap=False):
    """Dataset-level mIoU / F-beta / FDR from one confusion matrix (SPEC 2) and, where the samples carry
    silent twins, the twin metrics (metrics.TwinMeter), all-reduced over ranks. swap: the left and right
    audio channels exchanged, so the stereo cue points at the other side."""
    model.eval()
    cm = metrics.ConfusionMatrix(num_classes, device=device)
    twins = metrics.TwinMeter(num_classes, device=device)
    written = 0
    for batch in loader:
        image, mask, wave = batch["image"].to(device), batch["mask"].to(device), batch["wave"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, _, attn = model(image, mel_fn(wave.flip(1) if swap else wave))
        pred = logits.argmax(1)
        cm.update(pred, mask)
        if "twin" in batch:
            twins.update(pred, mask, batch["twin"].to(device))
        for i in range(image.shape[0]):
            if written < n_overlays:
                save_overlay(os.path.join(overlay_dir, f"{batch['name'][i]}.png"), image[i], mask[i], pred[i], attn[i])
                written += 1
    cm.all_reduce()
    twins.all_reduce()
    model.train()
    return dict(cm.compute(), **twins.compute())


# ----------------------------------------------------------------------------- main


def main(args):
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise data.DataError("--device cuda: no CUDA device is visible; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    amp = not args.no_amp and native_bf16(device)
    main_rank = rank == 0

    ckpt = None
    if args.resume or args.eval_only:
        path = args.resume or args.ckpt
        if not os.path.isfile(path):
            raise data.DataError(f"checkpoint {path} not found")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise data.DataError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                                 "pass a last.pt/best.pt written by cavp.py")
        if not isinstance(ckpt, dict) or not {"model", "args"} <= ckpt.keys():
            raise data.DataError(f"{path}: not a cavp.py checkpoint; pass a last.pt/best.pt written by cavp.py")
        for key in ARCH_KEYS:
            setattr(args, key, ckpt["args"][key])
        args.pretrained = "none"  # the checkpoint holds the weights
        if args.resume:
            args.out = args.out or os.path.dirname(os.path.abspath(path))
    resolve_defaults(args)
    if args.out is None:
        args.out = os.path.join("runs", f"cavp-{args.data}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
        if distributed:  # every rank uses rank 0's folder name
            holder = [args.out]
            dist.broadcast_object_list(holder)
            args.out = holder[0]
    if args.batch_size % world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")

    # data (read and checked before the run folder is made)
    subset = args.data.split("_")[1]
    kw = dict(audio_root=args.audio_root, stereo=not args.mono, limit=args.limit)
    test_set = data.VPODataset(args.data_root, subset, "test", **kw)
    twin_idx = []
    if args.eval_audio == "real" and data.attach_twins(test_set, args.coco_ann):
        twin_idx = sorted(test_set.twins)  # VPO-MSMI: images whose sounding object has silent twins
    if args.eval_only:
        test_set = data.eval_audio_set(test_set, args.eval_audio, args.coco_ann, args.seed)
    train_set = None if args.eval_only else \
        data.VPODataset(args.data_root, subset, "train", train=True, crop=args.crop, **kw)
    overlay_dir = os.path.join(args.out, "overlays")
    n_overlays = args.overlays if main_rank else 0
    log_path = os.path.join(args.out, "log.txt") if main_rank else None
    if main_rank:
        os.makedirs(overlay_dir, exist_ok=True)
        log(f"cavp: {' '.join(sys.argv[1:])}", log_path)
        log(f"settings: {json.dumps(vars(args), sort_keys=True)}", log_path)
        log(f"{world} rank(s) on {device}, bf16 autocast {amp}", log_path)
    seed = args.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    def eval_loader(indices):
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(test_set, indices[rank::world]),  # exact shards, no padding
            batch_size=args.eval_batch_size, num_workers=args.workers, collate_fn=data.pad_collate,
            generator=torch.Generator(), persistent_workers=args.workers > 0)  # own RNG: eval keeps the train stream
    test_loader = eval_loader(range(len(test_set)))
    swap_loader = eval_loader(twin_idx) if twin_idx and not args.mono else None
    num_classes = len(data.VPO_CLASSES)
    mel_fn = data.LogMel(frames=300).to(device)  # SPEC 1.3: 3 s -> 300 frames x 64 mel bins

    # model
    model = CAVPModel(args, num_classes).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if distributed and use_cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif distributed and main_rank:
        log("note: SyncBatchNorm needs CUDA; on CPU each rank keeps its own BatchNorm statistics", log_path)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None) \
        if distributed else model
    history = ckpt.get("history", []) if args.resume else []

    def run_eval():
        """Test metrics; with stereo twins, the twin metrics once more with left and right swapped."""
        res = evaluate(model, test_loader, mel_fn, device, amp, num_classes, overlay_dir, n_overlays)
        if swap_loader is not None:
            swapped = evaluate(model, swap_loader, mel_fn, device, amp, num_classes, overlay_dir, 0, swap=True)
            res.update({f"{key}_swap": swapped[key] for key in metrics.TWIN_KEYS})
        if main_rank:
            log(metrics.format_table(data.VPO_CLASSES, res), log_path)
            if res["twin_images"]:
                log(metrics.format_twins(res), log_path)
        return res

    if args.eval_only:
        res = run_eval()
        if main_rank:
            if args.eval_audio != "real":
                log(f"{args.eval_audio} audio: {100 * res['fg_pred']:.2f}% of the pixels segmented as a sounding "
                    "object (false detections; 0 is right)", log_path)
            # eval-real.json / eval-silence.json / eval-absent.json: never the training run's metrics.json
            write_json(os.path.join(args.out, f"eval-{args.eval_audio}.json"), dict(args=vars(args), eval=res))
        return res

    per_rank = args.batch_size // world
    sampler = torch.utils.data.DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True) \
        if distributed else None
    gen = torch.Generator()
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_rank, shuffle=sampler is None, sampler=sampler, generator=gen,
        num_workers=args.workers, collate_fn=data.pad_collate, drop_last=True, pin_memory=use_cuda,
        persistent_workers=args.workers > 0)  # workers outlive epochs; bit-exact --resume needs --workers 0
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise data.DataError(f"{args.data} train split has {len(train_set)} samples, fewer than "
                             f"--batch-size {args.batch_size}: lower --batch-size or --limit")
    total_iters = iters_per_epoch * args.epochs

    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if id(p) not in head_ids]
    lr = args.lr * args.batch_size / 16  # App. B.1: lr 1e-3 for batch 16, scaled linearly
    optimizer = torch.optim.SGD([dict(params=rest, lr=lr), dict(params=head, lr=lr * args.head_lr_mult)],
                                lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - min(it, total_iters - 1) / total_iters) ** args.poly_power)  # poly, per iteration
    bank = WaveBank(num_classes, args.bank_size, 48000, device)
    start_epoch, iteration, best = 0, 0, -1.0
    if args.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        bank.waves.copy_(ckpt["bank"]["waves"])
        bank.count.copy_(ckpt["bank"]["count"])
        start_epoch, iteration, best = ckpt["epoch"], ckpt["iteration"], ckpt["best"]
        set_rng_state(ckpt["rng"])
        if main_rank:
            log(f"resumed from {args.resume} at epoch {start_epoch}, iteration {iteration}", log_path)

    def checkpoint(epoch, name):
        if main_rank:
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         bank=dict(waves=bank.waves, count=bank.count), epoch=epoch, iteration=iteration,
                         best=best, args=vars(args), rng=rng_state(), history=history)
            save_atomic(state, os.path.join(args.out, name))

    ce = nn.CrossEntropyLoss(ignore_index=255)
    start_iter = iteration
    t0, window_t, window_n = time.time(), time.time(), 0
    step_end, train_s = time.time(), 0.0  # training time without evaluation and the first (warm-up) step
    res = None
    stop = False
    for epoch in range(start_epoch, args.epochs):
        gen.manual_seed(args.seed * 100003 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in train_loader:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            image, mask, b = batch["image"], batch["mask"], batch["image"].shape[0]
            waves, perm, idx = batch["wave"], None, None
            if args.contrast != "none":
                bank.push(batch["wave"], batch["audio_classes"], batch["audio_pos"])
                perm, extra, idx, t2, match2, side2 = repair(batch, bank, args.pos_share, epoch >= 1, args.bank_sources,
                                                             args.match == "side")  # Eq. (1), App. B
                waves = torch.cat([waves, extra])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits, z, _ = net(image, mel_fn(waves), perm, idx)
                loss_ce = ce(logits.float(), mask)  # Eq. (5), CE on the original pairs
            loss_cp = torch.zeros((), device=device)
            if args.contrast != "none":
                t = torch.cat([batch["audio_classes"], t2])
                match = torch.cat([torch.ones(b, dtype=torch.bool, device=device), match2])
                loss_cp = contrastive_loss(z, torch.cat([mask, mask]), t.long(), match, args.contrast, args.tau,
                                           args.anchors_per_group, args.positives, args.unknown, args.bg_groups,
                                           torch.cat([torch.zeros_like(side2), side2]))  # Eq. (2)-(4)
            loss = loss_ce + loss_cp  # Eq. (5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            iteration += 1
            window_n += b * world
            train_s += (time.time() - step_end) if iteration > start_iter + 1 else 0.0
            step_end = time.time()
            if main_rank and iteration % args.log_every == 0:
                now = time.time()
                eta = (now - t0) / (iteration - start_iter) * (total_iters - iteration)
                log(f"ep {epoch + 1}/{args.epochs} it {iteration}/{total_iters} loss {loss.item():.4f} "
                    f"(ce {loss_ce.item():.4f} cp {loss_cp.item():.4f}) lr {scheduler.get_last_lr()[0]:.2e} "
                    f"{window_n / (now - window_t):.1f} img/s eta {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                    log_path)
                window_t, window_n = now, 0
            if args.max_iters and iteration >= args.max_iters:
                stop = True
                break
        last = stop or epoch + 1 == args.epochs
        if (epoch + 1) % args.eval_every == 0 or last:
            eval_t = time.time()
            res = run_eval()
            step_end = time.time()
            window_t += step_end - eval_t  # images/s in the log counts training time only
            history.append(dict(epoch=epoch + 1, iteration=iteration, **res))
            if main_rank:
                log(f"eval ep {epoch + 1}: mIoU {100 * res['miou']:.2f} F-beta {100 * res['mean_fbeta']:.2f} "
                    f"FDR {100 * res['mean_fdr']:.2f} ({step_end - eval_t:.1f} s)", log_path)
            if res["miou"] > best:
                best = res["miou"]
                checkpoint(epoch + 1, "best.pt")
        checkpoint(epoch + 1, "last.pt")
        if stop:
            break
    if main_rank:
        best_entry = max(history, key=lambda h: h["miou"]) if history else None
        write_json(os.path.join(args.out, "metrics.json"),
                   dict(args=vars(args), history=history, best=best_entry, final=history[-1] if history else None,
                        wall_time_s=round(time.time() - t0, 1),
                        train_images_per_s=round(max(iteration - start_iter - 1, 0) * args.batch_size
                                                 / max(train_s, 1e-9), 2)))
        log(f"done in {time.time() - t0:.0f} s; best mIoU {100 * best:.2f}; run folder {args.out}", log_path)
    return res


if __name__ == "__main__":
    cli_args = parse_args()
    try:
        main(cli_args)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
