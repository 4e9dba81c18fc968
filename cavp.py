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
import itertools
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
    a("--pan", default="crop", choices=["crop", "csv"],
      help="VPO training: pan each source at its object's centre of mass as moved by the flip, scale and crop, "
           "clamped to [0, 1] (crop, issue 19), or at the CSV audio_pos, mirrored on a flip (csv, the released "
           "behaviour)")
    a("--crop", type=int, default=None,
      help="training crop size (default: 512 as App. B.1; built-in VPO: its image size)")
    a("--limit", type=int, default=None, help="use only the first N samples of each split (quick checks)")
    a("--workers", type=int, default=7,
      help="data loader worker processes per rank (default 7: one worker makes ~49 VPO training samples/s at "
           "crop 512 on one CPU core, collate included (benchmarks/loader.py); a GPU training at ~300 img/s (an "
           "H100 at crop 512, issue 20) needs 300 / 49 = 6.1 -> 7; README 'Loader speed')")
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
    a("--positives", default="label", choices=["set", "label"],
      help="Eq. (3) 'same t' for a foreground anchor with multi-source audio: positives share the audio's class "
           "set and the label (set, the literal reading), or the label only, under any audio containing it "
           "(label; the default, picked by the runs in README 'Readings of Eq. (1)-(3)')")
    a("--unknown", default="mismatched", choices=["mismatched", "literal", "none"],
      help="Eq. (2) E_unknown: background pixels of mismatched re-pairs (mismatched, SPEC 4), Eq. (2) as printed, "
           "t != y(w) and y(w) = bg, i.e. every background pixel (literal), or no unknown set (none)")
    a("--bg-groups", default="one", choices=["label", "one"],
      help="anchor sampling of E_bg (Eq. 2): one group per visual label, silenced objects and true background "
           "capped apiece (label), or one group for all of E_bg (one, as SupCon's background label; the default, "
           "picked with --positives label by the runs in README 'Readings of Eq. (1)-(3)')")
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
    a("--ckpt", default=None, help="checkpoint to evaluate with --eval-only or to run with --predict")
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
    # predict on your own image and sound
    a("--predict", default=None, metavar="IMAGE",
      help="segment this image (any size and RGB format) with the sound --audio using --ckpt; writes "
           "<stem>.png (image | prediction | attention) and <stem>.json (classes, pixel shares) to --out "
           "(default: the checkpoint's folder/predict)")
    a("--audio", default=None, metavar="WAV",
      help="with --predict: the sound, a WAV (mono or stereo, any sample rate; 3 s from its middle are used)")
    a("--audio-pos", type=float, default=None, metavar="A",
      help="with --predict: pan the (downmixed) clip to horizontal position A, 0 = left .. 1 = right, as VPO "
           "does (Sec. 3); needed for a mono clip on a stereo model")
    args = p.parse_args(argv)
    if args.predict and not (args.ckpt and args.audio):
        p.error("--predict needs --ckpt PATH and --audio WAV")
    if (args.audio or args.audio_pos is not None) and not args.predict:
        p.error("--audio and --audio-pos are for --predict IMAGE")
    if args.predict and (args.eval_only or args.resume):
        p.error("--predict excludes --eval-only and --resume")
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


# ----------------------------------------------------------------------------- defaults


PAPER = dict(backbone="resnet50", pretrained="imagenet", output_stride=8, crop=512, lr=1e-3, anchors_per_group=512,
             eval_batch_size=1)
# built-in VPO on a CPU: fixed-size 64 px images (crop = image size, so any eval batch size gives the same
# result), trained from scratch; fewer anchors for 1/64 of the paper's crop area
BUILTIN = dict(backbone="resnet18", pretrained="none", output_stride=16, crop=None, lr=1e-2, anchors_per_group=128,
               eval_batch_size=16)
CKPT_KEYS = ("backbone", "output_stride", "fusion", "attn", "heads", "mono")  # taken from a checkpoint


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


# ----------------------------------------------------------------------------- loss (Eq. 1-5)


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

    def state_dict(self):
        return dict(waves=self.waves, count=self.count)

    def load_state_dict(self, state):
        self.waves.copy_(state["waves"])
        self.count.copy_(state["count"])

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


class Criterion:
    """Eq. (5) on one training batch: CE on the original pairs plus the contrastive term (Eq. 1-4) on the
    pairs and their re-pairs -> loss, parts. Holds the memory bank (App. B.1)."""

    def __init__(self, args, num_classes, mel_fn, device, amp):
        self.args, self.mel_fn, self.device, self.amp = args, mel_fn, device, amp
        self.bank = WaveBank(num_classes, args.bank_size, 48000, device)
        self.ce = nn.CrossEntropyLoss(ignore_index=255)

    def __call__(self, net, batch, epoch):
        args, device = self.args, self.device
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        image, mask, b = batch["image"], batch["mask"], batch["image"].shape[0]
        waves, perm, idx = batch["wave"], None, None
        if args.contrast != "none":
            self.bank.push(batch["wave"], batch["audio_classes"], batch["audio_pos"])
            perm, extra, idx, t2, match2, side2 = repair(batch, self.bank, args.pos_share, epoch >= 1,
                                                         args.bank_sources, args.match == "side")  # Eq. (1), App. B
            waves = torch.cat([waves, extra])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, z, _ = net(image, self.mel_fn(waves), perm, idx)
            loss_ce = self.ce(logits.float(), mask)  # Eq. (5), CE on the original pairs
        loss_cp = torch.zeros((), device=device)
        if args.contrast != "none":
            t = torch.cat([batch["audio_classes"], t2])
            match = torch.cat([torch.ones(b, dtype=torch.bool, device=device), match2])
            loss_cp = contrastive_loss(z, torch.cat([mask, mask]), t.long(), match, args.contrast, args.tau,
                                       args.anchors_per_group, args.positives, args.unknown, args.bg_groups,
                                       torch.cat([torch.zeros_like(side2), side2]))  # Eq. (2)-(4)
        return loss_ce + loss_cp, dict(ce=loss_ce, cp=loss_cp)  # Eq. (5)


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
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(obj), f, indent=1)
    os.replace(tmp, path)


def rng_state():
    """Python, numpy, torch (and CUDA) RNG states as plain containers and tensors (weights_only loads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, gauss=gauss),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
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


def init_distributed(args):
    """One process per rank under torchrun (nccl on CUDA, gloo on CPU) -> device, rank, world."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise data.DataError("--device cuda: no CUDA device is visible; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.batch_size % world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    return device, rank, world


def run_folder(args, world):
    """--out; else the checkpoint's folder with --resume; else runs/cavp-<data>-s<seed>-<time>, rank 0's on
    every rank."""
    if args.out is not None:
        return args.out
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    holder = [os.path.join("runs", f"cavp-{args.data}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")]
    if world > 1:
        dist.broadcast_object_list(holder)
    return holder[0]


def write_metrics(main_rank, args, run, split, final, meter):
    """metrics.json (rank 0): settings, every evaluation, the best one on `split`, the final one, the wall
    time and the training images/s."""
    if main_rank:
        scored = [h for h in run["history"] if h["split"] == split]
        best = max(scored, key=lambda h: h[run["metric"]]) if scored else None
        write_json(os.path.join(args.out, "metrics.json"), dict(
            args=vars(args), history=run["history"], final=final,
            best=best and dict(best, metric=run["metric"], score=best[run["metric"]]),
            wall_time_s=round(time.time() - meter.t0, 1), train_images_per_s=meter.images_per_s()))


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(args, splits):
    """split name -> VPO dataset of the --data subset (training augmentation and --crop on train only)."""
    return {split: data.VPODataset(args.data_root, args.data.split("_")[1], split, audio_root=args.audio_root,
                                   stereo=not args.mono, train=split == "train", crop=args.crop, limit=args.limit,
                                   pan=args.pan)
            for split in splits}


class EpochSampler(torch.utils.data.DistributedSampler):
    """This rank's share of a permutation seeded from (seed, epoch); set_epoch's `skip` leaves out the
    samples a resumed run has already trained on in that epoch, so the loader is built once."""
    skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def build_loaders(args, sets, twin_idx, rank, world, device):
    """The loaders, built once with persistent workers: train (EpochSampler, --batch-size split over the
    ranks, incomplete batches dropped) and one for the test split (exact shards; 'swap': its twins). Every
    loader has its own generator, so loading never draws from the training RNG; bit-exact --resume needs
    --workers 0 (worker RNG states are not checkpointed)."""
    def loader(dataset, batch_size, sampler=None):
        return torch.utils.data.DataLoader(
            dataset, batch_size, sampler=sampler, num_workers=args.workers, collate_fn=data.pad_collate,
            pin_memory=device.type == "cuda", drop_last=sampler is not None, persistent_workers=args.workers > 0,
            generator=torch.Generator().manual_seed(args.seed))
    evals = {split: loader(torch.utils.data.Subset(ds, range(rank, len(ds), world)), args.eval_batch_size)
             for split, ds in sets.items() if split != "train"}
    if twin_idx and not args.mono:  # the twin metrics once more with the stereo cue reversed
        evals["swap"] = loader(torch.utils.data.Subset(sets["test"], twin_idx[rank::world]), args.eval_batch_size)
    if "train" not in sets:
        return None, evals
    # (seed, epoch) -> seed * 100003 + epoch: no two seeds share an epoch's order
    sampler = EpochSampler(sets["train"], world, rank, shuffle=True, seed=args.seed * 100003, drop_last=True)
    return loader(sets["train"], args.batch_size // world, sampler), evals


def load_checkpoint(path):
    """A last.pt / best.pt of this script (plain containers, read with weights_only=True); anything else,
    a missing file included, is a one-line DataError naming the file."""
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise data.DataError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                             "pass a last.pt/best.pt written by cavp.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != "cavp":
        by = f" (written by {ckpt['script']}.py)" if isinstance(ckpt, dict) and "script" in ckpt else ""
        raise data.DataError(f"{path}: not a cavp.py checkpoint{by}; pass a last.pt/best.pt written by cavp.py")
    return ckpt


def use_checkpoint_args(args, ckpt):
    """The architecture flags come from the checkpoint, which also holds the weights."""
    for key in CKPT_KEYS:
        setattr(args, key, ckpt["args"][key])
    args.pretrained = "none"


def save_checkpoint(path, model, optimizer, run, args, extra, world):
    """Called on every rank (it gathers the per-rank RNG states); rank 0 passes the path and writes the
    model, optimiser, `run` (iteration, epoch, best, metric, history) and the method's `extra` state."""
    rngs = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(rngs, rngs[0])
    if path:
        save_atomic(dict(script="cavp", args=vars(args), model=model.state_dict(), optimizer=optimizer.state_dict(),
                         rng=rngs, extra=extra, **run), path)


class Meter:
    """Loss parts averaged between log lines; images/s over training time only, the first step (warm-up)
    left out; ETA from the wall time since the start, evaluations included."""

    def __init__(self, iteration, total, world):
        self.t0, self.start, self.total, self.world = time.time(), iteration, total, world
        self.sums, self.train_s, self.images = {}, 0.0, 0
        self.window_s, self.window_images = 0.0, 0

    def update(self, loss, parts, images, seconds, iteration):
        for key, value in dict(loss=loss, **parts).items():
            self.sums[key] = self.sums.get(key, 0.0) + value.item()
        self.sums["n"] = self.sums.get("n", 0) + 1
        self.window_s, self.window_images = self.window_s + seconds, self.window_images + images * self.world
        if iteration > self.start + 1:
            self.train_s, self.images = self.train_s + seconds, self.images + images * self.world

    def line(self, epoch, epochs, iteration, lr):
        n = self.sums.pop("n")
        parts = {k: v / n for k, v in self.sums.items()}
        loss = parts.pop("loss")
        eta = (time.time() - self.t0) / (iteration - self.start) * (self.total - iteration)
        text = (f"ep {epoch + 1}/{epochs} it {iteration}/{self.total} loss {loss:.4f} "
                f"({' '.join(f'{k} {v:.4f}' for k, v in parts.items())}) lr {lr:.2e} "
                f"{self.window_images / max(self.window_s, 1e-9):.1f} img/s "
                f"eta {eta // 3600:.0f}:{eta % 3600 // 60:02.0f}:{eta % 60:02.0f}")
        self.sums, self.window_s, self.window_images = {}, 0.0, 0
        return text

    def images_per_s(self):
        return round(self.images / max(self.train_s, 1e-9), 2)


def train_one_epoch(net, loader, optimizer, scheduler, criterion, meter, epoch, iteration, args, log_path):
    """One pass over the loader (the rest of it after a resume inside the epoch), ending early at
    meter.total (--max-iters); returns the iteration count."""
    net.train()
    tick = time.time()
    for batch in loader:
        loss, parts = criterion(net, batch, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()  # poly, per iteration (App. B.1)
        iteration += 1
        now = time.time()
        meter.update(loss, parts, math.prod(batch["image"].shape[:-3]), now - tick, iteration)
        tick = now
        if log_path and (iteration % args.log_every == 0 or iteration == meter.total):
            log(meter.line(epoch, args.epochs, iteration, optimizer.param_groups[0]["lr"]), log_path)
        if iteration >= meter.total:
            break
    return iteration


def save_overlay(path, image, mask, pred, attn):
    """One PNG: image | ground truth | prediction | cross-attention heatmap (App. C, Fig. 10), titled,
    with a legend of the classes in ground truth or prediction."""
    img, colors = data.to_uint8(image), data.class_colors()
    panels = [img, data.label_overlay(img, mask, colors), data.label_overlay(img, pred, colors),
              data.heatmap_overlay(img, attn.float())]
    data.save_panels(panels, ["image", "ground truth", "prediction", "attention"],
                     data.legend_for([mask, pred], data.VPO_CLASSES, colors), path)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, mel_fn, device, amp, num_classes, overlay_dir=None, n_overlays=0, swap=False):
    """Dataset-level mIoU / F-beta / FDR from one confusion matrix (SPEC 2) and, where the samples carry
    silent twins, the twin metrics (metrics.TwinMeter), all-reduced over ranks; overlays of the first
    n_overlays images. swap: left and right audio channels exchanged."""
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
        for i, name in enumerate(batch["name"]):
            if written < n_overlays:
                save_overlay(os.path.join(overlay_dir, f"{name}.png"), image[i], mask[i], pred[i], attn[i])
                written += 1
    cm.all_reduce()
    twins.all_reduce()
    model.train()
    return dict(cm.compute(), **twins.compute())


def run_eval(model, loaders, weights, mel_fn, device, amp, args, log_path):
    """Test metrics (overlays and, with stereo twins, the twin metrics with left and right swapped),
    logged on rank 0 -> dict(split, weights, metrics)."""
    num_classes = len(data.VPO_CLASSES)
    n_overlays = args.overlays if log_path else 0
    res = evaluate(model, loaders["test"], mel_fn, device, amp, num_classes, os.path.join(args.out, "overlays"),
                   n_overlays)
    if "swap" in loaders:
        swapped = evaluate(model, loaders["swap"], mel_fn, device, amp, num_classes, swap=True)
        res.update({f"{key}_swap": swapped[key] for key in metrics.TWIN_KEYS})
    if log_path:
        log(metrics.format_table(data.VPO_CLASSES, res), log_path)
        if res["twin_images"]:
            log(metrics.format_twins(res), log_path)
    return dict(split="test", weights=weights, **res)


@torch.no_grad()
def predict(args):
    """--predict: one image (any size) and one WAV through the --ckpt model, as the evaluation at original
    resolution does -> OUT/<stem>.png (image | prediction | attention, legend) and OUT/<stem>.json
    (predicted classes, their pixel shares, the inputs); returns the JSON's content."""
    ckpt = load_checkpoint(args.ckpt)
    use_checkpoint_args(args, ckpt)
    device = init_distributed(args)[0]
    amp = not args.no_amp and native_bf16(device)
    image, rgb = data.read_rgb(args.predict)
    wave = data.load_predict_audio(args.audio, stereo=not args.mono, audio_pos=args.audio_pos)
    model = CAVPModel(args, len(data.VPO_CLASSES)).to(device).eval()
    model.load_state_dict(ckpt["model"])
    mel_fn = data.LogMel(frames=300).to(device)
    # any H x W works: DeepLabV3+ resizes its high-level map to the 1/4 one and the logits to the input
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits, _, attn = model(image[None].to(device), mel_fn(wave[None].to(device)))
    pred, colors = logits.argmax(1)[0].cpu(), data.class_colors()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "predict")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, os.path.splitext(os.path.basename(args.predict))[0])
    data.save_panels([rgb, data.label_overlay(rgb, pred, colors), data.heatmap_overlay(rgb, attn[0].float())],
                     ["image", "prediction", "attention"], data.legend_for([pred], data.VPO_CLASSES, colors),
                     stem + ".png")
    shares = data.class_shares(pred, data.VPO_CLASSES)
    res = dict(image=args.predict, audio=args.audio, audio_pos=args.audio_pos, checkpoint=args.ckpt,
               height=rgb.shape[0], width=rgb.shape[1], classes=list(shares), shares=shares,
               background=(pred == 0).float().mean().item())
    write_json(stem + ".json", res)
    for ext in (".png", ".json"):
        print(f"wrote {stem}{ext}")
    return res


# ----------------------------------------------------------------------------- main


def main(args):
    if args.predict:
        return predict(args)
    device, rank, world = init_distributed(args)
    main_rank, amp = rank == 0, not args.no_amp and native_bf16(device)
    ckpt = load_checkpoint(args.resume or args.ckpt) if args.resume or args.eval_only else None
    if ckpt:
        use_checkpoint_args(args, ckpt)
    resolve_defaults(args)
    args.out = run_folder(args, world)
    seed_all(args.seed + rank)

    sets = build_datasets(args, ["test"] if args.eval_only else ["test", "train"])  # read before the run folder
    twin_idx = []
    if args.eval_audio == "real" and data.attach_twins(sets["test"], args.coco_ann):
        twin_idx = sorted(sets["test"].twins)  # VPO-MSMI: images whose sounding object has silent twins
    if args.eval_only:
        sets["test"] = data.eval_audio_set(sets["test"], args.eval_audio, args.coco_ann, args.seed)
    train_loader, eval_loaders = build_loaders(args, sets, twin_idx, rank, world, device)
    log_path = os.path.join(args.out, "log.txt") if main_rank else None
    if main_rank:
        os.makedirs(os.path.join(args.out, "overlays"), exist_ok=True)
        log(f"cavp: {' '.join(sys.argv[1:])}", log_path)
        log(f"settings: {json.dumps(vars(args), sort_keys=True)}", log_path)
        log(f"{world} rank(s) on {device}, bf16 autocast {amp}", log_path)
    num_classes = len(data.VPO_CLASSES)
    mel_fn = data.LogMel(frames=300).to(device)  # SPEC 1.3: 3 s -> 300 frames x 64 mel bins

    model = CAVPModel(args, num_classes).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if args.eval_only:
        res = run_eval(model, eval_loaders, args.ckpt, mel_fn, device, amp, args, log_path)
        if main_rank:
            if args.eval_audio != "real":
                log(f"{args.eval_audio} audio: {100 * res['fg_pred']:.2f}% of the pixels segmented as a sounding "
                    "object (false detections; 0 is right)", log_path)
            # eval-real.json / eval-silence.json / eval-absent.json: never the training run's metrics.json
            write_json(os.path.join(args.out, f"eval-{args.eval_audio}.json"), dict(args=vars(args), eval=res))
        return res

    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1 and main_rank:
        log("note: SyncBatchNorm needs CUDA; on CPU each rank keeps its own BatchNorm statistics", log_path)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise data.DataError(f"{args.data} train split has {len(sets['train'])} samples, fewer than "
                             f"--batch-size {args.batch_size}: lower --batch-size or --limit")
    total = min(args.max_iters or math.inf, args.epochs * iters_per_epoch)
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if id(p) not in head_ids]
    lr = args.lr * args.batch_size / 16  # App. B.1: lr 1e-3 for batch 16, scaled linearly
    optimizer = torch.optim.SGD([dict(params=rest, lr=lr), dict(params=head, lr=lr * args.head_lr_mult)],
                                lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    schedule = args.epochs * iters_per_epoch  # poly over the epochs, per iteration (App. B.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - min(it, schedule - 1) / schedule) ** args.poly_power)
    criterion = Criterion(args, num_classes, mel_fn, device, amp)
    run = dict(iteration=0, epoch=0, best=-math.inf, metric="miou", history=[])
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["extra"]["scheduler"])
        criterion.bank.load_state_dict(ckpt["extra"]["bank"])
        run = {key: ckpt[key] for key in run}
        if len(ckpt["rng"]) == world:  # per-rank RNG states; with another world size the seeds stay fresh
            set_rng_state(ckpt["rng"][rank])
        if main_rank:
            log(f"resumed from {args.resume} at epoch {run['epoch']}, iteration {run['iteration']}", log_path)

    meter = Meter(run["iteration"], total, world)
    res = run["history"][-1] if run["history"] else None  # a resumed finished run keeps its final metrics
    for epoch in range(run["iteration"] // iters_per_epoch, args.epochs):
        if run["iteration"] >= total:
            break
        skip = (run["iteration"] - epoch * iters_per_epoch) * (args.batch_size // world)  # resume inside an epoch
        train_loader.sampler.set_epoch(epoch, skip)
        run["iteration"] = train_one_epoch(net, train_loader, optimizer, scheduler, criterion, meter, epoch,
                                           run["iteration"], args, log_path)
        run["epoch"] = run["iteration"] // iters_per_epoch
        stop = run["iteration"] >= total
        extra = dict(scheduler=scheduler.state_dict(), bank=criterion.bank.state_dict())
        if stop or (epoch + 1) % args.eval_every == 0:
            eval_t = time.time()
            res = run_eval(model, eval_loaders, "last", mel_fn, device, amp, args, log_path)
            run["history"].append(dict(epoch=epoch + 1, iteration=run["iteration"], **res))
            if main_rank:
                log(f"eval ep {epoch + 1}: mIoU {100 * res['miou']:.2f} F-beta {100 * res['mean_fbeta']:.2f} "
                    f"FDR {100 * res['mean_fdr']:.2f} ({time.time() - eval_t:.1f} s)", log_path)
            if res[run["metric"]] > run["best"]:
                run["best"] = res[run["metric"]]
                save_checkpoint(main_rank and os.path.join(args.out, "best.pt"), model, optimizer, run, args, extra,
                                world)
            write_metrics(main_rank, args, run, "test", res, meter)
        save_checkpoint(main_rank and os.path.join(args.out, "last.pt"), model, optimizer, run, args, extra, world)
        if stop:
            break
    write_metrics(main_rank, args, run, "test", res, meter)
    if main_rank:
        log(f"done in {time.time() - meter.t0:.0f} s; best mIoU {100 * run['best']:.2f}; run folder {args.out}",
            log_path)
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
