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
    python cavp.py --data avsbench_s4 --data-root /path/to/AVSBench      # Tables 1-2: 224 x 224, M_J / M_F
    python cavp.py --data avss --data-root /path/to/AVSBench             # Table 3: original resolution

Defaults are the paper's recipe (App. B.1: DeepLabV3+ on ResNet-50, SGD 0.9 / 5e-4,
lr 1e-3 for batch 16, poly 0.9, 80 epochs, crop 512). On the built-in synthetic VPO
(written by `vpo_make.py --synthetic`) the backbone, weights, crop and lr default to
CPU-sized settings instead; every such default is listed in `--help`.

AVSBench (Sec. 5.1; frames are the samples, each with its own second of audio): S4 / MS3 frames resized to
224 x 224 (Tables 1-2, binary labels, also M_J / M_F), AVSBench-Semantics at original resolution (Table 3;
--resize 224 for its Tables 1-2 column). The model is selected on val during training and best.pt is tested on
test at the end; VPO has no val split (the release's "val" is the test set), so it is evaluated on test.
"""
import argparse
import functools
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

# --data -> reader, subset / task; AVSBench: the frame size of the paper's protocol (Sec. 5.1: resized to
# 224 x 224 for Tables 1-2; AVSBench-Semantics at original resolution, 0, for Table 3 and Table 5) and whether it
# is evaluated with binary labels (AVSBench-Objects, Tables 1-2)
DATASETS = {
    "vpo_ss": dict(kind="vpo", task="ss", binary=False), "vpo_ms": dict(kind="vpo", task="ms", binary=False),
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
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--data", default="vpo_msmi", choices=list(DATASETS),
      help="VPO subset (Sec. 3), AVSBench-Objects S4 / MS3 (Tables 1-2) or AVSBench-Semantics (Tables 1-3, 5)")
    a("--data-root", default="data",
      help="VPO: folder holding VPO-SS/, VPO-MS/, VPO-MSMI/ (and audio/); AVSBench: folder with Single-source/, "
           "Multi-sources/ or AVSBench-semantic/")
    a("--audio-root", default=None, help="VPO: folder of {vgg_file}.wav clips (default: DATA_ROOT/audio)")
    a("--mono", dest="mono", action="store_true", default=None,
      help="mono audio, channels averaged (Fig. 7 / Table 8 ablation on VPO; the default on AVSBench, whose clips "
           "carry no source positions and which the released code reads as mono)")
    a("--stereo", dest="mono", action="store_false",
      help="stereo audio (the default on VPO); on AVSBench the WAV's first two channels (a mono WAV twice)")
    a("--resize", type=int, default=None,
      help="AVSBench: frames and masks resized to RESIZE x RESIZE, 0 = original resolution (default: 224 for "
           "avsbench_s4 / avsbench_ms3 as Tables 1-2, 0 for avss as Table 3; --resize 224 for avss in Tables 1-2)")
    a("--pan", default="csv", choices=["csv", "crop"],
      help="VPO training: pan each source at the CSV audio_pos, mirrored on a flip (csv, the released behaviour and "
           "the default, README 'Stereo vs mono at 4,096 iterations'), or at its object's centre of mass as "
           "moved by the flip, scale and crop, clamped to [0, 1] (crop, issue 19)")
    a("--crop", type=int, default=None,
      help="training crop size (default: 512 as App. B.1; AVSBench resized: the frame size; built-in VPO: its "
           "image size)")
    a("--s4-labels", default=None, choices=["category", "binary"],
      help="avsbench_s4 training classes: the clip's CSV category at the sounding pixels and as the audio class of "
           "Eq. (1)-(3) (category, the default: re-pairs of different categories are negatives), or binary with "
           "one audio class for all clips (binary, as the released code: every re-pair matches); evaluation is "
           "binary (Tables 1-2) either way")
    a("--avss-part", default="all", choices=list(data.AVSS_PARTS),
      help="avss: evaluate on the frames of one release part only: v1s (single source) or v1m (multi-source), "
           "Table 3's SS / MS columns, or v2; training always uses the whole train split (Table 3)")
    a("--limit", type=int, default=None, help="use only the first N samples of each split (quick checks)")
    a("--workers", type=int, default=None,
      help="data loader worker processes per rank (default 7: one worker makes ~49 VPO training samples/s at "
           "crop 512 on one CPU core, collate included (benchmarks/loader.py); a GPU training at ~300 img/s (an "
           "H100 at crop 512, issue 20) needs 300 / 49 = 6.1 -> 7; README 'Loader speed'; built-in VPO: 2, as "
           "the CPU that trains also loads)")
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
    a("--pos-enc", default="none", choices=["none", "sine"],
      help="position code added to f_CA's visual queries: none (the paper and the default; the released code "
           "allocates one but never adds it) or a fixed 2-D sinusoidal code as the Transformer attention the paper "
           "builds on (sine, ref. [55]). f_CA has one audio token, so a pixel can prefer one side of the image for a "
           "sound only if its query knows where the pixel is: sine makes the side learnable sooner in README "
           "'Stereo mechanism probe', but costs mIoU on VPO-MSMI with --pan crop, README 'Stereo vs mono at 4,096 "
           "iterations'")
    a("--audio-conv1", default="split", choices=["split", "mean"],
      help="stereo audio conv1 at init: one filter on L + R plus a fresh one on L - R, so the encoder starts "
           "with sight of the side (split), or one filter shared by both channels, an encoder blind to the side "
           "at init (mean: the ImageNet filter averaged over RGB with --pretrained imagenet, as before issue 19; "
           "the fresh filter averaged over channels otherwise); mono is the same either way")
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
    a("--no-amp", action="store_true",
      help="disable bf16 autocast (default: on for CUDA and for CPUs with native bf16, AVX512-BF16 / AMX; "
           "other CPUs emulate it about 20x slower, so they run fp32)")
    a("--compile", action="store_true",
      help="torch.compile the image encoder (off by default: measure it on your GPU first; no gain on CPU)")
    a("--out", default=None, help="run folder (default: runs/cavp-<data>-s<seed>-<time>)")
    a("--resume", default=None, help="continue training from this checkpoint (e.g. runs/x/last.pt)")
    a("--overwrite", action="store_true",
      help="let a new training run replace the run in --out (its last.pt, best.pt, metrics.json; log.txt "
           "is appended to); without it such an --out is an error")
    a("--eval-only", action="store_true", help="only evaluate --ckpt on the test split")
    a("--ckpt", default=None, help="checkpoint to evaluate with --eval-only or to run with --predict")
    a("--eval-audio", default="real", choices=data.EVAL_AUDIO,
      help="with --eval-only: test with the real audio, silence, or a clip of a class absent from the image; "
           "the last two make the target all background, so fg_pred is the false-detection rate")
    a("--coco-ann", default=None,
      help="COCO instances JSON of the test images, for --eval-audio absent (default: the built-in VPO's "
           "DATA_ROOT/sources/coco/annotations/instances_val2017.json)")
    a("--eval-every", type=int, default=None,
      help="evaluate every N epochs (and after the last) (default: 5; built-in VPO: 20, so that README's 80-epoch "
           "demo spends under 10 %% of its time evaluating)")
    a("--eval-batch-size", type=int, default=None,
      help="test batch size per rank (default: 1 as App. B.1, original resolution; AVSBench resized and built-in "
           "VPO: 16, one frame size, so the batch does not change the result)")
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
    a("--max-size", type=int, default=None, metavar="PX",
      help="with --predict: run the model on the image scaled to a long side of at most PX (aspect kept, never "
           "enlarged) and resize the prediction to the image's own size, so a phone photo takes seconds and little "
           "memory (default: the crop the checkpoint was trained at, 512 for the paper's recipe, the image size "
           "for the built-in VPO)")
    args = p.parse_args(argv)
    if args.predict and not (args.ckpt and args.audio):
        p.error("--predict needs --ckpt PATH and --audio WAV")
    if (args.audio or args.audio_pos is not None or args.max_size is not None) and not args.predict:
        p.error("--audio, --audio-pos and --max-size are for --predict IMAGE")
    if args.predict and (args.eval_only or args.resume):
        p.error("--predict excludes --eval-only and --resume")
    if args.eval_only and not args.ckpt:
        p.error("--eval-only needs --ckpt PATH")
    if args.eval_audio != "real" and not args.eval_only:
        p.error(f"--eval-audio {args.eval_audio} is for --eval-only")
    vpo = DATASETS[args.data]["kind"] == "vpo"
    if args.eval_audio != "real" and not vpo:
        p.error(f"--eval-audio {args.eval_audio} is for --eval-only on a VPO --data")
    if args.match == "side" and not vpo:
        p.error("--match side compares VPO's source positions; AVSBench has none: use --match class")
    if args.resize is not None and (vpo or args.resize < 0):
        p.error("--resize is for AVSBench --data (>= 0, 0 = original resolution); VPO trains on --crop")
    if args.s4_labels and args.data != "avsbench_s4":
        p.error("--s4-labels is for --data avsbench_s4")
    if args.avss_part != "all" and args.data != "avss":
        p.error("--avss-part is for --data avss")
    for flag in ("epochs", "batch_size", "eval_every", "log_every", "bank_size", "anchors_per_group",
                 "eval_batch_size", "max_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 <= args.pos_share <= 1:
        p.error("--pos-share must be in [0, 1]")
    if args.pos_enc != "none" and args.fusion != "ca":
        p.error(f"--pos-enc {args.pos_enc} codes f_CA's visual queries: use --fusion ca or --pos-enc none")
    if args.match == "side" and args.mono:
        p.error("--match side compares stereo positions: drop --mono or use --match class")
    return args


# ----------------------------------------------------------------------------- defaults


PAPER = dict(backbone="resnet50", pretrained="imagenet", output_stride=8, crop=512, lr=1e-3, anchors_per_group=512,
             eval_batch_size=1, eval_every=5, workers=7)
# built-in VPO on a CPU: fixed-size 64 px images (crop = image size, so any eval batch size gives the same
# result), trained from scratch; fewer anchors for 1/64 of the paper's crop area; one evaluation (450 images
# with the L/R-swapped twins) costs about as much as 1.3 training epochs, so 4 in 80 epochs
BUILTIN = dict(backbone="resnet18", pretrained="none", output_stride=16, crop=None, lr=1e-2, anchors_per_group=128,
               eval_batch_size=16, eval_every=20, workers=2)
# taken from a checkpoint
CKPT_KEYS = ("backbone", "output_stride", "fusion", "attn", "heads", "pos_enc", "audio_conv1", "mono", "s4_labels")


def resolve_defaults(args):
    """Fill the flags left at None with the paper's values, or CPU-sized ones on the built-in VPO. AVSBench: the
    App. B.1 recipe on its protocol's frames (--resize), crop = the resized frame (512 at original resolution),
    mono (the released AVSBench loaders average the channels), S4 trained with its categories."""
    spec, defaults, args.builtin = DATASETS[args.data], PAPER, False
    if spec["kind"] == "avs":
        args.resize = spec["resize"] if args.resize is None else args.resize
        args.mono = True if args.mono is None else args.mono
        args.s4_labels = args.s4_labels or ("category" if args.data == "avsbench_s4" else None)
        defaults = dict(PAPER, crop=args.resize or PAPER["crop"], eval_batch_size=16 if args.resize else 1)
    args.mono = bool(args.mono)
    summary = os.path.join(args.data_root, "vpo_summary.json")
    if spec["kind"] == "vpo" and os.path.isfile(summary):
        with open(summary) as f:
            info = json.load(f)
        if info.get("synthetic"):
            defaults, args.builtin = dict(BUILTIN, crop=int(info["image_size"])), True
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def class_names(dataset, s4_labels=None):
    """The model's classes for a --data: VPO's 22, or data.avs_classes (S4: background + its 23 categories, or
    binary with --s4-labels binary; MS3 binary; AVSS its 71)."""
    spec = DATASETS[dataset]
    if spec["kind"] == "vpo":
        return data.VPO_CLASSES
    return data.avs_classes(spec["task"], (s4_labels or "binary") if spec["task"] == "s4" else "binary")


# ----------------------------------------------------------------------------- model


def load_backbone_weights(net, name, pretrained):
    """ImageNet weights via torchvision's weights API (under torchrun rank 0 downloads them into the cache
    while the other ranks wait, then they read it), or a local state dict."""
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
                f"could not download ImageNet weights for {name} ({type(e).__name__}; offline?): fetch "
                f"{weights.url} elsewhere and pass --pretrained PATH, or train from scratch with --pretrained none")
        if dist.is_initialized() and not waits:
            dist.barrier()
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
    """ResNet-18 on the log-mel (1 channel mono, 2 stereo), global max pool, FC 512 -> dim (SPEC 1.3).

    conv1 of a stereo encoder, seen as a filter s on L + R and a filter d on L - R (weights s + d on L,
    s - d on R): s is ImageNet's conv1 averaged over RGB (--pretrained imagenet) or the fresh filter's
    mean over the channels, d half the fresh filter's difference between them. conv1 "split" keeps d, "mean"
    drops it (d = 0: L and R swapped give the same embedding at init). The log-mel of a source panned at
    alpha differs between L and R by the constant 20 log10((1 - alpha) / alpha) / 50 (data.LogMel), so the
    side reaches the network through d only.
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
            # The released code replaces conv1 by a fresh conv (SPEC 4), dropping ImageNet's filter on the
            # content; here ImageNet's filter stays on L + R, which bn1 and layer1 were trained after, and the
            # fresh d, scaled per filter to the norm of ImageNet's, adds the side at the same strength.
            s = rgb.mean(1, keepdim=True)
            d = d * s.norm(dim=(2, 3), keepdim=True) / d.norm(dim=(2, 3), keepdim=True).clamp(min=1e-12)
        net.conv1.weight.data = (s + d if conv1 == "split" else s.expand_as(fresh)).contiguous()
        net.fc = nn.Linear(512, dim)
        self.net = net

    def forward(self, mel):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(mel))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return n.fc(torch.amax(x, dim=(2, 3)))


def sine_position_code(h, w, dim, temperature=10000.0, device=None):
    """Fixed 2-D sinusoidal position code of an h x w token grid -> (h*w, dim), rows first (DETR-style
    2-D form of the Transformer's code, ref. [55]).

    Token (r, c) sits at y = 2 pi (r + 1/2) / h, x = 2 pi (c + 1/2) / w: pixel centres normalised to the
    image, so a map of any size gets the same code at the same relative place, and a horizontal flip
    maps x to 2 pi - x. With F = dim / 4 frequencies w_i = T^(-i/F), i = 0..F-1, T = `temperature`:
        p[2i] = sin(w_i y),          p[2i + 1] = cos(w_i y),           (first dim/2 channels: y)
        p[dim/2 + 2i] = sin(w_i x),  p[dim/2 + 2i + 1] = cos(w_i x)    (last dim/2 channels: x)
    dim must be a multiple of 4: f_CA's 304 = 4 x 76 gives 152 channels per axis, 76 frequencies each.
    """
    if dim % 4:
        raise ValueError(f"sine position code: dim {dim} is not a multiple of 4 (sin/cos pairs for y and x)")
    f = dim // 4
    freq = temperature ** (-torch.arange(f, device=device) / f)

    def axis(n):  # (n, 2F): sin / cos interleaved, at the n pixel centres scaled to (0, 2 pi)
        a = (2 * math.pi * (torch.arange(n, device=device) + 0.5) / n)[:, None] * freq
        return torch.stack([a.sin(), a.cos()], -1).flatten(1)
    py, px = axis(h)[:, None].expand(h, w, 2 * f), axis(w)[None].expand(h, w, 2 * f)
    return torch.cat([py, px], -1).reshape(h * w, dim)


class CrossAttention(nn.Module):
    """f_CA(u_v, u_a) = u_v + f_MHA(u_v, u_a, u_a): visual query, audio key/value (Sec. 4.1).

    The audio is one token, so the attention activation acts over the pixels of each head's map:
    sigmoid (the paper's choice), softmax over the H*W positions, or min-max normalisation (Fig. 6).
    pos_enc "sine": the query of pixel n is W_q (LN(u_v)_n + p_n) with p = sine_position_code; keys,
    values and the residual u_v carry no position (as DETR adds the code to queries and keys only, and
    the key here is the audio), so position acts only through the attention a pixel gives the sound.
    """

    def __init__(self, dim, heads, attn, pos_enc="none"):
        super().__init__()
        self.heads, self.attn, self.pos_enc = heads, attn, pos_enc
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

    def forward(self, u_v, u_a, size):
        """u_v (B, N, D) visual tokens of an h x w grid (size), u_a (B, D) audio -> fused z (B, N, D),
        attention map (B, N)."""
        b, n, d = u_v.shape
        u_v = self.visual_mlp(u_v)
        qv, ka = self.norm(u_v), self.norm(u_a)
        if self.pos_enc == "sine":
            qv = qv + sine_position_code(*size, d, device=qv.device).to(qv.dtype)
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

    def forward(self, u_v, u_a, size=None):
        """As CrossAttention.forward; size is not used (no position code)."""
        out, w = self.mha(u_a[:, None], u_v, u_v)                        # audio query, softmax over pixels
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
            nn.Conv2d(dim, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1))

    def forward(self, image, mel, pair=None):
        """image (B,3,H,W), mel (B,C,T,F) -> logits (B,K,H,W), fused features z (B,D,h,w), attention (B,h,w).

        Eq. (1): with 2B audio embeddings (2B clips, or `pair` mapping the embeddings of the clips to 2B,
        see pair_embeddings), image i is fused with embedding i and again with embedding B + i (its
        re-pair): z and the attention maps hold the B pairs then the B re-pairs. Image features and clips
        are encoded once; the classifier runs on the original pairs only, the only ones with a CE term (Eq. 5).
        """
        feat = self.visual(image)
        b, d, h, w = feat.shape
        tokens = feat.flatten(2).transpose(1, 2)
        u_a = self.audio(mel)
        u_a = pair(u_a) if pair is not None else u_a
        z, attn = self.fusion(tokens.repeat(u_a.shape[0] // b, 1, 1), u_a, (h, w))
        z = z.transpose(1, 2).reshape(-1, d, h, w)
        logits = F.interpolate(self.classifier(z[:b]), size=image.shape[2:], mode="bilinear", align_corners=False)
        return logits, z, attn.reshape(-1, h, w)


# ----------------------------------------------------------------------------- loss (Eq. 1-5)
#
# Every choice of Eq. (1)-(4) (re-pairs, bank clips, anchor sets and their sampling) is made on the host from
# the labels of the whole global batch, with one generator seeded alike on every rank; the device only
# computes features and the loss at the chosen indices. So a step never waits for the device, and
# --batch-size 16 is the same method on 1 or 8 ranks: the ranks exchange their labels (host), clips (device)
# and sampled anchor features (device, gradients flowing back to the rank that owns them).


def h2d(x, device):
    """Host -> device copy that does not wait for the device."""
    return x.to(device, non_blocking=True)


def gather(x, group=None):
    """x of every rank concatenated along dim 0, in rank order (x itself on one rank); no gradient."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out)


class GatherWithGrad(torch.autograd.Function):
    """gather() whose backward sums the gradients of every rank's loss and keeps this rank's slice (the
    multi-GPU SupCon pattern), so one rank's loss may use the features of all ranks."""

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


class WaveBank:
    """Per-class FIFO of raw mono waveforms from single-source samples (App. B.1). The counts live on the
    host and the waveforms on the device, the same on every rank (it stores the clips of the global batch)."""

    def __init__(self, num_classes, size, length, device):
        self.size = size
        self.waves = torch.zeros(num_classes * size, length, device=device)  # row c * size + slot
        self.count = torch.zeros(num_classes, dtype=torch.long)

    def push(self, wave, audio_classes, audio_pos):
        """Store the clips of wave (B, C, N) (device) whose sample is single-source (audio_pos >= 0; host
        labels); L + R gives back the mono clip."""
        rows = {}
        for i in torch.nonzero(audio_pos >= 0).flatten().tolist():
            c = int(audio_classes[i].argmax())
            rows[c * self.size + int(self.count[c]) % self.size] = i  # FIFO: a later clip overwrites
            self.count[c] += 1
        if rows:
            dst, src = (h2d(torch.tensor(list(v)), wave.device) for v in (rows, rows.values()))
            self.waves[dst] = wave[src].sum(1).to(self.waves.dtype)

    def draw(self, c, gen=None):
        """The bank row of a random stored waveform of class c, or None when the class has none yet."""
        n = min(int(self.count[c]), self.size)
        return c * self.size + int(torch.randint(n, (), generator=gen)) if n else None

    def clips(self, choice, pos, stereo):
        """choice (b, K) bank rows (-1: none) and pos (b, K) positions (host) -> (b, C, N) on the device: the
        chosen clips of each row, each panned at its position (data.pan), summed."""
        gains = torch.zeros(2 if stereo else 1, choice.shape[0], self.waves.shape[0])
        for i, c in torch.nonzero(choice >= 0).tolist():
            gains[:, i, choice[i, c]] += torch.tensor([1 - pos[i, c], pos[i, c]]) if stereo else 1.0
        return torch.einsum("cbr,rn->bcn", h2d(gains, self.waves.device), self.waves)

    def state_dict(self):
        return dict(waves=self.waves, count=self.count)

    def load_state_dict(self, state):
        self.waves.copy_(state["waves"])
        self.count.copy_(state["count"])


def derangement(n, gen=None):
    """A uniform random permutation of n >= 2 without a fixed point (rejection; ~e draws): no image is
    re-paired with its own audio in Eq. (1)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        if n < 2 or not (perm == torch.arange(n)).any():
            return perm


def repair(labels, bank, pos_share, use_bank, gen=None, bank_sources="single", match_side=False):
    """Eq. (1) on the host labels of the global batch (audio_classes (B,K), audio_pos (B,), source_pos (B,K)):
    image i is re-paired with the audio of image perm[i], a derangement. The re-pair matches when the
    audio's class set is the image's; with match_side, also each class must sound from the half of the
    image (left / right of the centre) where its object is (`wrong_side` (B,K) marks the shared classes that
    do not). A share of the mismatched re-pairs instead gets bank audio of the image's own classes, each
    clip panned at its object's position (App. B): single-source images only, or every image with
    bank_sources 'all'. Returns perm, choice (B,K) (the bank row per class of such a re-pair, -1 elsewhere),
    the re-paired audio classes, the match flags and wrong_side.

    The released stereo trainer computes this replacement and then discards it; here it is used.
    """
    t, pos, src = labels["audio_classes"], labels["audio_pos"], labels["source_pos"]
    b = t.shape[0]
    perm = derangement(b, gen)
    t2 = t[perm].clone()
    wrong_side = (t > 0) & (t2 > 0) & ((src >= 0.5) != (src[perm] >= 0.5)) if match_side else t2 < 0
    match = (t2 == t).all(1) & ~wrong_side.any(1)
    choice = torch.full(t.shape, -1, dtype=torch.long)
    if use_bank:
        share = torch.rand(b, generator=gen)  # one draw per re-pair
        for i in torch.nonzero(~match).flatten().tolist():
            if (pos[i] < 0 and bank_sources == "single") or share[i] >= pos_share:
                continue
            classes = torch.nonzero(t[i]).flatten().tolist()
            rows = [bank.draw(c, gen) for c in classes]
            if None in rows:
                continue
            choice[i, classes] = torch.tensor(rows)
            t2[i], match[i], wrong_side[i] = t[i], True, False
    return perm, choice, t2, match, wrong_side


def pair_embeddings(u_a, perm, banked, world):
    """Eq. (1) on audio embeddings. u_a (b + k, D): this rank's b clips, then the k bank clips of its re-pairs
    `banked`; perm (b,): the global-batch clip of each of this rank's re-pairs. Returns (2b, D): the b pairs,
    then the b re-pairs, whose embeddings come from any rank (gathered with gradients) or from the bank."""
    b = perm.shape[0]
    every = GatherWithGrad.apply(u_a[:b].float()) if world > 1 else u_a[:b]
    return torch.cat([u_a[:b], every[perm].to(u_a.dtype).index_copy(0, banked, u_a[b:])])


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


def sample_groups(keys, cap, gen=None):
    """Indices of at most `cap` random members of every group (uniform within a group)."""
    order = torch.randperm(keys.numel(), generator=gen)
    k, sort = torch.sort(keys[order], stable=True)
    order = order[sort]
    rank = torch.arange(k.numel()) - torch.searchsorted(k, k, right=False)
    return order[rank < cap]


def plan_anchors(y, t, match, mode, cap, gen=None, positives="set", unknown="mismatched", bg_groups="label",
                 wrong_side=None):
    """The anchors of Eq. (2)-(3), on the host: y (N,P) labels of the N pairs at feature resolution.
    Returns the sampled pixels idx (A,) (pair * P + pixel), whether each is foreground and its key (a
    foreground anchor's positives are the foreground anchors with its key; a background anchor's, the
    background anchors), and how many anchors have a positive (Eq. (4) averages over those).

    mode 'cavp': anchors from E_fg and E_bg (E_unknown never used; see anchor_sets for `unknown` and
    `wrong_side`), foreground sampled per (audio set, visual label) group so hard negatives (same
    audio / other label, other audio / same label) are always present, background per label or as
    one group (`bg_groups`); the key of a foreground anchor is its (audio set, label) (positives 'set',
    the literal 'same t') or its label under any audio set (positives 'label'). mode 'supcon': the
    released code's uniform sampling per segmentation label (object pixels of mismatched re-pairs
    relabelled background), every anchor keyed by its label."""
    if mode == "supcon":
        label = torch.where(match[:, None] | (y == 255), y, 0).flatten()
        idx = sample_groups(torch.where(label == 255, -1, label), cap, gen)
        idx = idx[label[idx] != 255]
        fg, key = torch.ones(idx.numel(), dtype=torch.bool), label[idx]
    else:
        fg, _, bg = (m.flatten() for m in anchor_sets(y, t, match, unknown, wrong_side))  # Eq. (2)
        audio_id = torch.unique(t, dim=0, return_inverse=True)[1][:, None].expand_as(y).flatten()
        label = y.flatten()
        group = torch.where(fg, audio_id * t.shape[1] + label, -1 - label if bg_groups == "label" else -1)
        idx = sample_groups(torch.where(fg | bg, group, torch.iinfo(group.dtype).min), cap, gen)
        idx = idx[(fg | bg)[idx]]
        fg, key = fg[idx], (group if positives == "set" else label)[idx]
    counts = torch.unique(torch.where(fg, key, -1), return_inverse=True, return_counts=True)
    kept = int((counts[2][counts[1]] > 1).sum())  # anchors with another member of their positive set
    return idx, fg, key, kept


def info_nce(za, zc, pos, neg, tau):
    """Eq. (4) summed over the anchors za (R,D) against the candidates zc (A,D) (pos / neg (R,A) masks):
    per anchor the mean over positives p of -log(e^{z.z_p/tau} / (e^{z.z_p/tau} + sum_n e^{z.z_n/tau}));
    an anchor without positives adds 0."""
    s = za @ zc.T / tau
    s = s - s.amax(1, keepdim=True).detach()
    neg_sum = (s.exp() * neg).sum(1, keepdim=True)
    log_prob = s - torch.log(s.exp() + neg_sum)
    return (-(log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)).sum()


def contrastive_loss(z, y, t, match, mode, tau, cap, positives="set", unknown="mismatched", bg_groups="label",
                     wrong_side=None, gen=None, rank=0, world=1):
    """Contrastive term of Eq. (5): the mean of Eq. (4) over the anchors of plan_anchors, taken over the
    pairs of the whole global batch. z (2b,D,h,w): this rank's fused features, its b pairs then its b
    re-pairs; y (2B,H,W) labels (nearest-downsampled to h x w, SPEC 4), t (2B,K), match (2B,) and
    wrong_side (2B,K): host labels of the global batch, its B pairs then its B re-pairs, ranks in order.
    A rank computes the rows of its own anchors against every sampled anchor and returns its share
    scaled by `world`, so that DDP's gradient average gives the gradient of the global mean."""
    n, d, h, w = z.shape
    y = F.interpolate(y[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().flatten(1)
    idx, fg, key, kept = plan_anchors(y, t, match, mode, cap, gen, positives, unknown, bg_groups, wrong_side)
    b, big_b = n // 2, y.shape[0] // 2
    pair, pixel = idx // (h * w), idx % (h * w)
    owner = pair % big_b // b
    local = (pair // big_b * b + pair % big_b % b) * h * w + pixel  # index in the owner's z
    mine = torch.nonzero(owner == rank).flatten()
    per_rank = torch.bincount(owner, minlength=world)
    width = int(per_rank.max()) if idx.numel() else 0
    slot = (F.one_hot(owner, world).cumsum(0) - 1).gather(1, owner[:, None])[:, 0]  # place among its rank's
    take = torch.zeros(width, dtype=torch.long)
    take[:mine.numel()] = local[mine]
    feats = F.normalize(z.float().flatten(2).transpose(1, 2).reshape(-1, d)[h2d(take, z.device)], dim=-1)
    if world > 1:
        feats = GatherWithGrad.apply(feats)
    if kept == 0:
        return z.sum() * 0
    zc = feats[h2d(owner * width + slot, z.device)]                                     # every anchor
    fg, key, mine = (h2d(x, z.device) for x in (fg, key, mine))
    same = fg[None, :] & (key[mine, None] == key[None, :])                              # P^fg: same t, same y
    eye = mine[:, None] == torch.arange(idx.numel(), device=z.device)[None, :]
    pos = torch.where(fg[mine, None], same, ~fg[None, :]) & ~eye                        # Eq. (3), P^bg = E_bg
    neg = torch.where(fg[mine, None], ~same, fg[None, :])                               # N_hard + N_easy, N^bg = E_fg
    return info_nce(zc[mine], zc, pos, neg, tau) * world / max(kept, 1)


class Criterion:
    """Eq. (5) on one training batch: CE on the original pairs plus the contrastive term (Eq. 1-4) on the
    pairs and their re-pairs -> this rank's loss (scaled so that DDP's gradient average is the gradient
    of the global batch's loss), its parts. Holds the memory bank (App. B.1) and the generator of the
    re-pairs and anchors, alike on every rank."""

    def __init__(self, args, num_classes, mel_fn, device, amp, rank, world):
        self.args, self.mel_fn, self.device, self.amp, self.rank, self.world = args, mel_fn, device, amp, rank, world
        self.bank = WaveBank(num_classes, args.bank_size, 48000, device)
        self.gen = torch.Generator().manual_seed(args.seed)
        # labels travel between ranks on the host: the default group where it is gloo, a gloo group beside nccl
        self.host_group = dist.new_group(backend="gloo") if world > 1 and device.type == "cuda" else None

    def state_dict(self):
        return dict(bank=self.bank.state_dict(), generator=self.gen.get_state())

    def load_state_dict(self, state):
        self.bank.load_state_dict(state["bank"])
        self.gen.set_state(state["generator"])

    def __call__(self, net, batch, epoch):
        args, device, b, k = self.args, self.device, batch["image"].shape[0], batch["audio_classes"].shape[1]
        image, mask, waves = (h2d(batch[key], device) for key in ("image", "mask", "wave"))
        packed = gather(torch.cat([batch["audio_classes"], batch["audio_pos"][:, None], batch["source_pos"],
                                   (batch["mask"] != 255).flatten(1).sum(1, keepdim=True).float()], 1),
                        self.host_group)
        labels = dict(audio_classes=packed[:, :k], audio_pos=packed[:, k], source_pos=packed[:, k + 1:2 * k + 1])
        pair = None
        if args.contrast != "none":
            perm, choice, t2, match2, side2 = repair(labels, self.bank, args.pos_share, epoch >= 1, self.gen,
                                                     args.bank_sources, args.match == "side")  # Eq. (1), App. B
            own = slice(self.rank * b, (self.rank + 1) * b)
            banked = torch.nonzero((choice[own] >= 0).any(1)).flatten()  # this rank's re-pairs with bank audio
            clips = waves
            if banked.numel():
                waves = torch.cat([waves, self.bank.clips(choice[own][banked], labels["source_pos"][own][banked],
                                                          waves.shape[1] == 2)])
            # the bank takes the batch's clips after Eq. (1) and its draws: no image gets its own clip back
            self.bank.push(gather(clips), labels["audio_classes"], labels["audio_pos"])
            pair = functools.partial(pair_embeddings, perm=h2d(perm[own], device), banked=h2d(banked, device),
                                     world=self.world)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, z, _ = net(image, self.mel_fn(waves), pair)
        # Eq. (5), CE on the original pairs: a sum over this rank's pixels / the labelled pixels of all ranks
        loss_ce = F.cross_entropy(logits.float(), mask, ignore_index=255, reduction="sum") * self.world / max(
            float(packed[:, -1].sum()), 1.0)
        loss_cp = torch.zeros((), device=device)
        if args.contrast != "none":
            y = gather(F.interpolate(batch["mask"][:, None].float(), size=z.shape[2:], mode="nearest")[:, 0].long(),
                       self.host_group)
            t = torch.cat([labels["audio_classes"], t2]).long()
            match = torch.cat([torch.ones(len(perm), dtype=torch.bool), match2])
            loss_cp = contrastive_loss(z, torch.cat([y, y]), t, match, args.contrast, args.tau,
                                       args.anchors_per_group, args.positives, args.unknown, args.bg_groups,
                                       torch.cat([torch.zeros_like(side2), side2]), self.gen, self.rank,
                                       self.world)  # Eq. (2)-(4)
        return loss_ce + loss_cp, dict(ce=loss_ce, cp=loss_cp)  # Eq. (5)


# ----------------------------------------------------------------------------- run helpers


def exit_on_error(e):
    """A DataError ends the run with its one line on stderr (exit 2), also written to torchrun's error file
    so that torchrun's failure report quotes it. A collective broken because another rank ended first waits
    for torchrun to stop this rank, without a traceback of its own, so the report names the rank that failed.
    Anything else is a bug: its traceback."""
    if isinstance(e, data.DataError):
        print(f"error: {e}", file=sys.stderr)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            write_json(os.environ["TORCHELASTIC_ERROR_FILE"], dict(message=dict(
                message=f"error: {e}", extraInfo=dict(py_callstack=f"error: {e}", timestamp=str(int(time.time()))))))
        sys.exit(2)
    if dist.is_initialized() and (isinstance(e, dist.DistError) or "by peer" in str(e)):
        time.sleep(60)
        print(f"error: rank {dist.get_rank()}: {str(e).splitlines()[0]} (did another rank fail?)", file=sys.stderr)
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
        raise data.DataError(f"--batch-size {args.batch_size} is the global batch and does not split over the {world} "
                             f"ranks: give a multiple of {world}, or start fewer processes")
    return device, rank, world


def run_folder(args, world):
    """--out; else the checkpoint's folder with --resume; else runs/cavp-<data>-s<seed>-<time>, rank 0's on
    every rank."""
    if args.out is not None:
        if not (args.resume or args.eval_only or args.overwrite):
            data.check_new_run(args.out)
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
            wall_time_s=round(meter.elapsed(), 1), train_images_per_s=meter.images_per_s()))


def rank_seed(seed, rank):
    """One seed per (--seed, rank): every rank, and each of its loader workers, draws its own augmentation."""
    return seed * 1000003 + rank


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(args, splits):
    """split name -> dataset of --data (training augmentation and --crop on train only): VPO images, or AVSBench
    frames (data.AVSBenchFrames: one sample per labelled frame with its own second of audio, Sec. 5.1), val / test
    restricted to --avss-part."""
    spec, out = DATASETS[args.data], {}
    for split in splits:
        if spec["kind"] == "vpo":
            out[split] = data.VPODataset(args.data_root, spec["task"], split, audio_root=args.audio_root,
                                         stereo=not args.mono, train=split == "train", crop=args.crop, limit=args.limit,
                                         pan=args.pan)
        else:
            out[split] = data.AVSBenchFrames(args.data_root, spec["task"], split, size=args.resize or None,
                                             stereo=not args.mono, train=split == "train", crop=args.crop,
                                             labels=args.s4_labels if spec["task"] == "s4" else "binary",
                                             part="all" if split == "train" else args.avss_part, limit=args.limit)
    return out


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
    loader has its own generator, seeded per rank, so loading never draws from the training RNG and each rank's
    workers draw their own augmentation; bit-exact --resume needs --workers 0 (worker RNG states are not
    checkpointed)."""
    def loader(dataset, batch_size, sampler=None):
        return torch.utils.data.DataLoader(
            dataset, batch_size, sampler=sampler, num_workers=args.workers, collate_fn=data.pad_collate,
            pin_memory=device.type == "cuda", drop_last=sampler is not None, persistent_workers=args.workers > 0,
            generator=torch.Generator().manual_seed(rank_seed(args.seed, rank)))
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
    missing = [k for k in CKPT_KEYS if k not in ckpt["args"]] + [k for k in ("criterion",) if k not in ckpt["extra"]]
    if missing:
        raise data.DataError(f"{path}: written by an older cavp.py (no {', '.join(missing)}); train again, or use "
                             "the cavp.py version that wrote it")
    return ckpt


def use_checkpoint_args(args, ckpt):
    """The architecture flags come from the checkpoint, which also holds the weights; an AVSBench model is tested
    at the frame size it was trained at unless --resize says otherwise."""
    for key in CKPT_KEYS:  # load_checkpoint has checked that they are there
        setattr(args, key, ckpt["args"][key])
    args.pretrained = "none"
    if getattr(args, "resize", None) is None:
        args.resize = ckpt["args"]["resize"]


# run control and paths: they may differ on --resume
RESUME_FREE = ("out", "resume", "ckpt", "eval_only", "predict", "audio", "audio_pos", "max_size", "workers",
               "log_every", "eval_every", "eval_batch_size", "overlays", "max_iters", "device", "no_amp", "compile",
               "data_root", "audio_root", "coco_ann", "pretrained", "eval_audio", "overwrite")


def check_resume_args(args, ckpt):
    """--resume continues the run that wrote the checkpoint: a method or data flag that differs from the run's
    (a default changed since included) is a one-line DataError, not a silently different run."""
    changed = [k for k, v in ckpt["args"].items() if k not in RESUME_FREE and getattr(args, k, v) != v]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {ckpt['args'][k]} (now {getattr(args, k)})" for k in changed)
        raise data.DataError(f"{args.resume} was trained with {flags}: pass the run's flags (its log.txt 'settings' "
                             "line) or start a new run")


def save_checkpoint(path, model, optimizer, run, meter, args, extra, world):
    """Called on every rank (it gathers the per-rank RNG states); rank 0 passes the path and writes the
    model, optimiser, `run` (iteration, epoch, best, metric, history), the wall time so far (`meter`) and the
    method's `extra` state."""
    rngs = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(rngs, rngs[0])
    if path:
        save_atomic(dict(script="cavp", args=vars(args), model=model.state_dict(), optimizer=optimizer.state_dict(),
                         rng=rngs, extra=extra, elapsed_s=meter.elapsed(), **run), path)


class Meter:
    """Loss parts summed on the device between log lines and read back (averaged over the ranks) only by
    line(), which every rank calls; images/s over training time only, the first step (warm-up) left out;
    ETA from the wall time since the start, evaluations included."""

    def __init__(self, iteration, total, world, elapsed):
        self.t0, self.start, self.total, self.world, self.before = time.time(), iteration, total, world, elapsed
        self.sums, self.n, self.names, self.train_s, self.images = None, 0, [], 0.0, 0
        self.window_s, self.window_images = 0.0, 0

    def update(self, loss, parts, images, seconds, iteration):
        values = torch.stack([loss.detach().float()] + [v.detach().float() for v in parts.values()])
        self.sums, self.n, self.names = values if self.sums is None else self.sums + values, self.n + 1, list(parts)
        self.window_s, self.window_images = self.window_s + seconds, self.window_images + images * self.world
        if iteration > self.start + 1:
            self.train_s, self.images = self.train_s + seconds, self.images + images * self.world

    def line(self, epoch, epochs, iteration, lr):
        if self.world > 1:  # each rank's loss is its share times the world size (Criterion): the mean is global
            dist.all_reduce(self.sums)
            self.sums /= self.world
        loss, *values = (self.sums / self.n).tolist()  # the one read-back from the device per log line
        parts = dict(zip(self.names, values))
        eta = (time.time() - self.t0) / (iteration - self.start) * (self.total - iteration)
        text = (f"ep {epoch + 1}/{epochs} it {iteration}/{self.total} loss {loss:.4f} "
                f"({' '.join(f'{k} {v:.4f}' for k, v in parts.items())}) lr {lr:.2e} "
                f"{self.window_images / max(self.window_s, 1e-9):.1f} img/s "
                f"eta {eta // 3600:.0f}:{eta % 3600 // 60:02.0f}:{eta % 60:02.0f}")
        self.sums, self.n, self.window_s, self.window_images = None, 0, 0.0, 0
        return text

    def elapsed(self):
        """Wall time of the run: this process's and, after --resume, the earlier processes' (from the checkpoint)."""
        return self.before + time.time() - self.t0

    def images_per_s(self):
        return round(self.images / max(self.train_s, 1e-9), 2)


def train_one_epoch(net, loader, optimizer, scheduler, criterion, meter, epoch, iteration, args, log_path):
    """One pass over the loader (the rest of it after a resume inside the epoch), ending early at
    meter.total (--max-iters); returns the iteration count. Fixed crops: cuDNN may pick its fastest kernels."""
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
    """One PNG: image | ground truth | prediction | cross-attention heatmap (App. C, Fig. 10), titled,
    with a legend of the classes (`names`) in ground truth or prediction."""
    img, colors = data.to_uint8(image), data.class_colors(len(names))
    panels = [img, data.label_overlay(img, mask, colors), data.label_overlay(img, pred, colors),
              data.heatmap_overlay(img, attn.float())]
    data.save_panels(panels, ["image", "ground truth", "prediction", "attention"],
                     data.legend_for([mask, pred], names, colors), path)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, mel_fn, device, amp, names, binary=False, overlay_dir=None, n_overlays=0, swap=False):
    """Dataset-level mIoU / F-beta / FDR from one confusion matrix over the classes `names` (SPEC 2) and, where
    the samples carry silent twins, the twin metrics (metrics.TwinMeter), all-reduced over ranks; overlays of
    the first n_overlays images. binary (AVSBench-Objects, Tables 1-2): sounding object = 1 - p(background) > 0.5
    against the mask's foreground, plus M_J / M_F (metrics.AVSObjectsMeter). swap: left and right audio
    channels exchanged."""
    model.eval()
    torch.backends.cudnn.benchmark = False  # test images of every size: no per-shape kernel search
    cm = metrics.ConfusionMatrix(len(names), device=device)
    twins = metrics.TwinMeter(len(names), device=device)
    objects = metrics.AVSObjectsMeter(device) if binary else None
    written = 0
    for batch in loader:
        image, mask, wave = batch["image"].to(device), batch["mask"].to(device), batch["wave"].to(device)
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
            if written < n_overlays:
                save_overlay(os.path.join(overlay_dir, f"{name}.png"), image[i], mask[i], pred[i], attn[i], names)
                written += 1
    cm.all_reduce()
    twins.all_reduce()
    res = dict(cm.compute(), **twins.compute())
    if binary:
        objects.all_reduce()
        res.update(objects.compute())
    model.train()
    return res


def run_eval(model, loaders, split, weights, mel_fn, device, amp, args, log_path):
    """Metrics of one split (test: overlays and, with stereo twins, the twin metrics with left and right
    swapped), logged on rank 0 -> dict(split, weights, metrics)."""
    binary = DATASETS[args.data]["binary"]
    names = data.AVS_BINARY if binary else class_names(args.data, args.s4_labels)
    n_overlays = args.overlays if log_path and split == "test" else 0
    res = evaluate(model, loaders[split], mel_fn, device, amp, names, binary, os.path.join(args.out, "overlays"),
                   n_overlays)
    if split == "test" and "swap" in loaders:
        swapped = evaluate(model, loaders["swap"], mel_fn, device, amp, names, swap=True)
        res.update({f"{key}_swap": swapped[key] for key in metrics.TWIN_KEYS})
    part = f", part {args.avss_part}" if args.data == "avss" else ""
    if log_path:
        log(f"eval {split}{part} ({weights} weights):\n{metrics.format_table(names, res)}", log_path)
        if binary:
            log(f"M_J {res['mj']:.4f} | M_F {res['mf']:.4f}", log_path)
        if res["twin_images"]:
            log(metrics.format_twins(res), log_path)
    return dict(split=split, weights=weights, **({"part": args.avss_part} if part else {}), **res)


@torch.no_grad()
def predict(args):
    """--predict: one image (any size) and one WAV through the --ckpt model, the image scaled to a long side
    of at most --max-size -> OUT/<stem>.png (image | prediction | attention, legend) and OUT/<stem>.json
    (predicted classes and their pixel shares at the image's size, the inputs); returns the JSON's content."""
    ckpt = load_checkpoint(args.ckpt)
    use_checkpoint_args(args, ckpt)
    device = init_distributed(args)[0]
    amp = not args.no_amp and native_bf16(device)
    max_size = args.max_size or ckpt["args"]["crop"]  # the scale the model was trained at
    image, rgb, size = data.read_rgb(args.predict, max_size)
    wave, note = data.load_predict_audio(args.audio, stereo=not args.mono, audio_pos=args.audio_pos)
    if note:
        print(f"note: {note}")
    names = class_names(ckpt["args"]["data"], ckpt["args"].get("s4_labels"))
    model = CAVPModel(args, len(names)).to(device).eval()
    model.load_state_dict(ckpt["model"])
    del ckpt  # the optimiser state is not needed: freed before the photo-sized maps
    mel_fn = data.LogMel(frames=300).to(device)
    # any H x W works: DeepLabV3+ resizes its high-level map to the 1/4 one and the logits to the input
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits, _, attn = model(image[None].to(device), mel_fn(wave[None].to(device)))
    # to the image's size bilinearly on the logits, not nearest on the labels: borders fall where the
    # resized scores cross, at the image's resolution, instead of following the model's pixel grid
    pred, colors = data.upsample_labels(logits[0].cpu(), size), data.class_colors(len(names))
    shown = data.shown_labels(pred, rgb.shape[:2])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "predict")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, os.path.splitext(os.path.basename(args.predict))[0])
    data.save_panels([rgb, data.label_overlay(rgb, shown, colors), data.heatmap_overlay(rgb, attn[0].float())],
                     ["image", "prediction", "attention"], data.legend_for([pred], names, colors),
                     stem + ".png")
    shares = data.class_shares(pred, names)
    res = dict(image=args.predict, audio=args.audio, audio_pos=args.audio_pos, audio_note=note, checkpoint=args.ckpt,
               height=size[0], width=size[1], max_size=max_size, model_size=list(image.shape[1:]),
               classes=list(shares), shares=shares, background=(pred == 0).float().mean().item())
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
        if class_names(ckpt["args"]["data"], args.s4_labels) != class_names(args.data, args.s4_labels):
            raise data.DataError(f"{args.resume or args.ckpt} was trained on --data {ckpt['args']['data']}, whose "
                                 f"classes differ from --data {args.data}")
    resolve_defaults(args)
    if args.resume:
        check_resume_args(args, ckpt)
    args.out = run_folder(args, world)
    seed_all(rank_seed(args.seed, rank))
    spec = DATASETS[args.data]
    val_split = "val" if spec["kind"] == "avs" else "test"  # VPO has no val split (release "val" = test)

    # read before the run folder
    sets = build_datasets(args, ["test"] if args.eval_only else sorted({"train", val_split, "test"}))
    twin_idx = []
    if spec["kind"] == "vpo" and args.eval_audio == "real" and data.attach_twins(sets["test"], args.coco_ann):
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
    num_classes = len(class_names(args.data, args.s4_labels))
    # SPEC 1.3: 3 s -> 300 frames x 64 mel bins; an AVSBench frame's 1 s (App. B.1) comes repeat-padded to 3 s,
    # so the audio encoder, the memory bank and --predict take one clip length
    mel_fn = data.LogMel(frames=300).to(device)

    model = CAVPModel(args, num_classes).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if args.eval_only:
        res = run_eval(model, eval_loaders, "test", args.ckpt, mel_fn, device, amp, args, log_path)
        if main_rank:
            if args.eval_audio != "real":
                log(f"{args.eval_audio} audio: {100 * res['fg_pred']:.2f}% of the pixels segmented as a sounding "
                    "object (false detections; 0 is right)", log_path)
            # eval-real.json / eval-silence.json / eval-absent.json (avss: eval-real-v1s.json for --avss-part v1s):
            # never the training run's metrics.json
            part = "" if args.avss_part == "all" else f"-{args.avss_part}"
            write_json(os.path.join(args.out, f"eval-{args.eval_audio}{part}.json"), dict(args=vars(args), eval=res))
        return res

    if device.type == "cuda":  # channels-last convolutions, TF32 where the GPU has it
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.compile:
        model.visual.compile()
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
    criterion = Criterion(args, num_classes, mel_fn, device, amp, rank, world)
    # model selection: M_J on AVSBench-Objects (as the released AVSBench-Objects trainer), mIoU otherwise
    run = dict(iteration=0, epoch=0, best=-math.inf, metric="mj" if spec["binary"] else "miou", history=[])
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["extra"]["scheduler"])
        criterion.load_state_dict(ckpt["extra"]["criterion"])
        run = {key: ckpt[key] for key in run}
        if len(ckpt["rng"]) == world:  # per-rank RNG states; with another world size the seeds stay fresh
            set_rng_state(ckpt["rng"][rank])
        if main_rank:
            log(f"resumed from {args.resume} at epoch {run['epoch']}, iteration {run['iteration']}", log_path)

    meter = Meter(run["iteration"], total, world, ckpt.get("elapsed_s", 0.0) if ckpt else 0.0)
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
        extra = dict(scheduler=scheduler.state_dict(), criterion=criterion.state_dict())
        if stop or (epoch + 1) % args.eval_every == 0:
            eval_t = time.time()
            res = run_eval(model, eval_loaders, val_split, "last", mel_fn, device, amp, args, log_path)
            run["history"].append(dict(epoch=epoch + 1, iteration=run["iteration"], **res))
            if main_rank:
                log(f"eval ep {epoch + 1}: mIoU {100 * res['miou']:.2f} F-beta {100 * res['mean_fbeta']:.2f} "
                    f"FDR {100 * res['mean_fdr']:.2f} ({time.time() - eval_t:.1f} s)", log_path)
            if res[run["metric"]] > run["best"]:
                run["best"] = res[run["metric"]]
                save_checkpoint(main_rank and os.path.join(args.out, "best.pt"), model, optimizer, run, meter, args,
                                extra, world)
            write_metrics(main_rank, args, run, val_split, res if val_split == "test" else None, meter)
        save_checkpoint(main_rank and os.path.join(args.out, "last.pt"), model, optimizer, run, meter, args, extra,
                        world)
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


if __name__ == "__main__":
    cli_args = parse_args()
    try:
        main(cli_args)
    except Exception as e:
        exit_on_error(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
