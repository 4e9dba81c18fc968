"""Segmentation metrics of CAVP (CVPR 2024) and AVSBench / TPAVI (AVS, ECCV 2022).

`ConfusionMatrix`: the VPO / AVSBench-Semantics metrics of CAVP §5.1 (mIoU, F-beta with
beta^2 = 0.3, FDR), computed as in the authors' released eval code (cyh-0/CAVP,
utils/eval_utils.py):
one confusion matrix over the whole test set on argmax predictions, target 255 ignored.
The headline `miou` averages over all classes incl. background and counts a class that never
occurs (union 0) as 0, like the released code; `miou_present` averages over the classes that
occur (in the target or the prediction) only.

`AVSObjectsMeter`: the AVSBench-Objects (S4 / MS3) Jaccard M_J and F-measure M_F of the AVS
paper (OpenNLPLab/AVSBench, avs_scripts/avs_s4/utils/utility.py: `mask_iou`, `Eval_Fmeasure`).
The released code averages these per test batch (of 4) and then over batches, so its numbers
depend on the batch size; this meter sums per-frame values over the whole test set.

Undefined values are NaN: per-class IoU / F-beta of an absent class, FDR of a class that is
never predicted, and every mean when nothing has been counted (e.g. only 255 targets).
"""
import math

import torch
import torch.distributed as dist

BETA2 = 0.3  # beta^2 of the F-measure (CAVP §5.1, AVS)
IGNORE = 255
NUM_THRESHOLDS = 255  # M_F thresholds (AVS Eval_Fmeasure)


def _all_reduce(*tensors):
    """Sum tensors in place across DDP ranks; no-op without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def _check_range(values, num_classes, name, allowed):
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        found = torch.unique(values[bad])[:5].tolist()
        raise ValueError(f"{name} contains {found}; allowed values are {allowed}")


class ConfusionMatrix:
    """Dataset-level confusion matrix (rows = target, columns = prediction), int64.

    The matrix follows the device of the tensors passed to `update` (`device` = initial one).
    """

    def __init__(self, num_classes, device="cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred, target):
        """Add a batch: pred and target are integer tensors of equal shape, target 255 = ignore."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in "
                             "shape")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer class indices (argmax of the logits)")
        k = self.num_classes
        pred, target = pred.long().flatten(), target.long().flatten()
        valid = target != IGNORE
        pred, target = pred[valid], target[valid]
        _check_range(target, k, "target", f"0..{k - 1} and {IGNORE} (ignore); check the mask "
                     "encoding and num_classes")
        _check_range(pred, k, "pred", f"0..{k - 1}")
        self.mat = self.mat.to(pred.device)
        self.mat += torch.bincount(target * k + pred, minlength=k * k).view(k, k)

    def all_reduce(self):
        _all_reduce(self.mat)

    def compute(self):
        """Per-class and mean metrics as python floats / lists (NaN = undefined, see module doc)."""
        m = self.mat.double().cpu()
        tp = m.diag()
        fp = m.sum(0) - tp
        fn = m.sum(1) - tp
        union = tp + fp + fn
        present = union > 0
        iou = tp / union  # CAVP §5.1: TP / (TP + FP + FN); 0/0 = NaN for absent classes
        fbeta = (1 + BETA2) * tp / ((1 + BETA2) * tp + BETA2 * fn + fp)  # CAVP §5.1, beta^2 = 0.3
        fdr = fp / (fp + tp)  # CAVP §5.1: false detection rate, PPV = 1 - FDR
        total = m.sum()
        return {
            "iou": iou.tolist(),
            # released code: absent classes count as 0 in the mean over all classes
            "miou": iou.nan_to_num(0.0).mean().item() if total > 0 else math.nan,
            "miou_present": iou[present].mean().item(),
            "fbeta": fbeta.tolist(),
            "mean_fbeta": fbeta.nanmean().item(),
            "fdr": fdr.tolist(),
            "mean_fdr": fdr.nanmean().item(),
            "pixel_acc": (tp.sum() / total).item(),
            # shares of labelled pixels predicted / labelled as an object (class != 0); with audio
            # that says nothing sounds (CounterfactualAudio) fg_pred is the false-detection rate
            "fg_pred": (m[:, 1:].sum() / total).item(),
            "fg_true": (m[1:].sum() / total).item(),
            "present": present.tolist(),
        }


TWIN_KEYS = ("twin_recall", "twin_share", "twin_side_acc")


class TwinMeter:
    """Instance disambiguation on images whose sounding object has silent twins (VPO-MSMI).

    `update(pred, mask, twin)`: `twin` holds the class at the silent twins' pixels (0 elsewhere).
    Over the sounding objects of the classes that have twins it sums the pixels predicted as their
    class (recall) and over the twins the pixels predicted as the sounding class (a model that
    ignores the stereo position segments both alike). `side_acc`: share of such images where the
    sounding object's recall beats its twins' share.
    """

    def __init__(self, num_classes, device="cpu"):
        self.num_classes = num_classes
        # sounding pixels, of them hit; twin pixels, of them hit; images, of them with the side
        # right
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)

    def update(self, pred, mask, twin):
        b, k = twin.shape[0], self.num_classes
        pred, mask, twin = pred.flatten(1), mask.long().flatten(1), twin.long().flatten(1)
        has_twin = torch.zeros(b, k, dtype=torch.bool, device=twin.device).scatter_(1, twin, True)
        has_twin[:, 0] = False
        sounding = (mask != IGNORE) & has_twin.gather(1, mask.clamp(max=k - 1))
        twin_px = twin > 0
        counts = torch.stack([sounding.sum(1), (sounding & (pred == mask)).sum(1),
                              twin_px.sum(1), (twin_px & (pred == twin)).sum(1)], 1).double()
        counts = counts[has_twin.any(1) & (counts[:, 0] > 0)]
        side = counts[:, 1] / counts[:, 0] > counts[:, 3] / counts[:, 2].clamp(min=1)
        self.sums = self.sums.to(counts.device)
        self.sums += torch.cat([counts.sum(0),
                                torch.tensor([len(counts), side.sum()], device=counts.device)])

    def all_reduce(self):
        _all_reduce(self.sums)

    def compute(self):
        """dict(twin_images, twin_recall, twin_share, twin_side_acc); NaN without twin images."""
        s = self.sums.cpu().tolist()
        div = lambda a, b: a / b if b else math.nan
        return dict(twin_images=int(s[4]), twin_recall=div(s[1], s[0]), twin_share=div(s[3], s[2]),
                    twin_side_acc=div(s[5], s[4]))


class AVSObjectsMeter:
    """AVSBench-Objects M_J and M_F from dataset-level sums, so independent of the batch size.

    Frames whose target is entirely 255 are skipped; 255 pixels inside a frame are ignored.
    """

    def __init__(self, device="cpu"):
        # float32 as in the released code; 1 - 1e-10 rounds to 1.0 in float32
        self.thresholds = torch.linspace(0, 1 - 1e-10, NUM_THRESHOLDS)
        self.j_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.j_frames = torch.zeros((), dtype=torch.int64, device=device)
        self.f_sum = torch.zeros(NUM_THRESHOLDS, dtype=torch.float64, device=device)
        self.f_frames = torch.zeros((), dtype=torch.int64, device=device)

    def _state(self):
        return self.j_sum, self.j_frames, self.f_sum, self.f_frames

    def update(self, prob, target):
        """Add frames: prob float (N, H, W) in [0, 1] (sigmoid), target (N, H, W) in {0, 1, 255}."""
        if prob.dim() != 3 or prob.shape != target.shape:
            raise ValueError(f"prob {tuple(prob.shape)} and target {tuple(target.shape)} must both "
                             "be (N, H, W)")
        if not prob.is_floating_point():
            raise ValueError("prob must be a float tensor of probabilities")
        if prob.numel() and (prob.min() < 0 or prob.max() > 1):
            raise ValueError("prob must lie in [0, 1]: pass sigmoid(logits), not logits")
        target = target.long()
        bad = (target != 0) & (target != 1) & (target != IGNORE)
        if bad.any():
            found = torch.unique(target[bad])[:5].tolist()
            raise ValueError(f"target contains {found}; allowed values are 0, 1 and {IGNORE} "
                             "(ignore)")
        if prob.dtype != torch.float64:
            prob = prob.float()  # exact for half types, so comparisons with the thresholds are too
        prob, target = prob.flatten(1), target.flatten(1)
        valid = target != IGNORE
        labelled = valid.any(1)
        prob, target, valid = prob[labelled], target[labelled], valid[labelled]
        gt = target == 1
        n_gt = gt.sum(1)
        empty = n_gt == 0

        # M_J (AVS mask_iou): binarise at 0.5, IoU; an empty GT scores TN / HW (HW: labelled pixels)
        pred = (prob > 0.5) & valid
        inter = (pred & gt).sum(1).double()
        union = (pred | gt).sum(1).double()
        n_valid = valid.sum(1).double()
        true_neg = n_valid - pred.sum(1)
        j = torch.where(empty, true_neg / n_valid, inter / union.clamp(min=1))

        # M_F (AVS Eval_Fmeasure), frames with an empty GT skipped. level = number of thresholds
        # <= prob, so "prob >= thresholds[t]" <=> level > t; per-frame level histograms, summed
        # from the top, give the predicted-positive and TP counts at every threshold at once.
        prob, gt, valid, n_gt = prob[~empty], gt[~empty], valid[~empty], n_gt[~empty]
        m, bins = prob.shape[0], NUM_THRESHOLDS + 1
        level = torch.bucketize(prob, self.thresholds.to(prob.device, prob.dtype), right=True)
        level = level + torch.arange(m, device=prob.device)[:, None] * bins

        def above(mask):
            hist = torch.bincount(level[mask], minlength=m * bins).view(m, bins)
            return hist.flip(1).cumsum(1).flip(1)[:, 1:].double()

        tp, pred_pos = above(gt), above(valid)
        precision = tp / pred_pos.clamp(min=1)  # 0 when nothing is predicted, as the release
        recall = tp / n_gt[:, None]
        f = ((1 + BETA2) * precision * recall / (BETA2 * precision + recall)).nan_to_num(0.0)

        device = prob.device
        self.j_sum, self.j_frames, self.f_sum, self.f_frames = (t.to(device) for t in self._state())
        self.j_sum += j.sum()
        self.j_frames += j.numel()
        self.f_sum += f.sum(0)
        self.f_frames += m

    def all_reduce(self):
        _all_reduce(*self._state())

    def compute(self):
        """dict(mj, mf): mean per-frame Jaccard, max over thresholds of the mean F curve; NaN if no
        frames were counted."""
        return {
            "mj": (self.j_sum / self.j_frames).item(),
            "mf": (self.f_sum / self.f_frames).max().item(),
        }


def format_twins(result):
    """One line of the twin metrics (in %), with the left/right-swapped ones when present."""
    def part(suffix):
        r, s, a = (result.get(k + suffix, math.nan) for k in TWIN_KEYS)
        return f"sounding recall {100 * r:.2f} | twin share {100 * s:.2f} | side acc {100 * a:.2f}"
    line = f"twins ({result['twin_images']} images): {part('')}"
    return line + (f" || L/R swapped: {part('_swap')}" if "twin_recall_swap" in result else "")


def format_table(class_names, result):
    """Per-class IoU / F-beta / FDR in % ('-' = undefined, e.g. absent class) + a line of means."""
    if len(class_names) != len(result["iou"]):
        raise ValueError(f"{len(class_names)} class names for {len(result['iou'])} classes")

    def pct(v):
        return "-" if math.isnan(v) else f"{100 * v:.2f}"

    width = max(map(len, ["class", *class_names]))
    lines = [f"{'class':<{width}} {'IoU':>7} {'F-beta':>7} {'FDR':>7}"]
    for name, iou, fbeta, fdr in zip(class_names, result["iou"], result["fbeta"], result["fdr"]):
        lines.append(f"{name:<{width}} {pct(iou):>7} {pct(fbeta):>7} {pct(fdr):>7}")
    lines.append("-" * len(lines[0]))
    means = [("mIoU", "miou"), ("mIoU(present)", "miou_present"), ("mean F-beta", "mean_fbeta"),
             ("mean FDR", "mean_fdr"), ("pixel acc", "pixel_acc")]
    lines.append(" | ".join(f"{label} {pct(result[key])}" for label, key in means))
    return "\n".join(lines)
