"""CAVP: audio-visual segmentation with contrastive audio-visual pairing, in one file.

Chen et al., "Unraveling Instance Associations: A Closer Look for Audio-Visual Segmentation",
CVPR 2024, https://arxiv.org/abs/2304.02970; released code: github.com/cyh-0/CAVP. Equation,
section and table numbers are the paper's; where the released code departs from the paper, this
file follows the paper and says so.

    python vpo_make.py --synthetic --out data                       # the built-in VPO (CPU-sized)
    python cavp.py --data vpo_msmi --epochs 80                      # train, then test
    python cavp.py --eval-only --ckpt runs/<run>/best.pt [--eval-audio silence]
    torchrun --nproc_per_node=8 cavp.py --data vpo_msmi --data-root /path/to/VPO
    python cavp.py --data avsbench_s4 --data-root /path/to/AVSBench # Tables 1-2; avss: Table 3
    python cavp.py --predict photo.jpg --audio sound.wav --ckpt runs/<run>/best.pt
"""
import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import metrics

# ----------------------------------------------------------------------------- arguments

# --data -> reader and task; AVSBench: the frame size of the paper's protocol (Sec. 5.1: 224 x 224
# for Tables 1-2, original resolution (0) for AVSBench-Semantics in Tables 3 and 5) and whether it
# is tested with binary labels (AVSBench-Objects, Tables 1-2)
DATASETS = {
    "vpo_ss": dict(kind="vpo", task="ss", binary=False),
    "vpo_ms": dict(kind="vpo", task="ms", binary=False),
    "vpo_msmi": dict(kind="vpo", task="msmi", binary=False),
    "avsbench_s4": dict(kind="avs", task="s4", resize=224, binary=True),
    "avsbench_ms3": dict(kind="avs", task="ms3", resize=224, binary=True),
    "avss": dict(kind="avs", task="avss", resize=0, binary=False),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad flags: one line on stderr, exit code 2."""
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def parse_args(argv=None):
    """The flags; the defaults are the paper's (App. B.1). args.given: the flags on the command
    line, which resolve_defaults keeps."""
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data").add_argument
    g("--data", default="vpo_msmi", choices=list(DATASETS),
      help="VPO subset (Sec. 3), AVSBench-Objects S4 / MS3 (Tables 1-2) or AVSBench-Semantics")
    g("--data-root", default="data",
      help="folder with VPO-SS/, VPO-MS/, VPO-MSMI/ (VPO) or Single-source/, Multi-sources/, "
           "AVSBench-semantic/ (AVSBench)")
    g("--audio-root", default=None, help="VPO: folder of the .wav clips (default: DATA_ROOT/audio)")
    g("--mono", dest="mono", action="store_true", default=None,
      help="average the audio channels (Fig. 7, Table 8); the default on AVSBench (mono clips)")
    g("--stereo", dest="mono", action="store_false",
      help="stereo audio, the default on VPO (AVSBench: a WAV's first two channels)")
    g("--resize", type=int, default=None,
      help="AVSBench frame size, 0 = original (default: 224 for S4 / MS3, Tables 1-2; avss: 0)")
    g("--pan", default="csv", choices=["csv", "crop"],
      help="VPO: pan a source at the CSV audio_pos, mirrored on flips (csv, as cyh-0/CAVP), or at "
           "its object's centre after flip, scale and crop (crop)")
    g("--crop", type=int, default=512,
      help="training crop (App. B.1: %(default)s; AVSBench resized: the frame size; built-in VPO: "
           "its image size)")
    g("--s4-labels", default=None, choices=["category", "binary"],
      help="avsbench_s4 training classes: the CSV category (default; other categories are "
           "negatives in Eq. (1)-(3)) or binary (as cyh-0/CAVP); tested binary either way")
    g("--avss-part", default="all", choices=list(data.AVSS_PARTS),
      help="avss: test on part v1s or v1m only (Table 3's SS / MS columns) or v2; trains on all")
    g("--limit", type=int, default=None, help="use only the first N samples of each split")
    g("--workers", type=int, default=4,
      help="loader processes per rank (%(default)s feed a GPU at crop 512, benchmarks/loader.py; "
           "built-in VPO: 0)")

    g = p.add_argument_group("model").add_argument
    g("--backbone", default="resnet50", choices=["resnet50", "resnet18"],
      help="DeepLabV3+ encoder (App. B.1: %(default)s; built-in VPO: resnet18)")
    g("--pretrained", default="imagenet",
      help="imagenet (torchvision), none, or a .pth state dict (%(default)s; built-in VPO: none)")
    g("--output-stride", type=int, default=8, choices=[8, 16],
      help="DeepLabV3+ output stride (%(default)s; built-in VPO: 16)")
    g("--fusion", default="ca", choices=["ca", "tpavi"],
      help="f_CA with visual query (Sec. 4.1) or TPAVI-like audio-query fusion (Table 5 row 1)")
    g("--attn", default="sigmoid", choices=["sigmoid", "softmax", "minmax"],
      help="f_CA attention activation (Sec. 4.1, Fig. 6)")
    g("--heads", type=int, default=4, help="f_CA attention heads (%(default)s)")
    g("--pos-enc", default="none", choices=["none", "sine"],
      help="f_CA query position code: none (the paper) or 2-D sine (ref. [55]); docs/RESULTS.md")
    g("--clip-ms", type=int, default=3000,
      help="ms of audio at the centre of the 3 s crop that the log-mel reads (App. B.1: "
           "%(default)s; built-in VPO: 1500)")
    g("--mel-hop", type=int, default=10,
      help="log-mel hop in ms: CLIP_MS / HOP frames (App. B.1: %(default)s, 300 frames)")
    g("--mel-bands", type=int, default=64,
      help="log-mel bands, 125-3800 Hz (App. B.1: %(default)s)")
    g("--audio-conv1", default="split", choices=["split", "mean"],
      help="stereo audio conv1 at init: an L + R filter and a fresh L - R one (split; this "
           "project's choice: it sees the side from the start, docs/RESULTS.md) or one (mean)")

    g = p.add_argument_group("loss (Eq. (1)-(5), App. B)").add_argument
    g("--contrast", default="cavp", choices=["none", "supcon", "cavp"],
      help="contrastive term: none, SupCon (uniform sampling) or CAVP mining (Table 5 rows 2-4)")
    g("--tau", type=float, default=0.1, help="temperature of Eq. (4) (App. B.1: %(default)s)")
    g("--anchors-per-group", type=int, default=512,
      help="sampled pixels per anchor group per step (%(default)s as cyh-0/CAVP, "
           "loss/contrastive_aud.py; built-in VPO: 128)")
    g("--pos-share", type=float, default=0.5,
      help="share of mismatched re-pairs given bank audio of the image's classes (App. B, Table 6)")
    g("--pos-share-of", default="mismatched", choices=["mismatched", "pairs"],
      help="--pos-share as the share of mismatched re-pairs given bank audio (mismatched) or as "
           "the share of positive re-pairs bank audio tops up to (pairs: Table 6's ratio of "
           "positive to negative pairs)")
    g("--cap-shards", type=int, default=1,
      help="--anchors-per-group per 1/N of the global batch: 1 = the batch (the method does not "
           "depend on the GPU count), N = cyh-0/CAVP's per-GPU sampling on N GPUs")
    g("--bank-size", type=int, default=8, help="waveforms per class in the memory bank (FIFO)")
    g("--bank-sources", default="single", choices=["single", "all"],
      help="App. B bank audio for single-source images only, or every image (one clip per class)")

    g = p.add_argument_group("readings of Eq. (1)-(3)").add_argument
    g("--match", default="class", choices=["class", "side"],
      help="Eq. (1) match: equal class sets (class), also each class on its object's side (side); "
           "a class on the wrong side is E_unknown")
    g("--unknown", default="mismatched", choices=["mismatched", "literal", "none"],
      help="Eq. (2) E_unknown: background of mismatched re-pairs (mismatched), every background "
           "pixel (literal, as printed) or none")
    g("--positives", default="label", choices=["set", "label"],
      help="Eq. (3) 'same t': same audio set and label (set, literal) or the label under any audio "
           "(label; this project's choice with --bg-groups one: they learn best, docs/RESULTS.md)")
    g("--bg-groups", default="one", choices=["label", "one"],
      help="E_bg sampling groups: one per visual label (label) or one for all (one, as SupCon's "
           "background; this project's choice, docs/RESULTS.md)")

    g = p.add_argument_group("optimisation (App. B.1)").add_argument
    g("--epochs", type=int, default=80, help="training epochs (%(default)s)")
    g("--batch-size", type=int, default=16, help="images per step over all ranks (%(default)s)")
    g("--lr", type=float, default=1e-3,
      help="SGD lr at batch 16, scaled linearly to --batch-size (%(default)s; built-in VPO: 1e-2)")
    g("--momentum", type=float, default=0.9, help="SGD momentum (%(default)s)")
    g("--weight-decay", type=float, default=5e-4, help="SGD weight decay (%(default)s)")
    g("--poly-power", type=float, default=0.9, help="poly lr decay power, per step (%(default)s)")
    g("--head-lr-mult", type=float, default=1.0,
      help="lr multiplier of the segmentation head (%(default)s; cyh-0/CAVP: 10)")
    g("--seed", type=int, default=0, help="random seed")
    g("--max-iters", type=int, default=None, help="stop after this many iterations (quick checks)")

    g = p.add_argument_group("run").add_argument
    g("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    g("--no-amp", action="store_true",
      help="no bf16 autocast (on for CUDA and CPUs with native bf16; emulated it is ~20x slower)")
    g("--compile", action="store_true", help="torch.compile the image encoder (measure it first)")
    g("--out", default=None, help="run folder (default: runs/cavp-<data>-s<seed>-<time>)")
    g("--resume", default=None, help="continue training from this checkpoint (e.g. runs/x/last.pt)")
    g("--overwrite", action="store_true",
      help="let a new training run replace the run in --out (last.pt, best.pt, metrics.json)")
    g("--eval-only", action="store_true", help="only test --ckpt")
    g("--ckpt", default=None, help="checkpoint for --eval-only or --predict")
    g("--eval-audio", default="real", choices=data.EVAL_AUDIO,
      help="--eval-only with the real audio, silence or an absent class's clip (fg_pred: false "
           "detections)")
    g("--coco-ann", default=None,
      help="COCO instances JSON of the test images, for --eval-audio absent (default: the built-in "
           "VPO's DATA_ROOT/sources/coco/annotations/instances_val2017.json)")
    g("--eval-every", type=int, default=5,
      help="evaluate every N epochs and after the last (%(default)s; built-in VPO: 40)")
    g("--save-every", type=int, default=1,
      help="write last.pt every N epochs and after the last (%(default)s; built-in VPO: 10)")
    g("--eval-batch-size", type=int, default=1,
      help="test batch per rank (App. B.1: %(default)s, original resolution; AVSBench resized and "
           "built-in VPO: 16)")
    g("--log-every", type=int, default=10, help="log line every N iterations")
    g("--overlays", type=int, default=4, help="PNG overlays and attention maps of N test images")

    g = p.add_argument_group("predict on your own image and sound").add_argument
    g("--predict", default=None, metavar="IMAGE",
      help="segment IMAGE with the sound --audio using --ckpt -> <stem>.png, <stem>.json in --out "
           "(default: the checkpoint's folder/predict)")
    g("--audio", default=None, metavar="WAV", help="the sound (any WAV; 3 s from its middle)")
    g("--audio-pos", type=float, default=None, metavar="A",
      help="pan the clip to position A, 0 = left .. 1 = right, as VPO (Sec. 3); for a mono clip")
    g("--max-size", type=int, default=None, metavar="PX",
      help="run at a long side of at most PX, never enlarged (default: the checkpoint's crop; "
           "built-in VPO: its image size)")

    args = p.parse_args(argv)
    vpo = DATASETS[args.data]["kind"] == "vpo"
    positive = ("epochs", "batch_size", "eval_every", "save_every", "log_every", "bank_size",
                "anchors_per_group", "eval_batch_size", "max_size", "cap_shards")
    for bad, message in [
            (args.predict and not (args.ckpt and args.audio),
             "--predict needs --ckpt PATH and --audio WAV"),
            (not args.predict and (args.audio or args.audio_pos is not None
                                   or args.max_size is not None),
             "--audio, --audio-pos and --max-size are for --predict IMAGE"),
            (args.predict and (args.eval_only or args.resume),
             "--predict excludes --eval-only and --resume"),
            (args.eval_only and not args.ckpt, "--eval-only needs --ckpt PATH"),
            (args.eval_audio != "real" and not args.eval_only,
             f"--eval-audio {args.eval_audio} is for --eval-only"),
            (args.eval_audio != "real" and not vpo,
             f"--eval-audio {args.eval_audio} is for --eval-only on a VPO --data"),
            (args.match == "side" and not vpo,
             "--match side compares VPO's source positions; AVSBench has none: use --match class"),
            (args.resize is not None and (vpo or args.resize < 0),
             "--resize is for AVSBench --data (>= 0, 0 = original resolution); VPO trains on "
             "--crop"),
            (args.s4_labels and args.data != "avsbench_s4",
             "--s4-labels is for --data avsbench_s4"),
            (args.avss_part != "all" and args.data != "avss", "--avss-part is for --data avss"),
            *[(getattr(args, flag) is not None and getattr(args, flag) < 1,
               f"--{flag.replace('_', '-')} must be >= 1") for flag in positive],
            (not 0 <= args.pos_share <= 1, "--pos-share must be in [0, 1]"),
            (not 1 <= args.mel_hop <= 25,
             "--mel-hop must be 1..25 ms, so that the 25 ms windows cover the clip"),
            (not 32 * args.mel_hop <= args.clip_ms <= 3000,
             f"--clip-ms must be {32 * args.mel_hop}..3000: at most the 3 s crop, at least 32 "
             "frames of --mel-hop (the audio ResNet-18's stride)"),
            (not 8 <= args.mel_bands <= 80,
             "--mel-bands must be 8..80: a 512-point FFT leaves finer mel filters empty"),
            (args.batch_size % args.cap_shards,
             f"--cap-shards {args.cap_shards} does not divide --batch-size {args.batch_size}"),
            (args.pos_enc != "none" and args.fusion != "ca",
             f"--pos-enc {args.pos_enc} codes f_CA's visual queries: use --fusion ca or "
             "--pos-enc none"),
            (args.match == "side" and args.mono,
             "--match side compares stereo positions: drop --mono or use --match class")]:
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


# The built-in synthetic VPO (vpo_make.py --synthetic) trains on a CPU: its values of the flags
# the user did not pass, with the crop = its fixed image size (so any eval batch gives one result)
BUILTIN = dict(
    backbone="resnet18",     # a CPU-sized encoder
    pretrained="none",       # trained from scratch
    output_stride=16,        # layer3-4 and ASPP at a quarter of stride 8's cost
    lr=1e-2,                 # from scratch, a higher lr
    anchors_per_group=128,   # 64 px images: 1/64 of the paper's crop area
    clip_ms=1500,            # 150 x 64 log-mels of the centre 1.5 s, the audio encoder at half
                             # of 300 x 64's cost: the built-in sounds are steady over the 3 s
    eval_batch_size=16,      # one image size: the batch does not change the result
    eval_every=40,           # an evaluation (450 images, L/R-swapped twins) ~ 1.3 epochs: 2 in 80
    save_every=10,           # last.pt (268 MB, 0.3-0.6 s to write) after every 10th epoch of ~6 s
    workers=0,               # 64 px samples (~3 ms) load in the training process, which runs
                             # 1.2x faster on 2 cores than beside loader processes
)


def resolve_defaults(args, given):
    """The values of the flags not in `given` where the data asks for others than the paper's:
    AVSBench (mono, as cyh-0/CAVP reads it; S4 trained on its categories; resized frames: crop =
    frame, eval batch 16) or the built-in VPO (BUILTIN)."""
    spec, args.builtin, args.image_size, values = DATASETS[args.data], False, None, {}
    if spec["kind"] == "avs":
        args.resize = spec["resize"] if args.resize is None else args.resize
        args.mono = True if args.mono is None else args.mono
        args.s4_labels = args.s4_labels or ("category" if args.data == "avsbench_s4" else None)
        values = dict(crop=args.resize, eval_batch_size=16) if args.resize else {}
    args.mono = bool(args.mono)
    summary = os.path.join(args.data_root, "vpo_summary.json")
    if spec["kind"] == "vpo" and os.path.isfile(summary):
        with open(summary) as f:
            info = json.load(f)
        if info.get("synthetic"):
            # crops of the whole image side (padded where the scale shrinks the image); crops of
            # 7/8 of it (0.77 of the pixels per step) lost 1.7 mIoU over 4 seeds
            args.builtin, args.image_size = True, int(info["image_size"])
            values = dict(BUILTIN, crop=args.image_size)
    for key, value in values.items():
        if key not in given:
            setattr(args, key, value)
    return args


def class_names(dataset, s4_labels=None):
    """The model's classes for a --data: VPO's 22, or data.avs_classes (S4: background + its 23
    categories, or binary with --s4-labels binary; MS3 binary; AVSS its 71)."""
    spec = DATASETS[dataset]
    if spec["kind"] == "vpo":
        return data.VPO_CLASSES
    labels = (s4_labels or "binary") if spec["task"] == "s4" else "binary"
    return data.avs_classes(spec["task"], labels)


# ----------------------------------------------------------------------------- model


class CrossAttention(nn.Module):
    """f_CA(u_v, u_a) = u_v + f_MHA(u_v, u_a, u_a): visual query, audio key and value (Sec. 4.1).

    The audio is one token, so the attention activation acts over the pixels of each head's map:
    sigmoid (the paper's choice), softmax over the H*W positions, or min-max normalisation (Fig. 6).
    pos_enc "sine": the query of pixel n is W_q (LN(u_v)_n + p_n) with p = sine_position_code; keys,
    values and the residual u_v carry no position (as DETR adds the code to queries and keys only,
    and the key here is the audio), so position acts only through the attention a pixel gives the
    sound.
    """

    def __init__(self, dim, heads, attn, pos_enc="none"):
        super().__init__()
        self.heads, self.attn, self.pos_enc = heads, attn, pos_enc
        # per-pixel MLP before f_CA: cyh-0/CAVP, models/cavp_model.py (visual_projector)
        self.visual_mlp = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(inplace=True),
                                        nn.Linear(256, dim))
        self.norm = nn.LayerNorm(dim)  # shared by both modalities
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        # the ratio-4 MLP block and the final LayerNorm: cyh-0/CAVP, models/attn.py (Block, norm)
        self.norm_mlp, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def activation(self, s):
        if self.attn == "sigmoid":
            return torch.sigmoid(s)
        if self.attn == "softmax":
            return torch.softmax(s, dim=2)
        lo, hi = s.amin(2, keepdim=True), s.amax(2, keepdim=True)
        return (s - lo) / (hi - lo + 1e-6)

    def forward(self, u_v, u_a, size, keep=None):
        """u_v (b, N, D) visual tokens of an h x w grid (size), u_a (B, D) audio, B = r b: image i
        is fused with clips i, b + i, ... -> fused z (B, N, D), attention map (B, N). The visual
        side (MLP, query) is computed once per image. keep: the tokens (flat over the (r - 1) b
        later fusions x N) whose z is used; the rest of those fusions' z is left 0, W_o and the
        MLP run on the first b fusions and the kept tokens only."""
        b, n, d = u_v.shape
        r = u_a.shape[0] // b
        u_v = self.visual_mlp(u_v)
        qv, ka = self.norm(u_v), self.norm(u_a)
        if self.pos_enc == "sine":
            qv = qv + sine_position_code(*size, d, device=qv.device).to(qv.dtype)
        q = self.q(qv).repeat(r, 1, 1).view(r * b, n, self.heads, -1).transpose(1, 2)  # B h N d'
        k = self.k(ka).view(r * b, self.heads, -1, 1)                    # B h d' 1
        v = self.v(ka).view(r * b, self.heads, 1, -1)                    # B h 1 d'
        a = self.activation(q @ k * q.shape[-1] ** -0.5)                 # B h N 1
        heads = (a * v).transpose(1, 2).reshape(r * b * n, d)            # f_MHA before W_o
        if keep is None:
            x = u_v.repeat(r, 1, 1).reshape(r * b * n, d) + self.o(heads)  # u_v (+) f_MHA
        else:
            rows = torch.cat([torch.arange(b * n, device=u_v.device), b * n + keep])
            x = u_v.reshape(b * n, d)[rows % (b * n)] + self.o(heads[rows])
        x = self.norm_out(x + self.mlp(self.norm_mlp(x)))
        z = x if keep is None else x.new_zeros(r * b * n, d).index_copy(0, rows, x)
        return z.view(r * b, n, d), a.mean(1).squeeze(-1)


def sine_position_code(h, w, dim, temperature=10000.0, device=None):
    """Fixed 2-D sinusoidal position code of an h x w token grid -> (h*w, dim), rows first (DETR's
    2-D form of the Transformer's code, ref. [55]).

    Token (r, c) sits at y = 2 pi (r + 1/2) / h, x = 2 pi (c + 1/2) / w: pixel centres normalised to
    the image, so a map of any size gets the same code at the same relative place, and a horizontal
    flip maps x to 2 pi - x. With F = dim / 4 frequencies w_i = T^(-i/F), i < F, T = temperature:
        p[2i] = sin(w_i y),          p[2i + 1] = cos(w_i y),           (first dim/2 channels: y)
        p[dim/2 + 2i] = sin(w_i x),  p[dim/2 + 2i + 1] = cos(w_i x)    (last dim/2 channels: x)
    dim must be a multiple of 4: f_CA's 304 = 4 x 76 gives 152 channels per axis, 76 frequencies.
    """
    if dim % 4:
        raise ValueError(f"sine position code: dim {dim} is not a multiple of 4 (sin/cos of y, x)")
    f = dim // 4
    freq = temperature ** (-torch.arange(f, device=device) / f)

    def axis(n):  # (n, 2F): sin / cos interleaved, at the n pixel centres scaled to (0, 2 pi)
        a = (2 * math.pi * (torch.arange(n, device=device) + 0.5) / n)[:, None] * freq
        return torch.stack([a.sin(), a.cos()], -1).flatten(1)
    py, px = axis(h)[:, None].expand(h, w, 2 * f), axis(w)[None].expand(h, w, 2 * f)
    return torch.cat([py, px], -1).reshape(h * w, dim)


class AudioQueryFusion(nn.Module):
    """TPAVI-like fusion: u_v (+) u_v (.) f_MHA(u_a, u_v, u_v) (Sec. 4.1, Table 5 row 1)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, u_v, u_a, size=None, keep=None):
        """As CrossAttention.forward; size and keep are not used (no position code, every z)."""
        u_v = u_v.repeat(u_a.shape[0] // u_v.shape[0], 1, 1)
        out, w = self.mha(u_a[:, None], u_v, u_v)  # audio query, softmax over the pixels
        return u_v + u_v * out, w[:, 0]


class CAVPModel(nn.Module):
    """Image encoder f_phi, audio encoder f_gamma, fusion f_CA and the DeepLabV3+ classifier."""

    def __init__(self, args, num_classes, dim=304):
        super().__init__()
        self.visual = DeepLabV3Plus(args.backbone, args.pretrained, args.output_stride)
        self.audio = AudioEncoder(1 if args.mono else 2, dim, args.pretrained, args.audio_conv1)
        self.fusion = AudioQueryFusion(dim, args.heads) if args.fusion == "tpavi" else \
            CrossAttention(dim, args.heads, args.attn, args.pos_enc)
        self.classifier = nn.Sequential(
            nn.Conv2d(dim, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
            nn.Conv2d(256, num_classes, 1))

    def forward(self, image, mel, pairing=None, plan=None):
        """image (B,3,H,W), mel (B,C,T,F) -> logits (B,K,H,W), fused z (B,D,h,w), attention (B,h,w).

        Training (Eq. 1): `pairing` gives every image a second audio embedding (pair_embeddings), so
        image i is fused with its own clip and again with its re-pair's: z and the attention maps
        hold the B pairs, then the B re-pairs. Image features and clips are encoded once; the
        classifier runs on the pairs only, the only ones with a CE term (Eq. 5). plan(h, w) -> the
        re-pairs' tokens that the contrastive term reads (re_pair_tokens): the re-pairs' z is
        computed there only.
        """
        feat = self.visual(image)
        b, d, h, w = feat.shape
        tokens = feat.flatten(2).transpose(1, 2)
        u_a = self.audio(mel)
        u_a = pair_embeddings(u_a, pairing) if pairing is not None else u_a
        keep = plan(h, w) if plan is not None else None
        z, attn = self.fusion(tokens, u_a, (h, w), keep)
        z = z.transpose(1, 2).reshape(-1, d, h, w)
        logits = F.interpolate(self.classifier(z[:b]), size=image.shape[2:], mode="bilinear",
                               align_corners=False)
        return logits, z, attn.reshape(-1, h, w)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ encoder / decoder up to the 304-channel feature at 1/4 resolution (App. B.1).

    cyh-0/CAVP uses a deep-stem ResNet; torchvision's ResNet is used here so that ImageNet
    weights come from torchvision's weights API. ASPP rates 6 / 12 / 18 at output stride 16,
    doubled at 8 (DeepLabV3, Sec. 3.3; cyh-0/CAVP keeps 6 / 12 / 18 at 8).
    """

    def __init__(self, name, pretrained, output_stride):
        super().__init__()
        net = dilated_resnet(name, output_stride)
        load_backbone_weights(net, name, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2 = net.layer1, net.layer2
        self.layer3, self.layer4 = net.layer3, net.layer4
        low, high = net.layer1[-1].conv1.in_channels, net.fc.in_features
        self.aspp = ASPP(high, rates=(6, 12, 18) if output_stride == 16 else (12, 24, 36))
        self.low_proj = nn.Sequential(nn.Conv2d(low, 48, 1, bias=False), nn.BatchNorm2d(48),
                                      nn.ReLU(inplace=True))

    def forward(self, x):
        low = self.layer1(self.stem(x))
        high = self.aspp(self.layer4(self.layer3(self.layer2(low))))
        high = F.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=False)
        return torch.cat([high, self.low_proj(low)], 1)  # 256 + 48 = 304 channels


class ASPP(nn.Module):
    """DeepLabV3 atrous spatial pyramid pooling (Sec. 3.3): a 1x1 and three atrous 3x3
    convolutions, and image pooling (1x1 convolution, batch normalisation), each 256 channels, as
    torchvision's ASPP; the projection's dropout 0.1 as DeepLabV3+'s tensorflow/models deeplab
    (torchvision's DeepLabV3: 0.5)."""

    def __init__(self, cin, cout=256, rates=(6, 12, 18)):
        super().__init__()
        def branch(conv):
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList(
            [branch(nn.Conv2d(cin, cout, 1, bias=False))]
            + [branch(AtrousConv(cin, cout, 3, padding=r, dilation=r, bias=False)) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Dropout(0.1))

    def forward(self, x):
        pooled = self.pool(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class AtrousConv(nn.Conv2d):
    """A 3x3 convolution at dilation = padding = r. On a map of at most r rows and columns every tap
    but the centre reads the zero padding, so the centre tap alone (a 1x1 convolution, 1/9 of the
    cost) gives the same output and gradients: the built-in VPO's 4 x 4 maps at rates 6, 12, 18."""

    def forward(self, x):
        if self.dilation[0] < max(x.shape[2:]):
            return super().forward(x)
        return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)


def dilated_resnet(name, output_stride):
    """torchvision's ResNet with the stride of layer4 (output stride 16) or layer3 and layer4 (8)
    traded for dilation by its replace_stride_with_dilation, as torchvision's DeepLabV3: a dilated
    stage doubles the rate, its first block keeping the previous one. torchvision's BasicBlock
    (resnet18) takes no dilation, so there the same rates are set on its convolutions."""
    replace = [False, output_stride == 8, True]
    if name != "resnet18":
        return getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=replace)
    net, rate = torchvision.models.resnet18(weights=None), 1
    for layer in itertools.compress((net.layer2, net.layer3, net.layer4), replace):
        previous, rate = rate, 2 * rate
        for i, block in enumerate(layer):
            for m in block.modules():
                if isinstance(m, nn.Conv2d):
                    m.stride = (1, 1)
                    if m.kernel_size == (3, 3):
                        m.dilation = m.padding = (rate, rate) if i else (previous, previous)
    return net


class AudioEncoder(nn.Module):
    """ResNet-18 on the log-mel (1 channel mono, 2 stereo), global max pool, FC 512 -> dim (App.
    B.1; as cyh-0/CAVP, models/audio/audio_network.py).

    conv1 of a stereo encoder, seen as a filter s on L + R and a filter d on L - R (weights s + d on
    L, s - d on R): s is ImageNet's conv1 averaged over RGB (--pretrained imagenet) or the fresh
    filter's mean over the channels, d half the fresh filter's difference between them. conv1
    "split" keeps d, "mean" drops it (d = 0: L and R swapped give the same embedding at init). The
    log-mel of a source panned at alpha differs between L and R by the constant 20 log10((1 - alpha)
    / alpha) / 50 (data.LogMel), so the side reaches the network through d only.
    """

    def __init__(self, channels, dim, pretrained, conv1="split"):
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        imagenet = pretrained == "imagenet"  # a local --pretrained file is the image backbone's
        load_backbone_weights(net, "resnet18", "imagenet" if imagenet else "none")
        rgb = net.conv1.weight.data
        net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        fresh = net.conv1.weight.data
        s = fresh.mean(1, keepdim=True)
        d = fresh - s  # (+d, -d) on (L, R); 0 for mono
        if imagenet:
            # cyh-0/CAVP (models/audio/audio_network.py) replaces conv1 by a fresh conv, dropping
            # ImageNet's filter on the content; here ImageNet's filter stays on L + R, which bn1 and
            # layer1 were trained after, and the fresh d, scaled per filter to the norm of
            # ImageNet's, adds the side at the same strength.
            s = rgb.mean(1, keepdim=True)
            d = d * s.norm(dim=(2, 3), keepdim=True) / d.norm(dim=(2, 3), keepdim=True).clamp(
                min=1e-12)
        net.conv1.weight.data = (s + d if conv1 == "split" else s.expand_as(fresh)).contiguous()
        net.fc = nn.Linear(512, dim)
        self.net = net

    def forward(self, mel):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(mel))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return n.fc(torch.amax(x, dim=(2, 3)))


def load_backbone_weights(net, name, pretrained):
    """ImageNet weights via torchvision's weights API (under torchrun rank 0 downloads them into the
    cache while the other ranks wait, then they read it), or a local state dict."""
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        waits = dist.is_initialized() and dist.get_rank() > 0
        if waits:
            dist.barrier()
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            raise data.DataError(
                f"could not download ImageNet weights for {name} ({type(e).__name__}; offline?): "
                f"fetch {weights.url} elsewhere and pass --pretrained PATH, or train from scratch "
                "with --pretrained none")
        if dist.is_initialized() and not waits:
            dist.barrier()
    else:
        if not os.path.isfile(pretrained):
            raise data.DataError(f"--pretrained {pretrained}: no such file (give 'imagenet', "
                                 "'none' or a .pth path)")
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    own = net.state_dict()
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not state:
        raise data.DataError(f"--pretrained {pretrained}: no tensor matches a {name}; is it a "
                             f"{name} state dict?")
    net.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- loss: Eq. (1)-(5)
#
# As for one process holding the whole batch. Every choice (re-pairs, bank clips, anchor sets and
# their sampling) is made on the host from the batch's labels with one generator; the device only
# computes features and the loss at the chosen indices, so a step never waits for the device. The
# next section makes the batch the global one under DDP.


class Labels(NamedTuple):
    """The host labels of a batch that Eq. (1)-(5) use."""
    audio_classes: torch.Tensor  # (B, K) multi-hot classes of the clip
    audio_pos: torch.Tensor      # (B,) pan position of a single-source clip, -1 for multi-source
    source_pos: torch.Tensor     # (B, K) position of each sounding class's object in the image
    labelled: torch.Tensor       # (B,) labelled (not ignore) pixels


class RePairs(NamedTuple):
    """Eq. (1) for a batch of B images (see re_pair)."""
    perm: torch.Tensor           # (B,) image i takes the audio of image perm[i]
    choice: torch.Tensor         # (B, K) bank row per class of a re-pair given bank audio, else -1
    audio_classes: torch.Tensor  # (B, K) the classes of each re-pair's audio
    match: torch.Tensor          # (B,) whether the re-pair's audio matches its image
    wrong_side: torch.Tensor     # (B, K) shared classes sounding from the wrong side (--match side)


def derangement(n, gen=None):
    """A uniform random permutation of n >= 2 without a fixed point (rejection; ~e draws): no image
    is re-paired with its own audio in Eq. (1)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        if n < 2 or not (perm == torch.arange(n)).any():
            return perm


def re_pair(labels, bank, pos_share, use_bank, gen=None, bank_sources="single", match_side=False,
            share_of="mismatched"):
    """Eq. (1) on the host labels of a batch: image i is re-paired with the audio of image perm[i],
    a derangement. The re-pair matches when the audio's class set is the image's; with match_side,
    also each class must sound from the half of the image (left / right of the centre) where its
    object is. A share of the mismatched re-pairs instead gets bank audio of the image's own
    classes, each clip panned at its object's position (App. B): single-source images only, or every
    image with bank_sources 'all'. share_of 'mismatched': each with probability pos_share;
    'pairs': in random order until pos_share of all re-pairs match (or none is left). -> RePairs.

    cyh-0/CAVP (models/cavp_model.py, forward_audio) computes this replacement and then discards it;
    here it is used.
    """
    t, pos, src = labels.audio_classes, labels.audio_pos, labels.source_pos
    b = t.shape[0]
    perm = derangement(b, gen)
    t_re = t[perm].clone()
    wrong_side = (t > 0) & (t_re > 0) & ((src >= 0.5) != (src[perm] >= 0.5)) if match_side \
        else t_re < 0
    match = (t_re == t).all(1) & ~wrong_side.any(1)
    choice = torch.full(t.shape, -1, dtype=torch.long)
    if use_bank:
        share = torch.rand(b, generator=gen)  # one draw per re-pair
        todo = torch.nonzero(~match).flatten()
        if share_of == "pairs":
            todo = todo[torch.argsort(share[todo], stable=True)]
        for i in todo.tolist():
            if share_of == "pairs" and match.sum() >= pos_share * b:
                break
            if (pos[i] < 0 and bank_sources == "single") or \
                    (share_of == "mismatched" and share[i] >= pos_share):
                continue
            classes = torch.nonzero(t[i]).flatten().tolist()
            rows = [bank.draw(c, gen) for c in classes]
            if not classes or None in rows:  # no class of its own (a silent frame), or none banked
                continue
            choice[i, classes] = torch.tensor(rows, dtype=torch.long)
            t_re[i], match[i], wrong_side[i] = t[i], True, False
    return RePairs(perm, choice, t_re, match, wrong_side)


class WaveBank:
    """Per-class FIFO of raw mono waveforms from single-source samples (App. B.1). The counts live
    on the host and the waveforms on the device, alike on every rank: it stores the clips of the
    global batch."""

    def __init__(self, num_classes, size, length, device):
        self.size = size
        self.waves = torch.zeros(num_classes * size, length, device=device)  # row c * size + slot
        self.count = torch.zeros(num_classes, dtype=torch.long)

    def push(self, wave, audio_classes, audio_pos):
        """Store the clips of wave (B, C, N) (device) whose sample is single-source (audio_pos >= 0;
        host labels); L + R gives back the mono clip."""
        rows = {}
        for i in torch.nonzero(audio_pos >= 0).flatten().tolist():
            c = int(audio_classes[i].argmax())
            rows[c * self.size + int(self.count[c]) % self.size] = i  # FIFO: later clips overwrite
            self.count[c] += 1
        if rows:
            dst, src = (to_device(torch.tensor(list(v)), wave.device)
                        for v in (rows, rows.values()))
            self.waves[dst] = wave[src].sum(1).to(self.waves.dtype)

    def draw(self, c, gen=None):
        """The bank row of a random stored waveform of class c, or None while it has none."""
        n = min(int(self.count[c]), self.size)
        return c * self.size + int(torch.randint(n, (), generator=gen)) if n else None

    def clips(self, choice, pos, stereo):
        """choice (b, K) bank rows (-1: none) and pos (b, K) positions (host) -> (b, C, N) on the
        device: the chosen clips of each row, each panned at its position (data.pan), summed."""
        gains = torch.zeros(2 if stereo else 1, choice.shape[0], self.waves.shape[0])
        for i, c in torch.nonzero(choice >= 0).tolist():
            gains[:, i, choice[i, c]] += torch.tensor([1 - pos[i, c], pos[i, c]]) if stereo else 1.0
        return torch.einsum("cbr,rn->bcn", to_device(gains, self.waves.device), self.waves)

    def state_dict(self):
        return dict(waves=self.waves, count=self.count)

    def load_state_dict(self, state):
        self.waves.copy_(state["waves"])
        self.count.copy_(state["count"])


class AudioPairing(NamedTuple):
    """Eq. (1) for the model: which audio embedding each of its b re-pairs takes."""
    perm: torch.Tensor    # (b,) the clip of each re-pair, in the (global) batch
    banked: torch.Tensor  # the re-pairs that take a bank clip instead (appended after the b clips)
    world: int            # ranks: the clips of the global batch are gathered when > 1


def pair_embeddings(u_a, pairing):
    """Eq. (1) on audio embeddings. u_a (b + k, D): the b clips, then the k bank clips of the
    re-pairs `pairing.banked` -> (2b, D): the b pairs, then the b re-pairs."""
    b = pairing.perm.shape[0]
    every = GatherWithGrad.apply(u_a[:b].float()) if pairing.world > 1 else u_a[:b]  # global batch
    re_paired = every[pairing.perm].to(u_a.dtype).index_copy(0, pairing.banked, u_a[b:])
    return torch.cat([u_a[:b], re_paired])


def anchor_sets(y, t, match, unknown="mismatched", wrong_side=None):
    """Eq. (2) per pixel. y (N,P) visual labels (255 ignore), t (N,K) audio multi-hot, match (N,)
    whether the audio matches the image (re_pair). A pixel is foreground when its class is in the
    audio set (multi-source: t is a set). E_unknown: background of mismatched re-pairs
    ('mismatched'), every background pixel ('literal': t != y(w) and y(w) = bg, as Eq. (2) is
    printed), or nothing ('none'); plus the pixels of the classes that wrong_side (N,K) marks.
    -> boolean masks fg, unknown, bg (N,P)."""
    valid = y != 255
    y0 = torch.where(valid, y, 0)
    obj, bg_px = valid & (y0 != 0), valid & (y0 == 0)
    off_side = obj & torch.gather(wrong_side, 1, y0) if wrong_side is not None else \
        torch.zeros_like(obj)
    fg = obj & (torch.gather(t, 1, y0) > 0) & ~off_side
    unknown = off_side | dict(mismatched=bg_px & ~match[:, None], literal=bg_px,
                              none=off_side)[unknown]
    return fg, unknown, valid & ~fg & ~unknown


def sample_groups(keys, cap, gen=None):
    """Indices of at most `cap` random members of every group (uniform within a group)."""
    order = torch.randperm(keys.numel(), generator=gen)
    k, sort = torch.sort(keys[order], stable=True)
    order = order[sort]
    place = torch.arange(k.numel()) - torch.searchsorted(k, k, right=False)  # within its group
    return order[place < cap]


def plan_anchors(y, t, match, mode, cap, gen=None, positives="set", unknown="mismatched",
                 bg_groups="label", wrong_side=None, shards=1):
    """The anchors of Eq. (2)-(3), on the host: y (N,P) labels of the N pairs at feature resolution.
    -> the sampled pixels idx (A,) (pair * P + pixel), whether each is foreground and its key (a
    foreground anchor's positives are the foreground anchors with its key; a background anchor's,
    the background anchors), and how many anchors have a positive (Eq. (4) averages over those).

    mode 'cavp': anchors from E_fg and E_bg (E_unknown never used; see anchor_sets), foreground
    sampled per (audio set, visual label) group so hard negatives (same audio / other label, other
    audio / same label) are always present, background per label or as one group (`bg_groups`);
    a foreground anchor's key is its (audio set, label) (positives 'set', the literal 'same t') or
    its label under any audio set (positives 'label'). mode 'supcon': uniform sampling per
    segmentation label, as cyh-0/CAVP, loss/contrastive_aud.py (object pixels of mismatched
    re-pairs relabelled background), every anchor keyed by its label. shards > 1: the cap applies
    within each 1/shards of the pairs (pair i and its re-pair in shard i // (N / 2 / shards))."""
    n = y.shape[0] // 2  # the pairs, then their re-pairs
    shard = (torch.arange(2 * n) % n // (n // shards))[:, None].expand_as(y).flatten()

    def sample(keys):  # a group within each shard: (key, shard)
        if shards > 1:
            keys = torch.unique(torch.stack([keys, shard]), dim=1, return_inverse=True)[1]
        return sample_groups(keys, cap, gen)
    if mode == "supcon":
        label = torch.where(match[:, None] | (y == 255), y, 0).flatten()
        idx = sample(torch.where(label == 255, -1, label))
        idx = idx[label[idx] != 255]
        fg, key = torch.ones(idx.numel(), dtype=torch.bool), label[idx]
    else:
        fg, _, bg = (m.flatten() for m in anchor_sets(y, t, match, unknown, wrong_side))  # Eq. (2)
        audio_id = torch.unique(t, dim=0, return_inverse=True)[1][:, None].expand_as(y).flatten()
        label = y.flatten()
        bg_group = -1 - label if bg_groups == "label" else -1
        group = torch.where(fg, audio_id * t.shape[1] + label, bg_group)
        idx = sample(torch.where(fg | bg, group, torch.iinfo(group.dtype).min))
        idx = idx[(fg | bg)[idx]]
        fg, key = fg[idx], (group if positives == "set" else label)[idx]
    counts = torch.unique(torch.where(fg, key, -1), return_inverse=True, return_counts=True)
    kept = int((counts[2][counts[1]] > 1).sum())  # anchors with another member of their key
    return idx, fg, key, kept


def positives_negatives(fg, key, rows):
    """Eq. (3) for the anchors `rows` against all A anchors (fg, key (A,) of plan_anchors) -> pos,
    neg (R, A) masks; no anchor is its own positive."""
    same = fg[None, :] & (key[rows, None] == key[None, :])          # P^fg: same t, same y
    eye = rows[:, None] == torch.arange(fg.numel(), device=fg.device)[None, :]
    pos = torch.where(fg[rows, None], same, ~fg[None, :]) & ~eye    # P^bg = E_bg
    neg = torch.where(fg[rows, None], ~same, fg[None, :])           # N_hard + N_easy; N^bg = E_fg
    return pos, neg


def info_nce(za, zc, pos, neg, tau):
    """Eq. (4) summed over the anchors za (R,D) against the candidates zc (A,D) (pos / neg (R,A)
    masks): per anchor the mean over positives p of -log(e^{z.z_p/tau} / (e^{z.z_p/tau} +
    sum_n e^{z.z_n/tau})); an anchor without positives adds 0."""
    s = za @ zc.T / tau
    s = s - s.amax(1, keepdim=True).detach()
    neg_sum = (s.exp() * neg).sum(1, keepdim=True)
    log_prob = s - torch.log(s.exp() + neg_sum)
    return (-(log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)).sum()


def contrastive_loss(z, y, t, match, mode, tau, cap, positives="set", unknown="mismatched",
                     bg_groups="label", wrong_side=None, gen=None, rank=0, world=1, shards=1,
                     plan=None):
    """The contrastive term of Eq. (5): the mean of Eq. (4) over the anchors of plan_anchors that
    have a positive. z (2b,D,h,w): fused features of the b pairs then their b re-pairs; y (2B,H,W)
    labels, t (2B,K), match (2B,), wrong_side (2B,K): host labels of the batch, pairs then
    re-pairs. Under DDP (B = b * world) a rank computes the rows of its own anchors and returns its
    share times `world` (see anchor_features); shards: plan_anchors'. plan: plan_anchors' result
    when it was made before the forward pass (Criterion)."""
    h, w = z.shape[2:]
    if plan is None:
        plan = plan_anchors(labels_at(y, (h, w)), t, match, mode, cap, gen, positives, unknown,
                            bg_groups, wrong_side, shards)
    idx, fg, key, kept = plan
    feats, rows = anchor_features(z, idx, y.shape[0] // 2, rank, world)  # normalised z at idx
    if kept == 0:
        return z.sum() * 0
    fg, key = to_device(fg, z.device), to_device(key, z.device)
    pos, neg = positives_negatives(fg, key, rows)                      # Eq. (3)
    return info_nce(feats[rows], feats, pos, neg, tau) * world / kept  # Eq. (4)


def labels_at(y, size):
    """Labels (N,H,W) nearest-downsampled to the feature size (N, h*w), as cyh-0/CAVP,
    loss/contrastive_aud.py."""
    return F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].long().flatten(1)


def re_pair_tokens(idx, pairs, b, size, rank):
    """The tokens of this rank's b re-pairs (flat over b x h*w, sorted) among the anchors idx of
    plan_anchors (the global batch's `pairs` pairs, then their re-pairs): the only re-pair features
    the loss reads (anchor_features), so f_CA computes the re-pairs there only."""
    n = size[0] * size[1]
    pair, pixel = idx // n, idx % n
    mine = (pair >= pairs) & (pair % pairs // b == rank)
    return torch.unique((pair % pairs % b * n + pixel)[mine])


class Criterion:
    """Eq. (5) on one training batch: CE on the original pairs plus the contrastive term (Eq. 1-4)
    on the pairs and their re-pairs -> the loss, its parts. Holds the memory bank (App. B.1) and the
    generator of the re-pairs and anchors, alike on every rank. Under DDP the batch is the global
    batch and a rank's loss is its share times the world size, so that DDP's gradient average is the
    gradient of the global batch's loss."""

    def __init__(self, args, num_classes, mel_fn, device, amp, rank, world):
        self.args, self.mel_fn, self.device, self.amp = args, mel_fn, device, amp
        self.rank, self.world = rank, world
        self.bank = WaveBank(num_classes, args.bank_size, 48000, device)
        self.gen = torch.Generator().manual_seed(args.seed)
        # labels travel between ranks on the host: the default group where it is gloo, else a gloo
        # group beside nccl
        self.host_group = dist.new_group(backend="gloo") if world > 1 and device.type == "cuda" \
            else None

    def state_dict(self):
        return dict(bank=self.bank.state_dict(), generator=self.gen.get_state())

    def load_state_dict(self, state):
        self.bank.load_state_dict(state["bank"])
        self.gen.set_state(state["generator"])

    def __call__(self, net, batch, epoch):
        args, device = self.args, self.device
        image, mask, waves = data.device_batch(batch, device)
        labels = gather_labels(batch, self.host_group)
        pairing, anchors, plan = None, {}, None
        if args.contrast != "none":
            re = re_pair(labels, self.bank, args.pos_share, epoch >= 1, self.gen, args.bank_sources,
                         args.match == "side", args.pos_share_of)                  # Eq. (1), App. B
            pairing, bank_clips = rank_share(re, labels, self.bank, waves, self.rank, self.world)
            # the bank takes the batch's clips after Eq. (1) and its draws: no image gets its own
            # back
            self.bank.push(gather(waves), labels.audio_classes, labels.audio_pos)
            waves = waves if bank_clips is None else torch.cat([waves, bank_clips])
            t = torch.cat([labels.audio_classes, re.audio_classes]).long()
            match = torch.cat([torch.ones(len(re.perm), dtype=torch.bool), re.match])
            wrong_side = torch.cat([torch.zeros_like(re.wrong_side), re.wrong_side])

            def plan(h, w):  # the anchors of Eq. (2)-(3), on the host, once f_CA's size is known
                y = gather(labels_at(batch["mask"], (h, w)), self.host_group)
                both = torch.cat([y, y])  # the pairs' labels, then their re-pairs'
                anchors["y"], anchors["plan"] = both.view(-1, h, w), plan_anchors(
                    both, t, match, args.contrast, args.anchors_per_group, self.gen,
                    args.positives, args.unknown, args.bg_groups, wrong_side, args.cap_shards)
                return to_device(re_pair_tokens(anchors["plan"][0], y.shape[0], image.shape[0],
                                                (h, w), self.rank), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, z, _ = net(image, self.mel_fn(waves), pairing, plan)
        # Eq. (5), CE on the original pairs: the sum over the pixels / the labelled pixels
        loss_ce = F.cross_entropy(logits.float(), mask, ignore_index=255, reduction="sum") \
            * self.world / max(float(labels.labelled.sum()), 1.0)
        loss_cp = torch.zeros((), device=device)
        if args.contrast != "none":
            loss_cp = contrastive_loss(z, anchors["y"], t, match, args.contrast, args.tau,
                                       args.anchors_per_group, rank=self.rank, world=self.world,
                                       plan=anchors["plan"])
        return loss_ce + loss_cp, dict(ce=loss_ce, cp=loss_cp)  # Eq. (5)


# --------------------------------------------------------------------------- global batch under DDP
#
# --batch-size 16 is the same method on 1 or 8 ranks: every rank gathers the labels of the global
# batch (host) and makes the same re-pairs and anchor choices with the same generator; the ranks
# exchange clips for the bank (device), audio embeddings for the re-pairs and the sampled anchor
# features (device, the gradients flowing back to the rank that computed them).


def to_device(x, device):
    """Host -> device copy that does not wait for the device."""
    return x.to(device, non_blocking=True)


def gather(x, group=None):
    """x of every rank concatenated along dim 0 in rank order (x on one rank); no gradient."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out)


class GatherWithGrad(torch.autograd.Function):
    """gather() whose backward sums the gradients of every rank's loss and keeps this rank's slice
    (the multi-GPU SupCon pattern), so one rank's loss may use the features of all ranks."""

    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.n:(rank + 1) * ctx.n]


def gather_labels(batch, group=None):
    """The Labels of the global batch, ranks in order, in one exchange on the host."""
    k = batch["audio_classes"].shape[1]
    labelled = (batch["mask"] != 255).flatten(1).sum(1, keepdim=True).float()
    columns = gather(torch.cat([batch["audio_classes"], batch["audio_pos"][:, None],
                                batch["source_pos"], labelled], 1), group)
    return Labels(columns[:, :k], columns[:, k], columns[:, k + 1:2 * k + 1], columns[:, -1])


def rank_share(re, labels, bank, waves, rank, world):
    """This rank's b re-pairs of the global batch's RePairs -> their AudioPairing and the bank clips
    (k, C, N) of the k that take bank audio (None when k = 0), each panned at its object."""
    b = waves.shape[0]
    own = slice(rank * b, (rank + 1) * b)
    banked = torch.nonzero((re.choice[own] >= 0).any(1)).flatten()
    clips = bank.clips(re.choice[own][banked], labels.source_pos[own][banked],
                       waves.shape[1] == 2) if banked.numel() else None
    pairing = AudioPairing(to_device(re.perm[own], waves.device), to_device(banked, waves.device),
                           world)
    return pairing, clips


def anchor_features(z, idx, pairs, rank, world):
    """The L2-normalised features (A, D) of the sampled anchors idx (A,) (pair * h * w + pixel over
    the global batch's `pairs` pairs, then their re-pairs), and `rows`, those that this rank holds
    (device). z (2b, D, h, w) is this rank's: global pair p < pairs is rank p // b's pair p % b.
    Each rank normalises its own anchors' features, padded to the largest rank's count, and all
    are gathered with gradients; on one rank this is F.normalize of z at idx."""
    n, d, h, w = z.shape
    b = n // 2
    pair, pixel = idx // (h * w), idx % (h * w)
    owner = pair % pairs // b
    local = (pair // pairs * b + pair % pairs % b) * h * w + pixel  # index in the owner's z
    mine = torch.nonzero(owner == rank).flatten()
    width = int(torch.bincount(owner, minlength=world).max()) if idx.numel() else 0
    slot = (F.one_hot(owner, world).cumsum(0) - 1).gather(1, owner[:, None])[:, 0]  # in its rank
    take = torch.zeros(width, dtype=torch.long)
    take[:mine.numel()] = local[mine]
    flat = z.float().flatten(2).transpose(1, 2).reshape(-1, d)
    feats = F.normalize(flat[to_device(take, z.device)], dim=-1)
    if world > 1:
        feats = GatherWithGrad.apply(feats)
    return feats[to_device(owner * width + slot, z.device)], to_device(mine, z.device)


def wrap_model(model, args, device, world, log_path):
    """The model for training -> (model, net): channels-last and TF32 on CUDA, --compile,
    SyncBatchNorm (CUDA) and DistributedDataParallel under torchrun."""
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.compile:
        model.visual.compile()
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1 and log_path:
        log("note: SyncBatchNorm needs CUDA; on CPU each rank keeps its own BatchNorm statistics",
            log_path)
    device_ids = [device.index] if device.type == "cuda" else None
    return model, nn.parallel.DistributedDataParallel(model, device_ids) if world > 1 else model


def rank0_buffers(model, world):
    """Rank 0's buffers on every rank, so that an evaluation scores the weights rank 0 saves: on a
    CPU (no SyncBatchNorm) each rank's BatchNorm statistics follow its own shard; on CUDA
    SyncBatchNorm keeps them equal."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


# ----------------------------------------------------------------------- train / evaluate / predict


def train_one_epoch(net, loader, optimizer, scheduler, criterion, meter, epoch, iteration, args,
                    log_path):
    """One pass over the loader (the rest of it after a resume inside the epoch), ending early at
    meter.total (--max-iters) -> the iteration count. Fixed crops: cuDNN picks fast kernels."""
    net.train()
    torch.backends.cudnn.benchmark = True
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
        if iteration % args.log_every == 0 or iteration == meter.total:
            text = meter.line(epoch, args.epochs, iteration, optimizer.param_groups[0]["lr"])
            if log_path:
                log(text, log_path)
        if iteration >= meter.total:
            break
    return iteration


def save_overlay(path, image, mask, pred, attn, names):
    """One PNG: image | ground truth | prediction | cross-attention heatmap (App. C, Fig. 10),
    titled, with a legend of the classes (`names`) in ground truth or prediction."""
    img, colors = data.to_uint8(image), data.class_colors(len(names))
    panels = [img, data.label_overlay(img, mask, colors), data.label_overlay(img, pred, colors),
              data.heatmap_overlay(img, attn.float())]
    data.save_panels(panels, ["image", "ground truth", "prediction", "attention"],
                     data.legend_for([mask, pred], names, colors), path)


@torch.no_grad()
def evaluate(model, loader, mel_fn, device, amp, names, binary=False, overlay_dir=None,
             n_overlays=0, swap=False):
    """Dataset-level mIoU / F-beta / FDR from one confusion matrix over the classes `names` (Sec.
    5.1) and, where the samples carry silent twins, the twin metrics (metrics.TwinMeter),
    all-reduced over ranks; overlays of the first n_overlays test images, each written by the rank
    whose shard (a Subset of the test split) holds it. binary (AVSBench-Objects,
    Tables 1-2): sounding object = 1 - p(background) > 0.5 against the mask's foreground, plus M_J /
    M_F (metrics.AVSObjectsMeter). swap: left and right audio channels exchanged."""
    model.eval()
    torch.backends.cudnn.benchmark = False  # test images of every size: no per-shape kernel search
    cm = metrics.ConfusionMatrix(len(names), device=device)
    twins = metrics.TwinMeter(len(names), device=device)
    objects = metrics.AVSObjectsMeter(device) if binary else None
    index, seen = loader.dataset.indices, 0
    for batch in loader:
        image, mask, wave = data.device_batch(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, _, attn = model(image, mel_fn(wave.flip(1) if swap else wave))
        if binary:  # an S4 model trained on categories is tested on the binary masks too
            fg = 1 - logits.float().softmax(1)[:, 0]
            pred, mask = (fg > 0.5).long(), torch.where(mask == 255, mask, (mask > 0).long())
            objects.update(fg, mask)
        else:
            pred = logits.argmax(1)
        cm.update(pred, mask)
        if "twin" in batch:
            twins.update(pred, mask, batch["twin"].to(device))
        for i, name in enumerate(batch["name"]):
            if index[seen + i] < n_overlays:
                os.makedirs(overlay_dir, exist_ok=True)
                save_overlay(os.path.join(overlay_dir, f"{name}.png"), image[i], mask[i], pred[i],
                             attn[i], names)
        seen += len(batch["name"])
    cm.all_reduce()
    twins.all_reduce()
    res = dict(cm.compute(), **twins.compute())
    if binary:
        objects.all_reduce()
        res.update(objects.compute())
    model.train()
    return res


def run_eval(model, loaders, split, weights, mel_fn, device, amp, args, log_path, epoch=None):
    """Metrics of one split (test: overlays and, with stereo twins, the twin metrics with left and
    right swapped), logged on rank 0 (a summary line after `epoch`) -> dict(split, weights, ...)."""
    start, binary = time.time(), DATASETS[args.data]["binary"]
    names = data.AVS_BINARY if binary else class_names(args.data, args.s4_labels)
    n_overlays = args.overlays if split == "test" else 0
    res = evaluate(model, loaders[split], mel_fn, device, amp, names, binary,
                   os.path.join(args.out, "overlays"), n_overlays)
    if split == "test" and "swap" in loaders:
        swapped = evaluate(model, loaders["swap"], mel_fn, device, amp, names, swap=True)
        res.update({f"{key}_swap": swapped[key] for key in metrics.TWIN_KEYS})
    part = f", part {args.avss_part}" if args.data == "avss" else ""
    if log_path:
        log(f"eval {split}{part} ({weights} weights):\n{metrics.format_table(names, res)}",
            log_path)
        if binary:
            log(f"M_J {res['mj']:.4f} | M_F {res['mf']:.4f}", log_path)
        if res["twin_images"]:
            log(metrics.format_twins(res), log_path)
        if epoch:
            log(f"eval ep {epoch}: mIoU {100 * res['miou']:.2f} F-beta "
                f"{100 * res['mean_fbeta']:.2f} FDR {100 * res['mean_fdr']:.2f} "
                f"({time.time() - start:.1f} s)", log_path)
    return dict(split=split, weights=weights, **({"part": args.avss_part} if part else {}), **res)


@torch.no_grad()
def predict(args):
    """--predict: one image (any size) and one WAV through the --ckpt model, the image scaled to a
    long side of at most --max-size -> OUT/<stem>.png (image | prediction | attention, legend) and
    OUT/<stem>.json (predicted classes and their pixel shares at the image's size, the inputs);
    returns the JSON's content."""
    ckpt = load_checkpoint(args.ckpt)
    use_checkpoint_args(args, ckpt)
    device = init_distributed(args)[0]
    amp = not args.no_amp and native_bf16(device)
    # the scale the model was trained at: the built-in VPO's image size, else the crop
    max_size = args.max_size or ckpt["args"].get("image_size") or ckpt["args"]["crop"]
    image, rgb, size = data.read_rgb(args.predict, max_size)
    wave, note = data.load_predict_audio(args.audio, stereo=not args.mono, audio_pos=args.audio_pos)
    if note:
        print(f"note: {note}")
    names = class_names(ckpt["args"]["data"], ckpt["args"].get("s4_labels"))
    model = make_model(args, ckpt, ckpt["args"]["data"]).to(device).eval()
    del ckpt  # the optimiser state is not needed: freed before the photo-sized maps
    mel_fn = log_mel(args).to(device)
    # any H x W works: DeepLabV3+ resizes its high-level map to the 1/4 one and the logits to the
    # input
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits, _, attn = model(data.normalize(image[None].to(device)),
                                mel_fn(wave[None].to(device)))
    # to the image's size bilinearly on the logits, not nearest on the labels: borders fall where
    # the resized scores cross, at the image's resolution, instead of following the model's pixel
    # grid
    pred, colors = data.upsample_labels(logits[0].cpu(), size), data.class_colors(len(names))
    shown = data.shown_labels(pred, rgb.shape[:2])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "predict")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, os.path.splitext(os.path.basename(args.predict))[0])
    panels = [rgb, data.label_overlay(rgb, shown, colors),
              data.heatmap_overlay(rgb, attn[0].float())]
    data.save_panels(panels, ["image", "prediction", "attention"],
                     data.legend_for([pred], names, colors), stem + ".png")
    shares = data.class_shares(pred, names)
    res = dict(image=args.predict, audio=args.audio, audio_pos=args.audio_pos, audio_note=note,
               checkpoint=args.ckpt, height=size[0], width=size[1], max_size=max_size,
               model_size=list(image.shape[1:]),
               classes=list(shares), shares=shares, background=(pred == 0).float().mean().item())
    write_json(stem + ".json", res)
    for ext in (".png", ".json"):
        print(f"wrote {stem}{ext}")
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
        trained = ckpt["args"]["data"]
        if class_names(trained, args.s4_labels) != class_names(args.data, args.s4_labels):
            raise data.DataError(f"{args.resume or args.ckpt} was trained on --data {trained}, "
                                 f"whose classes differ from --data {args.data}")
    resolve_defaults(args, given)
    if args.resume:
        check_resume_args(args, ckpt)
    spec = DATASETS[args.data]
    num_classes = len(class_names(args.data, args.s4_labels))
    args.out = run_folder(args, world)
    seed_all(rank_seed(args.seed, rank))

    # AVSBench: selected on val, best.pt tested at the end; VPO has no val split (its "val" = test)
    val_split = "val" if spec["kind"] == "avs" else "test"
    sets, train_loader, eval_loaders = build_data(args, spec, val_split, rank, world, device)
    log_path = os.path.join(args.out, "log.txt") if main_rank else None
    if main_rank:
        os.makedirs(os.path.join(args.out, "overlays"), exist_ok=True)
        log_settings(args, world, device, amp, log_path)

    mel_fn = log_mel(args).to(device)
    model = make_model(args, ckpt, args.data).to(device)
    if args.eval_only:
        return run_eval_only(model, eval_loaders, mel_fn, device, amp, args, log_path)

    model, net = wrap_model(model, args, device, world, log_path)
    iters_per_epoch = len(train_loader)
    total = min(args.max_iters or math.inf, args.epochs * iters_per_epoch)
    optimizer, scheduler = make_optimizer(model, args, iters_per_epoch)
    criterion = Criterion(args, num_classes, mel_fn, device, amp, rank, world)
    # selected by M_J on AVSBench-Objects (as OpenNLPLab/AVSBench's S4 / MS3 trainers), else mIoU
    run = dict(iteration=0, epoch=0, best=-math.inf, metric="mj" if spec["binary"] else "miou",
               history=[])
    if ckpt:
        run = resume_run(ckpt, args.resume, optimizer, scheduler, criterion, run, rank, world,
                         log_path)
    meter = Meter(run["iteration"], total, world, ckpt.get("elapsed_s", 0.0) if ckpt else 0.0)
    res = run["history"][-1] if run["history"] else None  # a finished run keeps its final metrics
    for epoch in range(run["iteration"] // iters_per_epoch, args.epochs):
        if run["iteration"] >= total:
            break
        skip = (run["iteration"] - epoch * iters_per_epoch) * (args.batch_size // world)
        train_loader.sampler.set_epoch(epoch, skip)  # skip: a resume inside the epoch
        run["iteration"] = train_one_epoch(net, train_loader, optimizer, scheduler, criterion,
                                           meter, epoch, run["iteration"], args, log_path)
        run["epoch"] = run["iteration"] // iters_per_epoch
        stop = run["iteration"] >= total
        extra = dict(scheduler=scheduler.state_dict(), criterion=criterion.state_dict())
        if stop or (epoch + 1) % args.eval_every == 0:
            res = validate(model, eval_loaders, val_split, run, epoch, mel_fn, device, amp, world,
                           args, log_path)
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
        res = run_eval(model, eval_loaders, "test", "best", mel_fn, device, amp, args, log_path)
    write_metrics(main_rank, args, run, val_split, res, meter)
    if main_rank:
        log(f"done in {meter.elapsed():.0f} s; best {dict(miou='mIoU', mj='M_J')[run['metric']]} "
            f"{100 * run['best']:.2f}; run folder {args.out}", log_path)
    return res


def log_mel(args):
    """The audio front end: the centre --clip-ms of the 3 s -> clip / --mel-hop frames x --mel-bands
    (App. B.1: all 3 s, 300 x 64); AVSBench's 1 s comes repeat-padded to 3 s."""
    return data.LogMel(frames=args.clip_ms // args.mel_hop,
                       hop=data.SAMPLE_RATE // 1000 * args.mel_hop, bands=args.mel_bands,
                       centre=data.SAMPLE_RATE // 1000 * args.clip_ms)


def make_model(args, ckpt, dataset):
    """CAVPModel of the flags for `dataset`; with a checkpoint, its weights."""
    model = CAVPModel(args, len(class_names(dataset, args.s4_labels)))
    if ckpt:
        model.load_state_dict(ckpt["model"])
    return model


def build_data(args, spec, val_split, rank, world, device):
    """The datasets (--eval-only: test, with --eval-audio's audio) and their loaders."""
    sets = build_datasets(args, ["test"] if args.eval_only else
                          sorted({"train", val_split, "test"}))
    twin_idx = []
    if spec["kind"] == "vpo" and args.eval_audio == "real" and \
            data.attach_twins(sets["test"], args.coco_ann):
        twin_idx = sorted(sets["test"].twins)  # VPO-MSMI: images whose sounding object has twins
    if args.eval_only:
        sets["test"] = data.eval_audio_set(sets["test"], args.eval_audio, args.coco_ann, args.seed)
    return (sets, *build_loaders(args, sets, twin_idx, rank, world, device))


def validate(model, loaders, split, run, epoch, mel_fn, device, amp, world, args, log_path):
    """The evaluation after an epoch (of rank 0's weights), added to run["history"] and logged
    -> its metrics."""
    rank0_buffers(model, world)
    res = run_eval(model, loaders, split, "last", mel_fn, device, amp, args, log_path, epoch + 1)
    run["history"].append(dict(epoch=epoch + 1, iteration=run["iteration"], **res))
    return res


def log_settings(args, world, device, amp, log_path):
    """The run's first log lines: the command line, the settings, the ranks."""
    log(f"cavp: {' '.join(sys.argv[1:])}", log_path)
    log(f"settings: {json.dumps(vars(args), sort_keys=True)}", log_path)
    log(f"{world} rank(s) on {device}, bf16 autocast {amp}", log_path)


def run_eval_only(model, loaders, mel_fn, device, amp, args, log_path):
    """--eval-only: test --ckpt -> eval-<audio>.json (avss: eval-real-v1s.json for --avss-part v1s),
    never the training run's metrics.json; log_path is rank 0's."""
    res = run_eval(model, loaders, "test", args.ckpt, mel_fn, device, amp, args, log_path)
    if log_path:
        if args.eval_audio != "real":
            log(f"{args.eval_audio} audio: {100 * res['fg_pred']:.2f}% of the pixels segmented as "
                "a sounding object (false detections; 0 is right)", log_path)
        part = "" if args.avss_part == "all" else f"-{args.avss_part}"
        write_json(os.path.join(args.out, f"eval-{args.eval_audio}{part}.json"),
                   dict(args=vars(args), eval=res))
    return res


def make_optimizer(model, args, iters_per_epoch):
    """SGD with the head at --head-lr-mult, lr scaled linearly from batch 16, and the poly schedule
    over the epochs, stepped per iteration (App. B.1)."""
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if id(p) not in head_ids]
    lr = args.lr * args.batch_size / 16
    groups = [dict(params=rest, lr=lr), dict(params=head, lr=lr * args.head_lr_mult)]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    schedule = args.epochs * iters_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - min(it, schedule - 1) / schedule) ** args.poly_power)
    return optimizer, scheduler


def resume_run(ckpt, path, optimizer, scheduler, criterion, run, rank, world, log_path):
    """--resume: the checkpoint's optimiser, scheduler, criterion (bank, generator) and RNG states
    -> its run state (iteration, epoch, best, metric, history)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["extra"]["scheduler"])
    criterion.load_state_dict(ckpt["extra"]["criterion"])
    if len(ckpt["rng"]) == world:  # per-rank RNG states; another world size keeps fresh seeds
        set_rng_state(ckpt["rng"][rank])
    if log_path:
        log(f"resumed from {path} at epoch {ckpt['epoch']}, iteration {ckpt['iteration']}",
            log_path)
    return {key: ckpt[key] for key in run}


# ----------------------------------------------------------------------------- plumbing


def exit_on_error(e):
    """A DataError ends the run with its one line on stderr (exit 2), also written to torchrun's
    error file so that torchrun's failure report quotes it. A collective broken because another rank
    ended first waits for torchrun to stop this rank, without a traceback of its own, so the report
    names the rank that failed. Anything else is a bug: its traceback."""
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
    """Python, numpy, torch (and CUDA) RNG states as containers and tensors weights_only loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=pos,
                           has_gauss=has_gauss, gauss=gauss),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def native_bf16(device):
    """bf16 autocast pays on CUDA and CPUs with bf16 instructions; emulated, it is ~20x slower."""
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
    """--out; else the checkpoint's folder with --resume; else runs/cavp-<data>-s<seed>-<time>, rank
    0's on every rank."""
    if args.out is not None:
        if not (args.resume or args.eval_only or args.overwrite):
            data.check_new_run(args.out)
        return args.out
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    holder = [os.path.join("runs", f"cavp-{args.data}-s{args.seed}-{stamp}")]
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
    """One seed per (--seed, rank): each rank and its loader workers draw their own augmentation."""
    return seed * 1000003 + rank


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(args, splits):
    """split name -> dataset of --data (training augmentation and --crop on train only): VPO images,
    or AVSBench frames (data.AVSBenchFrames: one sample per labelled frame with its own second of
    audio, Sec. 5.1), val / test restricted to --avss-part."""
    spec, out = DATASETS[args.data], {}
    for split in splits:
        if spec["kind"] == "vpo":
            out[split] = data.VPODataset(
                args.data_root, spec["task"], split, audio_root=args.audio_root,
                stereo=not args.mono, train=split == "train", crop=args.crop, limit=args.limit,
                pan=args.pan)
        else:
            out[split] = data.AVSBenchFrames(
                args.data_root, spec["task"], split, size=args.resize or None, stereo=not args.mono,
                train=split == "train", crop=args.crop,
                labels=args.s4_labels if spec["task"] == "s4" else "binary",
                part="all" if split == "train" else args.avss_part, limit=args.limit)
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
    """The loaders, built once: train (EpochSampler, --batch-size split over the ranks, incomplete
    batches dropped; workers started per epoch) and one for the test split (exact shards, persistent
    workers; 'swap': its twins). Every loader has its own generator, seeded per rank (train: per
    rank and epoch), so loading never draws from the training RNG and each rank's workers draw
    their own augmentation. --resume from an epoch's end draws as the run would have; from inside
    an epoch (--max-iters) the rest of that epoch repeats the worker draws of its first batches
    (on other samples); --workers 0 resumes bit-exactly (the global RNG is checkpointed)."""
    def loader(dataset, batch_size, sampler=None):
        return torch.utils.data.DataLoader(
            dataset, batch_size, sampler=sampler, num_workers=args.workers,
            collate_fn=data.pad_collate, pin_memory=device.type == "cuda",
            worker_init_fn=data.worker_init, drop_last=sampler is not None,
            persistent_workers=args.workers > 0 and sampler is None,
            generator=torch.Generator().manual_seed(rank_seed(args.seed, rank)))
    subset = torch.utils.data.Subset
    evals = {split: loader(subset(ds, range(rank, len(ds), world)), args.eval_batch_size)
             for split, ds in sets.items() if split != "train"}
    if twin_idx and not args.mono:  # the twin metrics once more with the stereo cue reversed
        evals["swap"] = loader(subset(sets["test"], twin_idx[rank::world]), args.eval_batch_size)
    if "train" not in sets:
        return None, evals
    # (seed, epoch) -> seed * 100003 + epoch: no two seeds share an epoch's order
    sampler = EpochSampler(sets["train"], world, rank, shuffle=True, seed=args.seed * 100003,
                           drop_last=True)
    train = loader(sets["train"], args.batch_size // world, sampler)
    sampler.generator, sampler.worker_seed = train.generator, rank_seed(args.seed, rank)
    if len(train) == 0:
        raise data.DataError(f"{args.data} train split has {len(sets['train'])} samples, fewer "
                             f"than --batch-size {args.batch_size}: lower --batch-size or --limit")
    return train, evals


# taken from a checkpoint
CKPT_KEYS = ("backbone", "output_stride", "fusion", "attn", "heads", "pos_enc", "audio_conv1",
             "mono", "s4_labels", "clip_ms", "mel_hop", "mel_bands")
RELEASE_LOG_MEL = dict(clip_ms=3000, mel_hop=10, mel_bands=64)  # where a checkpoint names none


def load_checkpoint(path):
    """A last.pt / best.pt of this script (plain containers, read with weights_only=True); anything
    else, a missing file included, is a one-line DataError naming the file."""
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise data.DataError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                             "pass a last.pt/best.pt written by cavp.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != "cavp":
        by = f" (written by {ckpt['script']}.py)" if isinstance(ckpt, dict) and "script" in ckpt \
            else ""
        raise data.DataError(f"{path}: not a cavp.py checkpoint{by}; pass a last.pt/best.pt "
                             "written by cavp.py")
    ckpt["args"] = {**RELEASE_LOG_MEL, **ckpt["args"]}
    missing = [k for k in CKPT_KEYS if k not in ckpt["args"]] + \
        [k for k in ("criterion",) if k not in ckpt["extra"]]
    if missing:
        raise data.DataError(f"{path}: written by an older cavp.py (no {', '.join(missing)}); "
                             "train again, or use the cavp.py version that wrote it")
    if "visual.aspp.pool.2.running_mean" not in ckpt["model"]:  # image pooling without BatchNorm
        raise data.DataError(f"{path}: written by an earlier cavp.py whose DeepLabV3+ differs "
                             "(dilation, ASPP image pooling) and cannot be resumed or tested: "
                             "train again, or use the cavp.py version that wrote it")
    return ckpt


def use_checkpoint_args(args, ckpt):
    """The architecture flags come from the checkpoint, which also holds the weights; an AVSBench
    model is tested at the frame size it was trained at unless --resize says otherwise. -> the flags
    set (resolve_defaults keeps them)."""
    for key in CKPT_KEYS:  # load_checkpoint has checked that they are there
        setattr(args, key, ckpt["args"][key])
    args.pretrained = "none"
    if getattr(args, "resize", None) is None:
        args.resize = ckpt["args"]["resize"]
    return {*CKPT_KEYS, "pretrained"}


# run control and paths: they may differ on --resume
RESUME_FREE = ("out", "resume", "ckpt", "eval_only", "predict", "audio", "audio_pos", "max_size",
               "workers", "log_every", "eval_every", "save_every", "eval_batch_size", "overlays",
               "max_iters", "device", "no_amp", "compile", "data_root", "audio_root", "coco_ann",
               "pretrained", "eval_audio", "overwrite")


def check_resume_args(args, ckpt):
    """--resume continues the run that wrote the checkpoint: a method or data flag that differs from
    the run's (a default changed since included) is a one-line DataError, not a silently different
    run."""
    changed = [k for k, v in ckpt["args"].items()
               if k not in RESUME_FREE and getattr(args, k, v) != v]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {ckpt['args'][k]} (now {getattr(args, k)})"
                          for k in changed)
        raise data.DataError(f"{args.resume} was trained with {flags}: pass the run's flags (its "
                             "log.txt 'settings' line) or start a new run")


def save_checkpoint(path, model, optimizer, run, meter, args, extra, world):
    """Called on every rank (it gathers the per-rank RNG states); rank 0 passes the path and writes
    the model, optimiser, `run` (iteration, epoch, best, metric, history), the wall time so far
    (`meter`) and the method's `extra` state."""
    rngs = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(rngs, rngs[0])
    if path:
        save_atomic(dict(script="cavp", args=vars(args), model=model.state_dict(),
                         optimizer=optimizer.state_dict(), rng=rngs, extra=extra,
                         elapsed_s=meter.elapsed(), **run), path)


class Meter:
    """Loss parts summed on the device between log lines and read back (averaged over the ranks)
    only by line(), which every rank calls; images/s over training time only, the first step
    (warm-up) left out; ETA from the wall time since the start, evaluations included."""

    def __init__(self, iteration, total, world, elapsed):
        self.t0, self.start, self.total, self.world = time.time(), iteration, total, world
        self.before = elapsed
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
        if self.world > 1:  # a rank's loss is its share x the world size (Criterion): global mean
            dist.all_reduce(self.sums)
            self.sums /= self.world
        loss, *values = (self.sums / self.n).tolist()  # the one read-back from the device per line
        parts = dict(zip(self.names, values))
        eta = (time.time() - self.t0) / (iteration - self.start) * (self.total - iteration)
        text = (f"ep {epoch + 1}/{epochs} it {iteration}/{self.total} loss {loss:.4f} "
                f"({' '.join(f'{k} {v:.4f}' for k, v in parts.items())}) lr {lr:.2e} "
                f"{self.window_images / max(self.window_s, 1e-9):.1f} img/s "
                f"eta {eta // 3600:.0f}:{eta % 3600 // 60:02.0f}:{eta % 60:02.0f}")
        self.sums, self.n, self.window_s, self.window_images = None, 0, 0.0, 0
        return text

    def elapsed(self):
        """Wall time of the run: this process's and, after --resume, the earlier processes'."""
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
