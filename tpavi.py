"""TPAVI, the baseline of "Audio-Visual Segmentation" (AVSBench), in one file.

Jinxing Zhou, Jianyuan Wang, Jiayi Zhang, Weixuan Sun, Jing Zhang, Stan Birchfield, Dan Guo,
Lingpeng Kong, Meng Wang, Yiran Zhong. ECCV 2022. https://arxiv.org/abs/2207.05042
Released code: github.com/OpenNLPLab/AVSBench ("AVS" below: the paper; comments name the released
file where this one follows the release).

    python vpo_make.py --synthetic --out data                      # built-in VPO, CPU-sized
    python tpavi.py --data vpo_ss --data-root data --eval-every 5  # train + evaluate
    python tpavi.py --data vpo_ss --data-root data --eval-only --ckpt runs/<run>/best.pt
    torchrun --nproc_per_node=8 tpavi.py --data avss --data-root data/AVSBench --batch-size 32
    python tpavi.py --data avsbench_ms3 --data-root data/AVSBench     # AVSBench, the paper's recipe
    python tpavi.py --data avsbench_s4 --data-root data/AVSBench --backbone pvt_v2_b5 \\
        --pretrained pvt_v2_b5.pth
    python tpavi.py --data avss --data-root data/AVSBench --eval-only \\
        --ckpt V2_pvt_miou_best.pth --audio-encoder vggish --vggish-weights vggish-10086976.pth
"""
import argparse
import itertools
import json
import math
import os
import random
import re
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

# --data -> loader, subset / task, logits K (1 = binary), epochs, lambda of L_AVM, frame size.
# AVSBench: epochs of the released train.sh; avs_scripts/avs_s4/train.sh trains without L_AVM.
# VPO (CAVP §3): epochs and training crop of the CAVP protocol (CAVP App. B.1).
DATASETS = {
    "avsbench_s4": dict(kind="avs", subset="s4", classes=1, epochs=15, lam=0.0, crop=224),
    "avsbench_ms3": dict(kind="avs", subset="ms3", classes=1, epochs=30, lam=0.5, crop=224),
    "avss": dict(kind="avs", subset="avss", classes=data.AVSS_NUM_CLASSES, epochs=60, lam=0.5,
                 crop=224),
    "vpo_ss": dict(kind="vpo", subset="ss", classes=22, epochs=80, lam=0.5, crop=512),
    "vpo_ms": dict(kind="vpo", subset="ms", classes=22, epochs=80, lam=0.5, crop=512),
    "vpo_msmi": dict(kind="vpo", subset="msmi", classes=22, epochs=80, lam=0.5, crop=512),
}
ENCODER_CHANNELS = {"resnet18": [64, 128, 256, 512], "resnet50": [256, 512, 1024, 2048],
                    "pvt_v2_b5": [64, 128, 320, 512]}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad flags: one line on stderr, exit code 2."""
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def parse_args(argv=None):
    """The flags; the defaults are the paper's (AVS). args.given: the flags on the command line."""
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("data").add_argument
    a("--data", default="vpo_msmi", choices=list(DATASETS),
      help="AVSBench-Objects S4 / MS3, AVSBench-Semantics (AVS) or a VPO subset (CAVP §3)")
    a("--data-root", default="data", help="folder with VPO-SS/ VPO-MS/ VPO-MSMI/ (and audio/), "
      "or AVSBench's Single-source/ Multi-sources/ AVSBench-semantic/")
    a("--audio-root", default=None, help="VPO: folder of {vgg_file}.wav (default DATA_ROOT/audio)")
    a("--mono", action="store_true", help="mono audio instead of stereo (CAVP Table 8 ablation)")
    a("--pan", default="csv", choices=["csv", "crop"],
      help="VPO training: pan at the CSV audio_pos, mirrored on a flip (%(default)s, as released), "
           "or at the object's centre of mass after flip, scale and crop (see docs/RESULTS.md)")
    a("--crop", type=int, default=224, help="frame size (AVS: %(default)s); VPO: training crop "
      "512 (CAVP App. B.1); built-in VPO: its image size")
    a("--limit", type=int, default=None, help="the first N samples of each split (quick checks)")
    a("--workers", type=int, default=4, help="loader processes per rank (%(default)s keep a GPU "
      "fed at crop 512, benchmarks/loader.py; built-in VPO: 2, the CPU that trains also loads)")
    a = p.add_argument_group("model (AVS Fig. 3)").add_argument
    a("--backbone", default="resnet50", choices=list(ENCODER_CHANNELS),
      help="image encoder (AVS: %(default)s or pvt_v2_b5; built-in VPO: resnet18)")
    a("--pretrained", default="imagenet", help="encoder weights: imagenet (torchvision, ResNets), "
      "none, or a local .pth (pvt_v2_b5.pth of the PVT release) (%(default)s; built-in VPO: none)")
    a("--tpavi-stages", type=int, nargs="*", default=[0, 1, 2, 3],
      help="encoder stages with a TPAVI block (released train.sh: 0 1 2 3; none: AVS Table 2's "
           "'without TPAVI')")
    a("--tpavi-window", type=int, default=5,
      help="TPAVI attends within groups of this many frames, as the released TPAVI (%(default)s: "
           "AVSBench-Semantics' 10-frame clips attend within frames 0-4 and 5-9); 0: the whole "
           "clip")
    a("--audio-encoder", default="resnet18", choices=["resnet18", "vggish"],
      help="resnet18 on the log-mel, trained (this project's choice, as CAVP: VGGish weights "
           "load from a local file only); vggish: frozen (AVS), needs --vggish-weights")
    a("--vggish-weights", default=None,
      help="local VGGish state dict (torchvggish layout: features.*, embeddings.*; the "
           "release's vggish-10086976.pth)")
    a = p.add_argument_group("loss (AVS Eq. (1)-(2))").add_argument
    a("--lambda-avm", type=float, default=None, help="weight of L_AVM in Eq. (1), 0 disables "
      "(default per --data as the released train.sh: avsbench_s4 0, else 0.5; 0 without TPAVI "
      "stages)")
    a = p.add_argument_group("optimisation (AVS)").add_argument
    a("--epochs", type=int, default=None, help="default per --data: avsbench_s4 15, avsbench_ms3 "
      "30, avss 60 (AVS); VPO 80 (CAVP App. B.1)")
    a("--batch-size", type=int, default=4, help="clips per step over all ranks (AVS: %(default)s)")
    a("--lr", type=float, default=1e-4, help="Adam learning rate, constant (AVS: %(default)s)")
    a("--seed", type=int, default=0, help="random seed (each rank draws its own)")
    a("--max-iters", type=int, default=None, help="stop after N iterations in all (quick checks)")
    a = p.add_argument_group("run").add_argument
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    a("--no-amp", action="store_true", help="no bf16 autocast (default: on for CUDA and CPUs with "
      "native bf16, AVX512-BF16 / AMX; elsewhere emulated ~20x slower, so fp32)")
    a("--compile", action="store_true",
      help="torch.compile the image encoder (measure it on your GPU first; no gain on CPU)")
    a("--out", default=None, help="run folder (default runs/tpavi-<data>-s<seed>-<time>; "
      "with --resume the checkpoint's folder)")
    a("--resume", default=None, help="continue training from a checkpoint (runs/<run>/last.pt)")
    a("--overwrite", action="store_true",
      help="let a new training run replace the run in --out (last.pt, best.pt, metrics.json)")
    a("--eval-only", action="store_true", help="only evaluate --ckpt on the test split")
    a("--ckpt", default=None, help="checkpoint for --eval-only or --predict: a last.pt / best.pt "
      "or a released AVSBench model (OpenNLPLab/AVSBench, e.g. V2_pvt_miou_best.pth)")
    a("--eval-audio", default="real", choices=data.EVAL_AUDIO,
      help="--eval-only on VPO: real audio, silence or a class absent from the image; the last "
           "two make the target all background, so fg_pred is the false-detection rate")
    a("--coco-ann", default=None, help="COCO instances JSON of the test images for --eval-audio "
      "absent (default DATA_ROOT/sources/coco/annotations/instances_val2017.json)")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    a("--save-every", type=int, default=1,
      help="write last.pt every N epochs and after the last (%(default)s; built-in VPO: 10)")
    a("--eval-batch-size", type=int, default=1,
      help="clips per evaluation step and rank (CAVP App. B.1: 1, VPO at original resolution)")
    a("--log-every", type=int, default=20, help="log every N iterations (as released: %(default)s)")
    a("--overlays", type=int, default=4, help="write PNG overlays of the first N test images")
    a = p.add_argument_group("predict on your own frames and sound").add_argument
    a("--predict", default=None, metavar="FRAMES_DIR_OR_IMAGE",
      help="segment a folder of frames (name order, one size) or an image with --audio and "
           "--ckpt; writes <frame>.png and <stem>.json to --out (default CKPT's folder/predict)")
    a("--audio", default=None, metavar="WAV", help="with --predict: any WAV; 1 s per frame from "
      "its start (AVSBench), or 3 s from its middle for an image on a VPO model")
    a("--audio-pos", type=float, default=None, metavar="A", help="with --predict: pan the clip "
      "to A, 0 = left .. 1 = right, as VPO (CAVP §3); needed for mono on a stereo model")
    a("--max-size", type=int, default=None, metavar="PX", help="with --predict: run at a long side "
      "of at most PX, predictions resized back (default the checkpoint's --crop)")
    args = p.parse_args(argv)
    stages, positive = args.tpavi_stages, ("batch_size", "eval_every", "save_every",
                                           "eval_batch_size", "log_every", "epochs", "max_iters",
                                           "limit", "crop", "max_size")
    for bad, message in [
            *[(getattr(args, flag) is not None and getattr(args, flag) < 1,
               f"--{flag.replace('_', '-')} must be >= 1") for flag in positive],
            (min(args.workers, args.overlays, args.tpavi_window) < 0,
             "--workers, --overlays and --tpavi-window must be >= 0"),
            (args.predict and not (args.ckpt and args.audio),
             "--predict needs --ckpt PATH and --audio WAV"),
            (not args.predict and (args.audio or args.audio_pos is not None
                                   or args.max_size is not None),
             "--audio, --audio-pos and --max-size are for --predict FRAMES_DIR_OR_IMAGE"),
            (args.predict and (args.eval_only or args.resume),
             "--predict excludes --eval-only and --resume"),
            (args.eval_only and args.ckpt is None, "--eval-only needs --ckpt PATH"),
            (not args.eval_only and (args.predict is None) != (args.ckpt is None),
             "--ckpt is for --eval-only or --predict; use --resume PATH to continue training"),
            (args.eval_audio != "real" and not (args.eval_only and args.data.startswith("vpo")),
             f"--eval-audio {args.eval_audio} is for --eval-only on a VPO --data"),
            (args.eval_only and args.resume, "--resume and --eval-only exclude each other"),
            (any(s not in range(4) for s in stages) or len(set(stages)) != len(stages),
             f"--tpavi-stages {' '.join(map(str, stages))}: give distinct stages from 0 1 2 3"),
            (args.lambda_avm is not None and args.lambda_avm < 0, "--lambda-avm must be >= 0"),
            (args.lambda_avm and not stages, "L_AVM needs the audio of a TPAVI block: add "
             "--tpavi-stages or set --lambda-avm 0"),
            (args.audio_encoder == "vggish" and args.vggish_weights is None,
             "--audio-encoder vggish needs --vggish-weights PATH (VGGish weights load from a "
             "local file only)"),
            (args.audio_encoder != "vggish" and args.vggish_weights is not None,
             "--vggish-weights needs --audio-encoder vggish")]:
        if bad:
            p.error(message)
    args.given = given_flags(p, argv)
    return args


def given_flags(parser, argv=None):
    """The flags on the command line (as dests): argv parsed again with every default suppressed."""
    defaults = [(action, action.default) for action in parser._actions]
    for action, _ in defaults:
        action.default = argparse.SUPPRESS
    try:
        return sorted(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default


# The built-in synthetic VPO (`python vpo_make.py --synthetic`) is CPU-sized; for flags not given:
BUILTIN = dict(
    backbone="resnet18",  # a small encoder a CPU trains in minutes
    pretrained="none",  # no download; the synthetic images are not ImageNet's
    crop=None,  # the built-in image size, from its vpo_summary.json
    workers=2,  # the CPU that trains also loads
    save_every=10,  # last.pt (487 MB with Adam's moments) after every 10th epoch, not each
)


def resolve_defaults(args, given):
    """The per --data values (crop, epochs, lambda_avm) and, on the built-in VPO, BUILTIN's, for the
    flags not in `given` (the command line's and, with a checkpoint, CKPT_KEYS)."""
    spec = DATASETS[args.data]
    summary = os.path.join(args.data_root, "vpo_summary.json")
    info = {}
    if spec["kind"] == "vpo" and os.path.isfile(summary):
        with open(summary) as f:
            info = json.load(f)
    args.builtin = bool(info.get("synthetic"))  # written by `vpo_make.py --synthetic`
    values = dict(crop=spec["crop"], epochs=spec["epochs"],
                  lambda_avm=spec["lam"] if args.tpavi_stages else 0.0)
    if args.builtin:
        values.update(BUILTIN, crop=int(info["image_size"]))
    for key, value in values.items():
        if key not in given:
            setattr(args, key, value)
    if args.backbone == "pvt_v2_b5" and args.pretrained == "imagenet":
        raise data.DataError("--pretrained imagenet: torchvision has no PVT-v2 weights; pass "
                             "--pretrained PATH (pvt_v2_b5.pth of the PVT release) or "
                             "--pretrained none")
    return args


def class_names(dataset):
    """VPO's 22 classes, background / sounding object (S4 / MS3, binary), AVSS class ids."""
    spec = DATASETS[dataset]
    if spec["kind"] == "vpo":
        return data.VPO_CLASSES
    if spec["classes"] == 1:
        return ["background", "sounding object"]
    return [f"class {i}" for i in range(spec["classes"])]


# ----------------------------------------------------------------------------- model


class TPAVI(nn.Module):
    """Temporal pixel-wise audio-visual interaction (AVS Fig. 4), the released "dot" mode of
    TPAVIModule (OpenNLPLab/AVSBench, avs_scripts/avs_s4/model/TPAVI.py).

    theta, g = 1x1 convs 256 -> 128 on the visual map x; phi = 1x1 conv 256 -> 128 on the aligned
    audio a = Linear(128 -> 256) broadcast over HxW; f = theta^T phi over all N = T*H*W positions of
    a clip, y = (f / N) g (no softmax); z = LayerNorm_C(x + BN(W_z(y))).
    A 1x1 conv of the broadcast audio is a Linear on a, so phi is a Linear here.
    The released TPAVI reshapes a clip to groups of 5 frames, N = 5*H*W: `window` frames attend
    together (0: the whole clip; AVSBench-Semantics v2, T = 10: frames 0-4 and 5-9).
    """

    def __init__(self, channels=256, audio_dim=128, window=5):
        super().__init__()
        self.window = window
        inter = channels // 2
        self.align = nn.Linear(audio_dim, channels)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Linear(channels, inter)
        self.g = nn.Conv2d(channels, inter, 1)
        self.w_z = nn.Sequential(nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.w_z[1].weight)  # BN of W_z starts at zero: the block starts as LN(x)
        nn.init.zeros_(self.w_z[1].bias)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x, audio, valid=None):
        """x (B*T, C, H, W), audio (B, T, 128), valid (B, T) bool of real (not padded) frames or
        None -> z (B*T, C, H, W), aligned audio a (B, T, C)."""
        b, t = audio.shape[:2]
        a = self.align(audio)
        phi = self.phi(a)  # (B, T, C')
        g = self.g(x).mean((2, 3)).view(b, t, -1)  # mean_HW(g)_t, (B, T, C')
        w = audio.new_ones(b, t) if valid is None else valid.to(audio.dtype)
        theta = self.theta(x)
        theta = theta.view(b, t, *theta.shape[1:])
        n = self.window if 0 < self.window < t else t
        if n < t:  # each window as a clip of n frames
            w, phi, g, theta = (frame_windows(v, n) for v in (w, phi, g, theta))
        # phi is constant over HxW, so y_i = (1/N) sum_j (theta_i . phi_j) g_j with N = T*H*W
        # equals (1/T) sum_t (theta_i . phi_t) mean_HW(g)_t = theta_i^T M,
        # M = (1/T) sum_t phi_t g_t^T, without the (THW)^2 matrix; padded frames are left out of
        # the sum and of T (the release zeroes their features instead)
        m = torch.einsum("bt,btk,btc->bkc", w, phi, g) / w.sum(1).clamp(min=1)[:, None, None]
        y = torch.einsum("btkhw,bkc->btchw", theta, m)
        y = y.reshape(b, -1, *y.shape[2:])[:, :t].flatten(0, 1)  # a last window's padding out
        z = x + self.w_z(y)  # residual
        return self.norm(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), a  # LayerNorm over channels


def frame_windows(v, n):
    """(B, T, ...) -> (B * ceil(T / n), n, ...): consecutive groups of n frames, the last one
    zero-padded (weight 0: outside the window's sum and count)."""
    b, t = v.shape[:2]
    pad = -t % n
    if pad:
        v = torch.cat([v, v.new_zeros(b, pad, *v.shape[2:])], 1)
    return v.reshape(-1, n, *v.shape[2:])


class AVSModel(nn.Module):
    """Encoder -> ASPP -> TPAVI -> DPT decoder -> head (AVS Fig. 3), plus the audio encoder."""

    def __init__(self, backbone, pretrained, num_classes, tpavi_stages, audio_encoder="resnet18",
                 audio_channels=2, vggish_weights=None, channels=256, tpavi_window=5,
                 vggish_pad="repeat"):
        super().__init__()
        self.encoder = (PVTv2(pretrained) if backbone == "pvt_v2_b5"
                        else ResNetEncoder(backbone, pretrained))
        self.aspp = nn.ModuleList(ASPP(c, channels) for c in ENCODER_CHANNELS[backbone])
        self.tpavi = nn.ModuleDict({str(i): TPAVI(channels, window=tpavi_window)
                                    for i in sorted(tpavi_stages)})
        self.fuse = nn.ModuleList(FusionBlock(channels, skip=i < 3) for i in range(4))
        self.head1 = nn.Conv2d(channels, 128, 3, padding=1)
        self.head2 = nn.Sequential(nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(32, num_classes, 1))
        self.audio = (VGGish(vggish_weights, vggish_pad) if audio_encoder == "vggish"
                      else AudioResNet18(audio_channels))

    def forward(self, image, wave, valid=None, audio_len=None):
        """image (B, T, 3, H, W); wave (B, C, N) of the T frames; valid (B, T) or None; audio_len
        (B,) samples of each clip's own audio or None -> logits (B*T, K, H, W), the four stage
        maps (B*T, 256, h, w), the aligned audio per stage (B, T, 256; None at stages without
        TPAVI)."""
        audio = self.audio(wave, image.shape[1], audio_len)  # (B, T, 128)
        feats = [aspp(f) for aspp, f in zip(self.aspp, self.encoder(image.flatten(0, 1)))]
        audios = [None] * 4
        for key, block in self.tpavi.items():
            feats[int(key)], audios[int(key)] = block(feats[int(key)], audio, valid)
        # decoder: deepest stage first, each fusion upsamples to the next stage's size (x2 at 224)
        x = self.fuse[3](feats[3], None, feats[2].shape[-2:])
        x = self.fuse[2](x, feats[2], feats[1].shape[-2:])
        x = self.fuse[1](x, feats[1], feats[0].shape[-2:])
        x = self.fuse[0](x, feats[0], [2 * s for s in feats[0].shape[-2:]])
        # head: conv 256 -> 128, x2 up (to the input size exactly), conv 128 -> 32, ReLU, 32 -> K
        x = F.interpolate(self.head1(x), size=image.shape[-2:], mode="bilinear",
                          align_corners=False)
        return self.head2(x), feats, audios


class ASPP(nn.Module):
    """The released "ASPP" (Classifier_Module of avs_scripts/avs_ms3/model/ResNet_AVSModel.py): sum
    of four 3x3 convs C -> 256, dilation = padding = 3, 6, 12, 18, no BN / ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.convs = nn.ModuleList(AtrousConv(cin, cout, 3, padding=r, dilation=r)
                                   for r in (3, 6, 12, 18))
        for conv in self.convs:
            nn.init.normal_(conv.weight, 0, 0.01)  # as released

    def forward(self, x):
        return sum(conv(x) for conv in self.convs)


class AtrousConv(nn.Conv2d):
    """A 3x3 convolution at dilation = padding = r. On a map of at most r rows and columns every tap
    but the centre reads the zero padding, so the centre tap alone (a 1x1 convolution, 1/9 of the
    cost) gives the same output and gradients: at 224 px, rate 18 on the 14 x 14 map and 12, 18 on
    the 7 x 7 one."""

    def forward(self, x):
        if self.dilation[0] < max(x.shape[2:]):
            return super().forward(x)
        return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)


class ResidualConvUnit(nn.Module):
    """DPT residual conv unit. The released one (ResidualConvUnit, avs_scripts/avs_ms3/model/
    ResNet_AVSModel.py) applies an in-place ReLU to its input, so the skip carries relu(x):
    relu(x) + conv(relu(conv(relu(x)))); this is written out here."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FusionBlock(nn.Module):
    """DPT fusion: x (+ RCU(skip)) -> RCU -> bilinear upsampling (x2, to the next stage's size)."""

    def __init__(self, c, skip=True):
        super().__init__()
        self.rcu1 = ResidualConvUnit(c) if skip else None
        self.rcu2 = ResidualConvUnit(c)

    def forward(self, x, skip, size):
        if skip is not None:
            x = x + self.rcu1(skip)
        return F.interpolate(self.rcu2(x), size=size, mode="bilinear", align_corners=True)


class AudioResNet18(nn.Module):
    """ResNet-18 on CAVP's log-mel (data.LogMel): conv1 takes 2 (stereo) / 1 (mono) channels,
    global max pool, FC 512 -> 128; one embedding per segment (AVSBench: 1 s a frame; VPO: 3 s)."""

    def __init__(self, channels, dim=128):
        super().__init__()
        self.logmel = data.LogMel()
        self.net = torchvision.models.resnet18(weights=None, num_classes=dim)
        self.net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        self.net.avgpool = nn.AdaptiveMaxPool2d(1)

    def forward(self, wave, t=1, audio_len=None):
        """wave (B, C, N), split into T equal segments -> (B, T, 128); audio_len is not used."""
        seg = wave.shape[-1] // t
        segments = wave[..., :seg * t].unflatten(-1, (t, seg)).transpose(1, 2).flatten(0, 1)
        mel = self.logmel(segments)[..., :seg // 160, :]  # 100 frames a second
        return self.net(mel).view(wave.shape[0], t, -1)


class VGGish(nn.Module):
    """VGGish (Hershey et al., 2017), AVS's audio encoder: 0.96 s log-mel examples (96 x 64) of
    VGGish's own front end (data.VGGishLogMel) -> 128-d; frozen, weights from a local file (path
    None: they come with a checkpoint). AVSBench: frame k gets example k of the whole clip
    (data.vggish_examples; `pad` past the last one: "repeat" for AVSBench-Objects, "zero" for
    AVSBench-Semantics). One frame (VPO, 3-s clips): the mean of the embeddings of the clip's 3
    examples, at 0, 0.96 and 1.92 s (2.895-3 s is in none); a VPO source panned at alpha has L =
    (1 - alpha) w, R = alpha w, whose mean w / 2 VGGish hears at every alpha."""

    def __init__(self, path, pad="repeat"):
        super().__init__()
        self.pad = pad
        layers, cin = [], 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(),
                                        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 128),
                                        nn.ReLU())
        self.logmel = data.VGGishLogMel()
        if path and load_state(self, path, "--vggish-weights")[0] != len(self.state_dict()):
            raise data.DataError(f"--vggish-weights {path}: not every VGGish tensor is in it; "
                                 "expected the torchvggish state dict (features.*, embeddings.*)")
        self.requires_grad_(False)

    def forward(self, wave, t=1, audio_len=None):
        """wave (B, C, N) of T frames, audio_len (B,) samples of each clip's own audio or None ->
        (B, T, 128)."""
        logmel = self.logmel(wave)
        slots = t if t > 1 else max(logmel.shape[1] // data.VGGISH_EXAMPLE, 1)
        x = data.vggish_examples(logmel, slots, audio_len, self.pad)
        x = self.features(x.flatten(0, 1)[:, None])
        x = self.embeddings(x.permute(0, 2, 3, 1).flatten(1))  # channels-last flatten (TF weights)
        x = x.view(wave.shape[0], slots, -1)
        return x if t > 1 else x.mean(1, keepdim=True)


def load_state(module, path, what, rename=lambda k: k):
    """Load the tensors of a local state dict whose names and shapes match -> (matched, total)."""
    state = read_torch(path, f"{what} {path}: no such file (give a local .pth state dict)",
                       lambda err: f"{what} {path}: cannot read it as a torch state dict ({err})")
    state = state.get("state_dict", state.get("model", state))
    own = module.state_dict()
    state = {rename(k.removeprefix("module.")): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not state:
        raise data.DataError(f"{what} {path}: no tensor matches the {type(module).__name__} it "
                             "is meant for")
    module.load_state_dict(state, strict=False)
    return len(state), len(own)


class ResNetEncoder(nn.Module):
    """torchvision ResNet, stages 1-4 at strides 4, 8, 16, 32 (the released B2_ResNet,
    avs_scripts/avss/model/resnet.py, is a plain ResNet-50)."""

    def __init__(self, name, pretrained):
        super().__init__()
        weights = None
        if pretrained == "imagenet":
            weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        waits = weights is not None and dist.is_initialized() and dist.get_rank() > 0
        if waits:  # under torchrun rank 0 downloads the weights into the cache, the others wait
            dist.barrier()
        try:
            self.net = getattr(torchvision.models, name)(weights=weights)
        except Exception as e:
            raise data.DataError(f"could not download the ImageNet weights of {name} "
                                 f"({type(e).__name__}; offline?): fetch {weights.url} elsewhere "
                                 "and pass --pretrained PATH (a local .pth state dict), or "
                                 "--pretrained none") from e
        if weights is not None and dist.is_initialized() and not waits:
            dist.barrier()
        self.net.fc = nn.Identity()
        if pretrained not in ("imagenet", "none"):
            load_state(self.net, pretrained, "--pretrained")

    def forward(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        feats = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def drop_path(x, p, training):
    """Stochastic depth: drop the residual branch per sample with probability p."""
    if p == 0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: strided conv (7/4 first, 3/2 after) + LayerNorm (PVT-v2)."""

    def __init__(self, cin, dim, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class SRAttention(nn.Module):
    """Spatial-reduction attention: keys / values from a stride-sr conv of the tokens (PVT-v2)."""

    def __init__(self, dim, heads, sr):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, sr, sr) if sr > 1 else None
        self.norm = nn.LayerNorm(dim) if sr > 1 else None

    def forward(self, x, h, w):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w))
            x = self.norm(x.flatten(2).transpose(1, 2))
        k, v = self.kv(x).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv -> GELU -> Linear (PVT-v2)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        x = self.fc1(x)
        x = self.dwconv(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return self.fc2(F.gelu(x.flatten(2).transpose(1, 2)))


class PVTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, sr, drop):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), SRAttention(dim, heads, sr)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MixFFN(dim, dim * mlp_ratio)
        self.drop = drop

    def forward(self, x, h, w):
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop, self.training)
        return x + drop_path(self.mlp(self.norm2(x), h, w), self.drop, self.training)


class PVTv2(nn.Module):
    """PVT-v2 encoder (Wang et al., 2022); the defaults are b5, AVS's second encoder. Parameter
    names follow the PVT release so its pvt_v2_b5.pth loads with --pretrained PATH."""

    def __init__(self, pretrained="none", dims=(64, 128, 320, 512), heads=(1, 2, 5, 8),
                 mlp_ratios=(4, 4, 4, 4), depths=(3, 6, 40, 3), sr_ratios=(8, 4, 2, 1),
                 drop_path_rate=0.1):
        super().__init__()
        drops = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        cin, k = 3, 0
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}",
                    PatchEmbed(cin, dims[i], 7 if i == 0 else 3, 4 if i == 0 else 2))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                PVTBlock(dims[i], heads[i], mlp_ratios[i], sr_ratios[i], drops[k + j])
                for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=1e-6))
            cin, k = dims[i], k + depths[i]
        self.apply(self._init)
        if pretrained != "none":
            load_state(self, pretrained, "--pretrained",
                       lambda k: k.replace("dwconv.dwconv", "dwconv"))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(m.bias)

    def forward(self, x):
        feats = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            feats.append(x)
        return feats


# ----------------------------------------------------------------------------- loss


def seg_loss(logits, target, binary, world=1):
    """First term of Eq. (1): BCE on the single logit (AVSBench-Objects) or CE over K classes (VPO,
    AVSS), averaged over the labelled pixels (255 ignored; S4 train frames 2-5 are all 255).
    `world` and global_mean: the global batch under DDP (next section)."""
    valid = target != 255
    if binary:
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).to(logits.dtype),
                                                  reduction="none")
    else:
        loss = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    return global_mean(loss, valid, world)


def avm_loss(logits, feats, audios, binary, frame_weight=None, world=1):
    """L_AVM, Eq. (2), as the released A_MaskedV_SimmLoss (avs_scripts/avs_ms3/loss.py) with the
    train.sh flags (kl, avg pooling, no feature normalisation), averaged over the TPAVI stages.

    logits (N, K, H, W); feats: stage maps (N, C, h, w); audios: aligned audio (B, T, C), N = B*T.
    Mask: binary sigmoid(avgpool(logits)); multi-class avgpool(argmax != background), no sigmoid,
    as avs_scripts/avss/loss.py (whose background is the last class; here class 0).
    Visual: mean over all h*w of relu(map) * mask; relu because the released decoder's in-place
    ReLU has already modified the stage maps when the loss reads them. KL(softmax(a) ||
    softmax(v)): F.kl_div(log q_v, p_a) as released, i.e. the audio is the target distribution.
    Reduction: sum over frames and channels (released MS3); with frame_weight (N,) a weighted mean
    over the frames (released AVSS: labelled frames only).
    """
    src = logits.float() if binary else (logits.argmax(1, keepdim=True) != 0).float()
    total = 0.0
    for v, a in zip(feats, audios):
        m = F.adaptive_avg_pool2d(src, v.shape[-2:])  # M_i at the stage size
        m = torch.sigmoid(m) if binary else m
        v = (F.relu(v.float()) * m).mean((2, 3))  # avg(M_i * Z_i)
        kl = F.kl_div(F.log_softmax(v, -1), F.log_softmax(a.float().flatten(0, 1), -1),
                      reduction="none", log_target=True).sum(-1)  # Eq. (2), A_i the target
        if frame_weight is None:
            total = total + global_sum(kl, world)
        else:
            total = total + global_mean(kl, frame_weight, world)
    return total / len(feats)


class Criterion:
    """Eq. (1) on one training batch: seg_loss + lambda * L_AVM over the TPAVI stages."""

    def __init__(self, args, binary, device, amp, world):
        self.lam, self.stages, self.binary = args.lambda_avm, sorted(args.tpavi_stages), binary
        self.avss, self.device, self.amp, self.world = args.data == "avss", device, amp, world

    def __call__(self, net, batch, epoch):
        """-> loss, dict(seg, avm)."""
        image, mask, wave, valid, audio_len = unpack(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, feats, audios = net(image, wave, valid, audio_len)
        target = mask.flatten(0, 1)
        loss_seg = seg_loss(logits.float(), target, self.binary, self.world)
        loss_avm = torch.zeros((), device=self.device)
        if self.lam > 0:
            weight = (target != 255).flatten(1).any(1).float() if self.avss else None
            loss_avm = avm_loss(logits, [feats[s] for s in self.stages],
                                [audios[s] for s in self.stages], self.binary, weight, self.world)
        return loss_seg + self.lam * loss_avm, dict(seg=loss_seg, avm=loss_avm)  # Eq. (1)


# --------------------------------------------------------------------------- global batch under DDP
# Each rank holds --batch-size / world clips. A rank's loss is its share of the global batch's loss
# times `world`: DDP averages the gradients over the ranks, which makes them the global loss's.


def global_count(x, world):
    """A count summed over the ranks, on the device (no wait): a global-batch mean's denominator."""
    if world > 1:
        x = x.float().clone()
        dist.all_reduce(x)
    return x.clamp(min=1)


def global_mean(values, weights, world):
    """sum(values * weights) / sum(weights) over the global batch: this rank's share x world."""
    return (values * weights).sum() * world / global_count(weights.sum(), world)


def global_sum(values, world):
    """A sum over the global batch: this rank's share, times world."""
    return values.sum() * world


def wrap_model(model, args, device, world, log_path):
    """The model for training -> (model, net): channels-last and TF32 on CUDA, --compile,
    SyncBatchNorm (CUDA) and DistributedDataParallel under torchrun."""
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.compile:
        model.encoder.compile()
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1 and log_path:
        log("note: SyncBatchNorm runs on CUDA only; on CPU each rank keeps its own BatchNorm "
            "statistics", log_path)
    device_ids = [device.index] if device.type == "cuda" else None
    return model, nn.parallel.DistributedDataParallel(
        model, device_ids, find_unused_parameters=not args.tpavi_stages) if world > 1 else model


def rank0_buffers(model, world):
    """Rank 0's buffers on every rank, so that an evaluation scores the weights rank 0 saves: on a
    CPU (no SyncBatchNorm) each rank's BatchNorm statistics follow its own shard; on CUDA
    SyncBatchNorm keeps them equal."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


# ----------------------------------------------------------------------- train / evaluate / predict


def unpack(batch, device):
    """Batch dict -> image (B, T, 3, H, W), mask (B, T, H, W), wave (B, C, N), valid (B, T) and
    audio_len (B,) (AVSBench; VPO: None)."""
    image, mask, wave = data.device_batch(batch, device)
    if image.dim() == 4:  # VPO: one frame per sample
        image, mask = image[:, None], mask[:, None]
    valid, audio_len = (batch[k].to(device) if k in batch else None for k in ("valid", "audio_len"))
    return image, mask, wave, valid, audio_len


def train_one_epoch(net, loader, optimizer, criterion, meter, epoch, iteration, args, log_path):
    """One pass over the loader (the rest of it after a resume inside the epoch), ending early at
    meter.total (--max-iters) -> the iteration count. Fixed crops: cuDNN may pick its fastest
    kernels."""
    net.train()
    torch.backends.cudnn.benchmark = True
    tick = time.time()
    for batch in loader:
        loss, parts = criterion(net, batch, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # AVS: constant lr
        iteration += 1
        now = time.time()
        meter.update(loss, parts, math.prod(batch["image"].shape[:-3]), now - tick, iteration)
        tick = now
        if iteration % args.log_every == 0 or iteration == meter.total:
            text = meter.line(epoch, args.epochs, iteration, optimizer.param_groups[0]["lr"])
            if log_path:
                log(text, log_path)
        if iteration >= meter.total:
            break
    return iteration


def to_labels(logits, binary):
    """Logits (N, K, H, W) -> label map (N, H, W): sigmoid > 0.5 (binary) or argmax."""
    return (logits[:, 0] > 0).long() if binary else logits.argmax(1)


def save_overlay(path, image, mask, pred, names):
    """One PNG: image | ground truth | prediction, titled, with a legend of the classes (`names`)
    in ground truth or prediction."""
    img, colors = data.to_uint8(image), data.class_colors(len(names))
    panels = [img, data.label_overlay(img, mask, colors), data.label_overlay(img, pred, colors)]
    data.save_panels(panels, ["image", "ground truth", "prediction"],
                     data.legend_for([mask, pred], names, colors), path)


@torch.no_grad()
def evaluate(model, loader, device, amp, binary, num_classes, overlay_dir=None, n_overlays=0,
             swap=False, names=None):
    """Dataset-level metrics over this rank's shard, summed over the ranks, and on VPO samples that
    carry silent twins the twin metrics (metrics.TwinMeter); overlays of the first n_overlays
    frames (legend: `names`), each written by the rank whose shard (a Subset of the split) holds it:
    frame j of sample g when g x (frames per sample) + j < n_overlays. swap: left and right audio
    channels exchanged."""
    model.eval()
    torch.backends.cudnn.benchmark = False  # test images of every size: no per-shape search
    cm = metrics.ConfusionMatrix(2 if binary else num_classes, device)
    meter = metrics.AVSObjectsMeter(device) if binary else None
    twins = metrics.TwinMeter(num_classes, device)
    index, seen = loader.dataset.indices, 0
    for batch in loader:
        image, mask, wave, valid, audio_len = unpack(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(image, wave.flip(1) if swap else wave, valid, audio_len)[0].float()
        target = mask.flatten(0, 1)
        pred = to_labels(logits, binary)
        cm.update(pred, target)
        if binary:
            meter.update(torch.sigmoid(logits[:, 0]), target)  # AVS M_J / M_F
        if "twin" in batch:
            twins.update(pred, target, batch["twin"].to(device))
        t = image.shape[1]
        for i, name in enumerate(batch["name"]):
            for j in range(t):
                if index[seen + i] * t + j < n_overlays and (valid is None or valid[i, j]):
                    os.makedirs(overlay_dir, exist_ok=True)
                    stem = str(name).replace(os.sep, "_") + (f"_{j}" if t > 1 else "")
                    save_overlay(os.path.join(overlay_dir, f"{stem}.png"), image[i, j], mask[i, j],
                                 pred[i * t + j], names)
        seen += len(batch["name"])
    cm.all_reduce()
    twins.all_reduce()
    res = dict(cm.compute(), **twins.compute())
    if binary:
        meter.all_reduce()
        res.update(meter.compute())
    model.train()
    return res


def run_eval(model, loaders, split, weights, device, amp, args, log_path):
    """Metrics of one split (test: overlays and, with stereo twins, the twin metrics with left and
    right swapped), logged on rank 0 -> dict(split, weights, metrics)."""
    spec = DATASETS[args.data]
    binary, num_classes = spec["classes"] == 1, spec["classes"]
    n_overlays = args.overlays if split == "test" else 0
    names = class_names(args.data)
    res = evaluate(model, loaders[split], device, amp, binary, num_classes,
                   os.path.join(args.out, "overlays"), n_overlays, names=names)
    if split == "test" and "swap" in loaders:
        swapped = evaluate(model, loaders["swap"], device, amp, binary, num_classes, swap=True)
        res.update({f"{key}_swap": swapped[key] for key in metrics.TWIN_KEYS})
    if log_path:
        log(f"eval {split} ({weights} weights):\n{metrics.format_table(names, res)}", log_path)
        if binary:
            log(f"M_J {res['mj']:.4f} | M_F {res['mf']:.4f}", log_path)
        if res["twin_images"]:
            log(metrics.format_twins(res), log_path)
    return dict(split=split, weights=weights, **res)


def read_frames(path, max_size):
    """--predict input: a folder of frames (image files in natural name order, one size) or one
    image -> (paths, uint8 (T, 3, h, w) with a long side of at most max_size, display
    (h', w', 3) uint8 per frame, the frames' (H, W)) as data.read_rgb."""
    if os.path.isdir(path):
        exts = Image.registered_extensions()
        paths = sorted((os.path.join(path, n) for n in os.listdir(path)
                        if os.path.splitext(n)[1].lower() in exts),
                       key=lambda p: [int(t) if t.isdigit() else t
                                      for t in re.split(r"(\d+)", os.path.basename(p))])
        if not paths:
            raise data.DataError(f"{path}: no image files in the folder given to --predict")
    else:
        paths = [path]
    frames = [data.read_rgb(p, max_size) for p in paths]
    sizes = {f[2] for f in frames}
    if len(sizes) > 1:
        raise data.DataError(f"{path}: frames differ in size "
                             f"({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}); "
                             "resize them to one size")
    return paths, torch.stack([f[0] for f in frames]), [f[1] for f in frames], frames[0][2]


@torch.no_grad()
def predict(args):
    """--predict: the frames of one clip (or one image, any size) and one WAV through the --ckpt
    model, the frames scaled to a long side of at most --max-size -> OUT/<frame stem>.png (image |
    prediction, legend) per frame and OUT/<stem>.json (predicted classes and their pixel shares at
    the frames' size per frame, the inputs); returns the JSON's content."""
    ckpt = load_checkpoint(args.ckpt)
    use_checkpoint_args(args, ckpt)
    trained_on = ckpt["args"]["data"]
    spec, names = DATASETS[trained_on], class_names(trained_on)
    device = init_distributed(args)[0]
    amp = not args.no_amp and native_bf16(device)
    max_size = args.max_size or ckpt["args"]["crop"]  # the scale the model was trained at
    paths, image, rgbs, size = read_frames(args.predict, max_size)
    t = len(paths)
    # the datasets' audio: a single image on a VPO model gets VPO's 3 s from the middle (T = 1),
    # a clip 1 s per frame from the start (AVSBench)
    vpo_image = spec["kind"] == "vpo" and not os.path.isdir(args.predict)
    wave, note = data.load_predict_audio(args.audio, stereo=not args.mono, audio_pos=args.audio_pos,
                                         seconds=3.0 if vpo_image else t, centre=vpo_image)
    if note:
        print(f"note: {note}")
    if ckpt.get("release"):
        print(f"note: {ckpt['release']}")
    model = make_model(args, ckpt, trained_on).to(device).eval()
    del ckpt  # the optimiser state is not needed: freed before the photo-sized maps
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(data.normalize(image[None].to(device)),
                       wave[None].to(device))[0].float().cpu()
    colors = data.class_colors(len(names))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "predict")
    os.makedirs(out, exist_ok=True)
    frames = []
    for path, rgb, frame_logits in zip(paths, rgbs, logits):
        pred = data.upsample_labels(frame_logits, size)  # bilinear on the logits
        png = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + ".png")
        shown = data.label_overlay(rgb, data.shown_labels(pred, rgb.shape[:2]), colors)
        data.save_panels([rgb, shown], ["image", "prediction"],
                         data.legend_for([pred], names, colors), png)
        print(f"wrote {png}")
        shares = data.class_shares(pred, names)
        frames.append(dict(image=path, png=png, classes=list(shares), shares=shares,
                           background=(pred == 0).float().mean().item()))
    res = dict(input=args.predict, audio=args.audio, audio_pos=args.audio_pos, audio_note=note,
               checkpoint=args.ckpt, data=trained_on, height=size[0], width=size[1],
               max_size=max_size, model_size=list(image.shape[-2:]), frames=frames)
    name = os.path.splitext(os.path.basename(os.path.normpath(args.predict)))[0]
    write_json(os.path.join(out, name + ".json"), res)
    print(f"wrote {os.path.join(out, name + '.json')}")
    return res


# ----------------------------------------------------------------------------- main


def main(args):
    given = set(vars(args).pop("given", ()))
    if args.predict:
        return predict(args)
    device, rank, world = init_distributed(args)
    main_rank, amp = rank == 0, not args.no_amp and native_bf16(device)
    ckpt = load_checkpoint(args.resume or args.ckpt) if args.resume or args.eval_only else None
    if ckpt:
        given |= use_checkpoint_args(args, ckpt)
        if DATASETS[ckpt["args"]["data"]]["classes"] != DATASETS[args.data]["classes"]:
            raise data.DataError(f"{args.resume or args.ckpt} was trained on --data "
                                 f"{ckpt['args']['data']}, whose classes differ from --data "
                                 f"{args.data}")
    resolve_defaults(args, given)
    if args.resume:
        check_resume_args(args, ckpt)
    spec = DATASETS[args.data]
    binary, num_classes = spec["classes"] == 1, spec["classes"]
    args.out = run_folder(args, world)
    seed_all(rank_seed(args.seed, rank))

    # AVSBench: selected on val, best.pt tested at the end; VPO has no val split (its "val" = test)
    val_split = "val" if spec["kind"] == "avs" else "test"
    sets, train_loader, eval_loaders = build_data(args, spec, val_split, rank, world, device)
    log_path = os.path.join(args.out, "log.txt") if main_rank else None
    if main_rank:
        os.makedirs(os.path.join(args.out, "overlays"), exist_ok=True)
        log_settings(args, num_classes, sets, world, device, amp, log_path)

    model = make_model(args, ckpt, args.data).to(device)
    if log_path and ckpt and ckpt.get("release"):
        log(ckpt["release"], log_path)
    if args.eval_only:
        return run_eval_only(model, eval_loaders, device, amp, args, log_path)

    model, net = wrap_model(model, args, device, world, log_path)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise data.DataError(f"{args.data} train split has {len(sets['train'])} samples, fewer "
                             f"than --batch-size {args.batch_size}: lower --batch-size or --limit")
    total = min(args.max_iters or math.inf, args.epochs * iters_per_epoch)
    optimizer = make_optimizer(model, args)
    criterion = Criterion(args, binary, device, amp, world)
    # model selection as the released train.py: M_J (S4 / MS3), mIoU (AVSS)
    run = dict(iteration=0, epoch=0, best=-math.inf, metric="mj" if binary else "miou", history=[])
    if ckpt:
        run = resume_run(ckpt, args.resume, optimizer, run, rank, world, log_path)
    meter = Meter(run["iteration"], total, world, ckpt.get("elapsed_s", 0.0) if ckpt else 0.0)
    res = run["history"][-1] if run["history"] else None  # a finished run keeps its final metrics
    for epoch in range(run["iteration"] // iters_per_epoch, args.epochs):
        if run["iteration"] >= total:
            break
        skip = (run["iteration"] - epoch * iters_per_epoch) * (args.batch_size // world)
        train_loader.sampler.set_epoch(epoch, skip)  # skip: a resume inside the epoch
        run["iteration"] = train_one_epoch(net, train_loader, optimizer, criterion, meter, epoch,
                                           run["iteration"], args, log_path)
        run["epoch"] = run["iteration"] // iters_per_epoch
        stop = run["iteration"] >= total
        extra = {}  # the optimiser is all of the training state
        if stop or (epoch + 1) % args.eval_every == 0:
            res = validate(model, eval_loaders, val_split, run, epoch, device, amp, world, args,
                           log_path)
            if res[run["metric"]] > run["best"]:
                run["best"] = res[run["metric"]]
                save_checkpoint(main_rank and os.path.join(args.out, "best.pt"), model, optimizer,
                                run, meter, args, extra, world)
            write_metrics(main_rank, args, run, val_split, res if val_split == "test" else None,
                          meter)
        if stop or (epoch + 1) % args.save_every == 0:
            save_checkpoint(main_rank and os.path.join(args.out, "last.pt"), model, optimizer, run,
                            meter, args, extra, world)
        if stop:
            break
    if world > 1:
        dist.barrier()  # best.pt is written by rank 0
    if val_split != "test" and os.path.isfile(os.path.join(args.out, "best.pt")):
        model.load_state_dict(load_checkpoint(os.path.join(args.out, "best.pt"))["model"])
        res = run_eval(model, eval_loaders, "test", "best", device, amp, args, log_path)
    write_metrics(main_rank, args, run, val_split, res, meter)
    if main_rank:
        log(f"done in {meter.elapsed():.0f} s; best {run['metric']} {run['best']:.4f}; "
            f"run folder {args.out}", log_path)
    return res


def make_model(args, ckpt, dataset):
    """AVSModel of the flags for `dataset`; with a checkpoint, its weights loaded strictly (a
    released model's file lacks its frozen VGGish: that comes from --vggish-weights)."""
    release = bool(ckpt and ckpt.get("release"))
    model = AVSModel(args.backbone, "none" if ckpt else args.pretrained,
                     DATASETS[dataset]["classes"], args.tpavi_stages, args.audio_encoder,
                     1 if args.mono else 2, args.vggish_weights if release or not ckpt else None,
                     tpavi_window=args.tpavi_window,
                     vggish_pad="zero" if dataset == "avss" else "repeat")
    if ckpt:
        vggish = {k: v for k, v in model.state_dict().items() if release and k.startswith("audio.")}
        model.load_state_dict({**vggish, **ckpt["model"]})
    return model


def build_data(args, spec, val_split, rank, world, device):
    """The datasets (--eval-only: test, with --eval-audio's audio) and their loaders."""
    sets = build_datasets(args, spec, ["test"] if args.eval_only else
                          sorted({"train", val_split, "test"}))
    twin_idx = []
    if spec["kind"] == "vpo" and args.eval_audio == "real" and \
            data.attach_twins(sets["test"], args.coco_ann):
        twin_idx = sorted(sets["test"].twins)  # VPO-MSMI: images whose sounding object has twins
    if args.eval_only:
        sets["test"] = data.eval_audio_set(sets["test"], args.eval_audio, args.coco_ann, args.seed)
    return (sets, *build_loaders(args, sets, twin_idx, rank, world, device))


def validate(model, loaders, split, run, epoch, device, amp, world, args, log_path):
    """The evaluation after an epoch (of rank 0's weights), added to run["history"] and logged
    -> its metrics."""
    start = time.time()
    rank0_buffers(model, world)
    res = run_eval(model, loaders, split, "last", device, amp, args, log_path)
    run["history"].append(dict(epoch=epoch + 1, iteration=run["iteration"], **res))
    if log_path:
        log(f"eval ep {epoch + 1}: mIoU {100 * res['miou']:.2f} F-beta "
            f"{100 * res['mean_fbeta']:.2f} FDR {100 * res['mean_fdr']:.2f} "
            f"({time.time() - start:.1f} s)", log_path)
    return res


def log_settings(args, num_classes, sets, world, device, amp, log_path):
    """The run's first log lines: the model and data settings, the samples per split."""
    log(f"tpavi: {args.data} (K={num_classes}{', binary' if num_classes == 1 else ''}) | "
        f"{args.backbone} pretrained={args.pretrained} | TPAVI stages {args.tpavi_stages} | audio "
        f"{args.audio_encoder} {'mono' if args.mono else 'stereo'} | lambda_avm {args.lambda_avm} "
        f"| crop {args.crop} | {world} rank(s) on {device} | bf16 {amp}"
        f"{' | built-in VPO: CPU defaults' if args.builtin else ''}", log_path)
    log(f"samples: {', '.join(f'{s} {len(d)}' for s, d in sets.items())}; run folder {args.out}",
        log_path)


def run_eval_only(model, loaders, device, amp, args, log_path):
    """--eval-only: the test split -> OUT/eval-<audio>.json (real / silence / absent), never the
    training run's metrics.json."""
    res = run_eval(model, loaders, "test", args.ckpt, device, amp, args, log_path)
    if log_path:
        if args.eval_audio != "real":
            log(f"{args.eval_audio} audio: {100 * res['fg_pred']:.2f}% of the pixels segmented as "
                "a sounding object (false detections; 0 is right)", log_path)
        write_json(os.path.join(args.out, f"eval-{args.eval_audio}.json"),
                   dict(args=vars(args), eval=res))
    return res


def make_optimizer(model, args):
    """Adam, constant lr (AVS: 1e-4), over the trained parameters (a VGGish encoder is frozen)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)


def resume_run(ckpt, path, optimizer, run, rank, world, log_path):
    """--resume: the checkpoint's optimiser and RNG states -> its run state (iteration, epoch,
    best, metric, history)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if len(ckpt["rng"]) == world:  # per-rank RNG states; another world size keeps fresh seeds
        set_rng_state(ckpt["rng"][rank])
    if log_path:
        log(f"resumed from {path} at epoch {ckpt['epoch']}, iteration {ckpt['iteration']}",
            log_path)
    return {key: ckpt[key] for key in run}


# ----------------------------------------------------------------------------- plumbing


def exit_on_error(e):
    """A DataError ends the run with its one line on stderr (exit 2), also written to torchrun's
    error file so that torchrun's failure report quotes it. A collective broken because another
    rank ended first waits for torchrun to stop this rank, without a traceback of its own, so the
    report names the rank that failed. Anything else is a bug: its traceback."""
    if isinstance(e, data.DataError):
        print(f"error: {e}", file=sys.stderr)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            info = dict(py_callstack=f"error: {e}", timestamp=str(int(time.time())))
            write_json(os.environ["TORCHELASTIC_ERROR_FILE"],
                       dict(message=dict(message=f"error: {e}", extraInfo=info)))
        sys.exit(2)
    if dist.is_initialized() and (isinstance(e, dist.DistError) or "by peer" in str(e)):
        time.sleep(60)
        print(f"error: rank {dist.get_rank()}: {str(e).splitlines()[0]} (did another rank fail?)",
              file=sys.stderr)
        sys.exit(1)
    raise e


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
    """Atomic JSON write; NaN (an undefined metric, e.g. FDR of a never-predicted class) -> null."""
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
    """Python, numpy, torch (and CUDA) RNG states as plain containers and tensors (weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=pos,
                           has_gauss=has_gauss, gauss=gauss),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def native_bf16(device):
    """bf16 autocast pays on CUDA and on CPUs with bf16 instructions; elsewhere it is emulated,
    ~20x slower."""
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
    if args.batch_size % world and not args.eval_only:  # a training batch; tests shard exactly
        raise data.DataError(f"--batch-size {args.batch_size} is the global batch and does not "
                             f"split over the {world} ranks: give a multiple of {world}, or start "
                             "fewer processes")
    return device, rank, world


def run_folder(args, world):
    """--out; else the checkpoint's folder with --resume; else runs/tpavi-<data>-s<seed>-<time>,
    rank 0's on every rank."""
    if args.out is not None:
        if not (args.resume or args.eval_only or args.overwrite):
            data.check_new_run(args.out)
        return args.out
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    holder = [os.path.join("runs", f"tpavi-{args.data}-s{args.seed}-{stamp}")]
    if world > 1:
        dist.broadcast_object_list(holder)
    return holder[0]


def write_metrics(main_rank, args, run, split, final, meter):
    """metrics.json (rank 0): settings, every evaluation, the best one on `split`, the final one,
    the wall time and the training images/s."""
    if main_rank:
        scored = [h for h in run["history"] if h["split"] == split]
        best = max(scored, key=lambda h: h[run["metric"]]) if scored else None
        write_json(os.path.join(args.out, "metrics.json"), dict(
            args=vars(args), history=run["history"], final=final,
            best=best and dict(best, metric=run["metric"], score=best[run["metric"]]),
            wall_time_s=round(meter.elapsed(), 1), train_images_per_s=meter.images_per_s()))


def rank_seed(seed, rank):
    """One seed per (--seed, rank): every rank, and each of its loader workers, draws its own
    augmentation."""
    return seed * 1000003 + rank


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(args, spec, splits):
    """split name -> dataset; DataError / ValueError of data.py become one-line errors."""
    out = {}
    for split in splits:
        try:
            if spec["kind"] == "vpo":
                out[split] = data.VPODataset(
                    args.data_root, spec["subset"], split, audio_root=args.audio_root,
                    stereo=not args.mono, train=split == "train", crop=args.crop,
                    limit=args.limit, pan=args.pan)
            else:
                out[split] = data.AVSBenchDataset(args.data_root, spec["subset"], split,
                                                  size=args.crop, stereo=not args.mono,
                                                  limit=args.limit)
        except ValueError as e:
            raise data.DataError(str(e)) from e
    return out


class EpochSampler(torch.utils.data.DistributedSampler):
    """This rank's share of a permutation seeded from (seed, epoch); set_epoch's `skip` leaves out
    the samples a resumed run has already trained on in that epoch, so the loader is built once,
    and set_epoch seeds `generator`, the loader's, from which each epoch's workers take their seeds:
    their augmentation draws depend on the (seed, rank, epoch), not on the process's history."""
    skip, generator, worker_seed = 0, None, 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip
        if self.generator is not None:  # the epoch's new workers: seeds from (rank seed, epoch)
            self.generator.manual_seed(self.worker_seed * 100003 + epoch)

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def build_loaders(args, sets, twin_idx, rank, world, device):
    """The loaders, built once: train (EpochSampler, --batch-size split over the ranks,
    incomplete batches dropped; workers started per epoch) and one per evaluation split (exact
    shards, persistent workers; 'swap': the twins of the test split). Every loader has its own
    generator, seeded per rank (train: per rank and epoch), so loading never draws from the
    training RNG and each rank's workers draw their own augmentation. --resume from an epoch's end
    draws as the run would have; from inside an epoch (--max-iters) the rest of that epoch repeats
    the worker draws of its first batches (on other samples); --workers 0 resumes bit-exactly (the
    global RNG is checkpointed)."""
    def loader(dataset, batch_size, sampler=None):
        return torch.utils.data.DataLoader(
            dataset, batch_size, sampler=sampler, num_workers=args.workers,
            collate_fn=data.pad_collate, pin_memory=device.type == "cuda",
            worker_init_fn=data.worker_init, drop_last=sampler is not None,
            persistent_workers=args.workers > 0 and sampler is None,
            generator=torch.Generator().manual_seed(rank_seed(args.seed, rank)))
    evals = {split: loader(torch.utils.data.Subset(ds, range(rank, len(ds), world)),
                           args.eval_batch_size) for split, ds in sets.items() if split != "train"}
    if twin_idx and not args.mono:  # the twin metrics once more with the stereo cue reversed
        evals["swap"] = loader(torch.utils.data.Subset(sets["test"], twin_idx[rank::world]),
                               args.eval_batch_size)
    if "train" not in sets:
        return None, evals
    # (seed, epoch) -> seed * 100003 + epoch: no two seeds share an epoch's order
    sampler = EpochSampler(sets["train"], world, rank, shuffle=True, seed=args.seed * 100003,
                           drop_last=True)
    train = loader(sets["train"], args.batch_size // world, sampler)
    sampler.generator, sampler.worker_seed = train.generator, rank_seed(args.seed, rank)
    return train, evals


# the architecture flags, taken from a checkpoint (one without tpavi_window: the whole clip, 0)
CKPT_KEYS = ("backbone", "pretrained", "tpavi_stages", "tpavi_window", "audio_encoder", "mono")
# the branches of the released AVSBench models that their forward never uses
RELEASE_UNUSED = ("resnet.layer3_2.", "resnet.layer4_2.", "path4.resConfUnit1.")


def from_release(state_dict):
    """A state dict of the authors' released AVSBench models (OpenNLPLab/AVSBench: S4 / MS3 /
    AVSS, ResNet-50 or PVT-v2-b5; a `module.` prefix stripped) -> AVSModel's state dict, every
    tensor but the frozen VGGish's (audio.*), which the release keeps in vggish-10086976.pth.
    The release's names and shapes: resnet.* (layer3_1 / layer4_1 the used branch) ->
    encoder.net.*; encoder_backbone.* -> encoder.*; conv{i}.conv2d_list.{j} -> aspp.{i-1}.convs.{j};
    tpavi_b{i}.{align_channel, norm_layer, theta, phi, g, W_z} -> tpavi.{i-1}.{align, norm, theta,
    phi, g, w_z} with the 1x1x1 Conv3d kernels as 1x1 Conv2d / Linear (AVSS's bias-free
    align_channel: bias 0); path{i}.resConfUnit{u} -> fuse.{i-1}.rcu{u}; output_conv.{0,2,4} ->
    head1, head2.0, head2.2. RELEASE_UNUSED is dropped; any other name is a DataError."""
    renames = [
        (r"resnet\.layer([34])_1\.", r"encoder.net.layer\1."),
        (r"resnet\.", "encoder.net."),
        (r"encoder_backbone\.(.*)\.dwconv\.dwconv\.", r"encoder.\1.dwconv."),
        (r"encoder_backbone\.", "encoder."),
        (r"conv([1-4])\.conv2d_list\.([0-3])\.", lambda m: f"aspp.{int(m[1]) - 1}.convs.{m[2]}."),
        (r"tpavi_b([1-4])\.(align|norm|W_z|theta|phi|g)(_channel|_layer)?\.",
         lambda m: f"tpavi.{int(m[1]) - 1}.{m[2].lower()}."),
        (r"path([1-4])\.resConfUnit([12])\.", lambda m: f"fuse.{int(m[1]) - 1}.rcu{m[2]}."),
        (r"output_conv\.([024])\.", lambda m: ("head1.", "head2.0.", "head2.2.")[int(m[1]) // 2]),
    ]
    out, unknown = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(RELEASE_UNUSED):
            continue
        for pattern, repl in renames:
            name, hits = re.subn(f"^{pattern}", repl, key)
            if hits:
                break
        else:
            unknown.append(key)
            continue
        if re.fullmatch(r"tpavi\.\d\.(theta|g|w_z\.0)\.weight", name):
            value = value.flatten(-2)  # (O, I, 1, 1, 1) -> (O, I, 1, 1)
        elif re.fullmatch(r"tpavi\.\d\.phi\.weight", name):
            value = value.flatten(1)  # (O, I, 1, 1, 1) -> (O, I)
        out[name] = value
    if unknown:
        raise data.DataError(f"{len(unknown)} tensor(s) of the released AVSBench layout with no "
                             f"counterpart in tpavi.py's model, e.g. {unknown[0]}")
    for name in [k for k in out if k.endswith(".align.weight")]:
        out.setdefault(name.removesuffix("weight") + "bias", out[name].new_zeros(len(out[name])))
    return out


def read_torch(path, missing, unreadable):
    """torch.load of a file of tensors and plain containers (weights_only=True), or a one-line
    DataError: `missing` when there is no such file, unreadable(exception type) otherwise."""
    if not os.path.isfile(path):
        raise data.DataError(missing)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise data.DataError(unreadable(type(e).__name__)) from None


def load_checkpoint(path):
    """A last.pt / best.pt of this script (plain containers, read with weights_only=True), or a
    released AVSBench state dict (from_release; architecture from its names and shapes); anything
    else, a missing file included, is a one-line DataError naming the file."""
    ckpt = read_torch(path, f"{path}: checkpoint not found",
                      lambda err: f"{path}: not a readable checkpoint ({err}); pass a "
                                  "last.pt/best.pt written by tpavi.py")
    if isinstance(ckpt, dict) and any(re.match(r"(module\.)?(tpavi_b\d|output_conv)\.", str(k))
                                      for k in ckpt):
        try:
            model = from_release(ckpt)
        except data.DataError as e:
            raise data.DataError(f"{path}: {e}") from None
        classes = len(model["head2.2.weight"])
        args = dict(data="avss" if classes == data.AVSS_NUM_CLASSES else "avsbench_s4",  # or MS3
                    crop=224, pretrained="none", tpavi_window=5, audio_encoder="vggish", mono=True,
                    backbone="pvt_v2_b5" if "encoder.norm4.weight" in model else "resnet50",
                    tpavi_stages=sorted({int(k.split(".")[1]) for k in model if k[:6] == "tpavi."}))
        unused = [p for p in RELEASE_UNUSED if any(k.removeprefix("module.").startswith(p)
                                                   for k in ckpt)]
        note = (f"{path}: a released AVSBench model ({args['backbone']}, {classes} class(es)); "
                f"dropped its unused {', '.join(p + '*' for p in unused) or 'nothing'}")
        return dict(script="tpavi", release=note, args=args, model=model)
    if not isinstance(ckpt, dict) or ckpt.get("script") != "tpavi":
        by = (f" (written by {ckpt['script']}.py)" if isinstance(ckpt, dict) and "script" in ckpt
              else "")
        raise data.DataError(f"{path}: not a tpavi.py checkpoint{by}; pass a last.pt/best.pt "
                             "written by tpavi.py")
    if any(k.startswith("audio.mel.") for k in ckpt["model"]):
        raise data.DataError(f"{path}: its VGGish was trained on a log-mel front end other than "
                             "VGGish's own (an older tpavi.py); train the model again")
    return ckpt


def use_checkpoint_args(args, ckpt):
    """The architecture flags come from the checkpoint -> their names."""
    if ckpt.get("release") and (args.resume or args.vggish_weights is None):
        raise data.DataError(f"{args.resume or args.ckpt}: a released AVSBench model is for "
                             "--eval-only or --predict with --audio-encoder vggish "
                             "--vggish-weights PATH (vggish-10086976.pth, its frozen VGGish)")
    saved = {"tpavi_window": 0, **ckpt["args"]}
    for key in CKPT_KEYS:
        setattr(args, key, saved[key])
    return set(CKPT_KEYS)


# run control and paths: they may differ on --resume
RESUME_FREE = ("out", "resume", "ckpt", "eval_only", "predict", "audio", "audio_pos", "max_size",
               "workers", "log_every", "eval_every", "save_every", "eval_batch_size", "overlays",
               "max_iters", "device", "no_amp", "compile", "data_root", "audio_root", "coco_ann",
               "pretrained", "vggish_weights", "eval_audio", "overwrite")


def check_resume_args(args, ckpt):
    """--resume continues the run that wrote the checkpoint: a method or data flag that differs
    from the run's (a changed default included) is a one-line DataError, not a silently different
    run."""
    changed = [k for k, v in ckpt["args"].items()
               if k not in RESUME_FREE and getattr(args, k, v) != v]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {ckpt['args'][k]} (now {getattr(args, k)})"
                          for k in changed)
        raise data.DataError(f"{args.resume} was trained with {flags}: pass the run's flags (the "
                             "first line of its log.txt) or start a new run")


def save_checkpoint(path, model, optimizer, run, meter, args, extra, world):
    """Called on every rank (it gathers the per-rank RNG states); rank 0 passes the path and writes
    the model, optimiser, `run` (iteration, epoch, best, metric, history), the wall time so far
    (`meter`) and the method's `extra` state."""
    rngs = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(rngs, rngs[0])
    if path:
        save_atomic(dict(script="tpavi", args=vars(args), model=model.state_dict(),
                         optimizer=optimizer.state_dict(), rng=rngs, extra=extra,
                         elapsed_s=meter.elapsed(), **run), path)


class Meter:
    """Loss parts summed on the device between log lines and read back (averaged over the ranks)
    only by line(), which every rank calls; images/s over training time only, the first step
    (warm-up) left out; ETA from the wall time since the start, evaluations included."""

    def __init__(self, iteration, total, world, elapsed):
        self.t0, self.start, self.total = time.time(), iteration, total
        self.world, self.before = world, elapsed
        self.sums, self.n, self.names, self.train_s, self.images = None, 0, [], 0.0, 0
        self.window_s, self.window_images = 0.0, 0

    def update(self, loss, parts, images, seconds, iteration):
        values = torch.stack([loss.detach().float()] + [v.detach().float() for v in parts.values()])
        self.sums = values if self.sums is None else self.sums + values
        self.n, self.names = self.n + 1, list(parts)
        self.window_s += seconds
        self.window_images += images * self.world
        if iteration > self.start + 1:
            self.train_s, self.images = self.train_s + seconds, self.images + images * self.world

    def line(self, epoch, epochs, iteration, lr):
        if self.world > 1:  # each rank's loss is its share times the world size: the mean is global
            dist.all_reduce(self.sums)
            self.sums /= self.world
        loss, *values = (self.sums / self.n).tolist()  # the one read-back from the device per line
        parts = " ".join(f"{k} {v:.4f}" for k, v in zip(self.names, values))
        eta = (time.time() - self.t0) / (iteration - self.start) * (self.total - iteration)
        text = (f"ep {epoch + 1}/{epochs} it {iteration}/{self.total} loss {loss:.4f} ({parts}) "
                f"lr {lr:.2e} {self.window_images / max(self.window_s, 1e-9):.1f} img/s "
                f"eta {eta // 3600:.0f}:{eta % 3600 // 60:02.0f}:{eta % 60:02.0f}")
        self.sums, self.n, self.window_s, self.window_images = None, 0, 0.0, 0
        return text

    def elapsed(self):
        """Wall time of the run: this process's and, after --resume, the earlier processes' (from
        the checkpoint)."""
        return self.before + time.time() - self.t0

    def images_per_s(self):
        return round(self.images / max(self.train_s, 1e-9), 2)


if __name__ == "__main__":
    cli_args = parse_args()
    try:
        main(cli_args)
    except Exception as e:
        exit_on_error(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
