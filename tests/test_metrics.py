"""Tests for metrics.py against slow per-pixel references and hand-computed cases."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics import TWIN_KEYS, AVSObjectsMeter, ConfusionMatrix, TwinMeter, format_table, format_twins

NAN = math.nan


def approx(x):
    return pytest.approx(x, abs=1e-12, nan_ok=True)


def random_batches(seed, num_classes, n_batches=4, shape=(2, 7, 9)):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        target = torch.randint(0, num_classes - 1, shape, generator=g)  # last class never in GT
        target[torch.rand(shape, generator=g) < 0.2] = 255
        pred = torch.randint(0, num_classes - 1, shape, generator=g)
        keep = torch.rand(shape, generator=g) < 0.5
        pred[keep & (target != 255)] = target[keep & (target != 255)]
        pred[pred == num_classes - 2] = 0  # still never predicted
        batches.append((pred, target))
    return batches


def reference_confusion(batches, k):
    """Per-pixel Python loop; metrics from the textbook formulas."""
    counts = [[0] * k for _ in range(k)]
    for pred, target in batches:
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if t != 255:
                counts[t][p] += 1
    out = {"iou": [], "fbeta": [], "fdr": [], "present": []}
    for c in range(k):
        tp = counts[c][c]
        fp = sum(counts[r][c] for r in range(k)) - tp
        fn = sum(counts[c]) - tp
        union = tp + fp + fn
        out["present"].append(union > 0)
        out["iou"].append(tp / union if union else NAN)
        out["fbeta"].append(1.3 * tp / (1.3 * tp + 0.3 * fn + fp) if union else NAN)
        out["fdr"].append(fp / (fp + tp) if fp + tp else NAN)
    total = sum(map(sum, counts))
    present_iou = [v for v in out["iou"] if not math.isnan(v)]
    out["miou"] = sum(present_iou) / k
    out["miou_present"] = sum(present_iou) / len(present_iou)
    out["mean_fbeta"] = sum(v for v in out["fbeta"] if not math.isnan(v)) / sum(
        not math.isnan(v) for v in out["fbeta"])
    fdrs = [v for v in out["fdr"] if not math.isnan(v)]
    out["mean_fdr"] = sum(fdrs) / len(fdrs)
    out["pixel_acc"] = sum(counts[c][c] for c in range(k)) / total
    out["fg_pred"] = sum(counts[t][p] for t in range(k) for p in range(1, k)) / total
    out["fg_true"] = sum(counts[t][p] for t in range(1, k) for p in range(k)) / total
    return counts, out


def test_confusion_matrix_matches_loop_reference():
    k = 6
    batches = random_batches(0, k)
    cm = ConfusionMatrix(k)
    for pred, target in batches:
        cm.update(pred, target)
    counts, ref = reference_confusion(batches, k)
    assert cm.mat.dtype == torch.int64 and cm.mat.tolist() == counts
    res = cm.compute()
    assert res["present"] == ref["present"] == [True] * 5 + [False]
    assert math.isnan(res["fdr"][4])  # class 4 never predicted
    for key, value in ref.items():
        if key != "present":
            assert res[key] == approx(value), key


def test_perfect_prediction_and_absent_class():
    target = torch.tensor([[[0, 1], [2, 255]]])
    cm = ConfusionMatrix(4)
    cm.update(target.clone().masked_fill(target == 255, 3), target)  # pred at 255 is not counted
    res = cm.compute()
    assert res["present"] == [True, True, True, False]
    assert res["iou"][:3] == [1.0, 1.0, 1.0] and math.isnan(res["iou"][3])
    assert res["miou_present"] == 1.0
    assert res["miou"] == 0.75  # absent class 3 counts as 0 in the headline mIoU
    assert res["mean_fbeta"] == approx(1.0)
    assert res["mean_fdr"] == 0.0
    assert res["pixel_acc"] == 1.0


def test_two_by_two_exact():
    target = torch.tensor([[0, 1], [1, 255]])
    pred = torch.tensor([[0, 1], [0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    res = cm.compute()
    assert res["iou"] == approx([0.5, 0.5, NAN])
    assert res["miou"] == approx(1 / 3)
    assert res["miou_present"] == approx(0.5)
    assert res["fbeta"] == approx([1.3 / 2.3, 1.3 / 1.6, NAN])
    assert res["mean_fbeta"] == approx((1.3 / 2.3 + 1.3 / 1.6) / 2)
    assert res["fdr"] == approx([0.5, 0.0, NAN])
    assert res["mean_fdr"] == approx(0.25)
    assert res["pixel_acc"] == approx(2 / 3)


def test_all_ignore_counts_nothing_and_gives_nan():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), 255))
    assert cm.mat.sum().item() == 0
    res = cm.compute()
    assert res["present"] == [False] * 3
    for key in ("miou", "miou_present", "mean_fbeta", "mean_fdr", "pixel_acc"):
        assert math.isnan(res[key]), key
    assert all(math.isnan(v) for v in res["iou"] + res["fbeta"] + res["fdr"])


def test_uint8_target_accepted():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 1]), torch.tensor([0, 2, 255], dtype=torch.uint8))
    assert cm.mat.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]


@pytest.mark.parametrize("pred, target, match", [
    ([0, 1], [0, 7], r"target contains \[7\]"),
    ([0, 1], [-1, 1], r"target contains \[-1\]"),
    ([0, 5], [0, 1], r"pred contains \[5\]"),
    ([0.0, 1.0], [0, 1], "integer class indices"),
    ([0, 1, 1], [0, 1], "shape"),
])
def test_invalid_input_raises(pred, target, match):
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=match):
        cm.update(torch.tensor(pred), torch.tensor(target))
    assert cm.mat.sum().item() == 0


# --- AVSBench-Objects M_J / M_F -------------------------------------------------------------

def reference_avs(prob, target):
    """Per-pixel loops over frames (and thresholds) following the per-frame M_J / M_F of the AVS
    paper (OpenNLPLab/AVSBench's mask_iou / Eval_Fmeasure) literally, over the whole set."""
    thresholds = torch.linspace(0, 1 - 1e-10, 255).tolist()
    js, curves = [], []
    for p, t in zip(prob.flatten(1).tolist(), target.flatten(1).tolist()):
        pix = [(pv, tv) for pv, tv in zip(p, t) if tv != 255]
        if not pix:
            continue
        n_gt = sum(tv for _, tv in pix)
        inter = sum(pv > 0.5 and tv == 1 for pv, tv in pix)
        union = sum(pv > 0.5 or tv == 1 for pv, tv in pix)
        tn = sum(pv <= 0.5 and tv == 0 for pv, tv in pix)
        js.append(tn / len(pix) if n_gt == 0 else inter / union)
        if n_gt == 0:
            continue
        curve = []
        for thr in thresholds:
            tp = sum(pv >= thr and tv == 1 for pv, tv in pix)
            pp = sum(pv >= thr for pv, _ in pix)
            prec, rec = (tp / pp if pp else 0.0), tp / n_gt
            curve.append(1.3 * prec * rec / (0.3 * prec + rec) if prec + rec else 0.0)
        curves.append(curve)
    mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(255)]
    return sum(js) / len(js), mean_curve


def avs_frames(seed, n=7, size=(5, 6)):
    g = torch.Generator().manual_seed(seed)
    prob = torch.rand(n, *size, generator=g)
    thresholds = torch.linspace(0, 1 - 1e-10, 255)
    idx = torch.randint(0, prob.numel(), (prob.numel() // 4,), generator=g)
    prob.view(-1)[idx] = thresholds[torch.randint(0, 255, idx.shape, generator=g)]  # ties
    prob[0, 0, :3] = torch.tensor([0.5, 1.0, 0.0])  # edge values of both rules
    target = (torch.rand(n, *size, generator=g) < 0.4).long()
    target[torch.rand(n, *size, generator=g) < 0.15] = 255
    target[1] = 0  # empty GT
    target[2] = 255  # unlabelled frame
    target[3, :2] = 255
    target[3, 2:] = 0  # empty GT with ignored pixels
    return prob, target


def test_avs_meter_matches_loop_reference():
    prob, target = avs_frames(0)
    meter = AVSObjectsMeter()
    meter.update(prob, target)
    mj, curve = reference_avs(prob, target)
    res = meter.compute()
    assert meter.j_frames.item() == 6 and meter.f_frames.item() == 4
    assert (meter.f_sum / 4).tolist() == approx(curve)
    assert res["mj"] == approx(mj)
    assert res["mf"] == approx(max(curve))
    assert 0.0 < res["mj"] < 1.0 and 0.0 < res["mf"] < 1.0


def test_avs_empty_gt_jaccard_rule():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    prob = torch.full((2, 4, 4), 0.2)
    prob[1, :2] = 0.9  # half of the second frame wrongly predicted as foreground
    meter = AVSObjectsMeter()
    meter.update(prob[:1], target[:1])
    assert meter.compute()["mj"] == 1.0
    meter = AVSObjectsMeter()
    meter.update(prob[1:], target[1:])
    assert meter.compute()["mj"] == 0.5
    assert math.isnan(meter.compute()["mf"])  # no frame with a non-empty GT


def test_avs_empty_gt_skipped_in_f():
    prob, target = avs_frames(1)
    target[0] = 0
    alone = AVSObjectsMeter()
    alone.update(prob[1:], target[1:])
    both = AVSObjectsMeter()
    both.update(prob, target)
    assert both.f_frames.item() == alone.f_frames.item() == 3
    assert both.compute()["mf"] == alone.compute()["mf"]
    assert both.compute()["mj"] != alone.compute()["mj"]


def test_avs_batch_size_independent():
    prob, target = avs_frames(2, n=8)
    results = []
    for bs in (8, 1, 3):
        meter = AVSObjectsMeter()
        for i in range(0, len(prob), bs):
            meter.update(prob[i:i + bs], target[i:i + bs])
        results.append(meter.compute())
    assert results[1] == approx(results[0]) and results[2] == approx(results[0])
    per_batch = []  # the released code's batch-wise average differs
    for i in range(0, 8, 3):
        meter = AVSObjectsMeter()
        meter.update(prob[i:i + 3], target[i:i + 3])
        per_batch.append(meter.compute()["mj"])
    assert abs(sum(per_batch) / len(per_batch) - results[0]["mj"]) > 1e-3


@pytest.mark.parametrize("prob, target, match", [
    (torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 2), r"target contains \[2\]"),
    (torch.full((1, 2, 2), 3.0), torch.ones(1, 2, 2), r"\[0, 1\]"),
    (torch.full((2, 2), 0.5), torch.ones(2, 2), "must both be"),
])
def test_avs_invalid_input_raises(prob, target, match):
    with pytest.raises(ValueError, match=match):
        AVSObjectsMeter().update(prob, target)


# --- DDP / formatting ---------------------------------------------------------------------------

def filled_meters():
    cm = ConfusionMatrix(6)
    for pred, target in random_batches(3, 6):
        cm.update(pred, target)
    avs = AVSObjectsMeter()
    avs.update(*avs_frames(3))
    return cm, avs


def test_all_reduce_noop_without_process_group():
    assert not dist.is_initialized()
    cm, avs = filled_meters()
    mat, before = cm.mat.clone(), avs.compute()
    cm.all_reduce()
    avs.all_reduce()
    assert torch.equal(cm.mat, mat)
    assert avs.compute() == before


def _ddp_worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cm, avs = filled_meters()
        mat, j_sum, f_frames = cm.mat.clone(), avs.j_sum.item(), avs.f_frames.item()
        res = avs.compute()
        cm.all_reduce()
        avs.all_reduce()
        assert torch.equal(cm.mat, 2 * mat)
        assert avs.j_sum.item() == 2 * j_sum and avs.f_frames.item() == 2 * f_frames
        assert avs.compute() == approx(res)
    finally:
        dist.destroy_process_group()


def test_all_reduce_gloo_two_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


def test_format_table():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0, 1], [1, 255]]))
    table = format_table(["background", "car", "sheep"], cm.compute())
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "F-beta", "FDR"]
    assert lines[1].split() == ["background", "50.00", "56.52", "50.00"]
    assert lines[2].split() == ["car", "50.00", "81.25", "0.00"]
    assert lines[3].split() == ["sheep", "-", "-", "-"]
    assert lines[-1] == ("mIoU 33.33 | mIoU(present) 50.00 | mean F-beta 68.89 | mean FDR 25.00"
                         " | pixel acc 66.67")
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        format_table(["background", "car"], cm.compute())


# ---------------------------------------------------------------- twin metrics
def twin_reference(preds, masks, twins):
    """Loops over images and pixels: pooled sounding recall, twin share and per-image side accuracy."""
    hit_s = n_s = hit_t = n_t = images = right = 0
    for pred, mask, twin in zip(preds, masks, twins):
        classes = {int(c) for c in twin.flatten().tolist() if c}
        if not classes:
            continue
        hs = ns = ht = nt = 0
        for p, m, t in zip(pred.flatten().tolist(), mask.flatten().tolist(), twin.flatten().tolist()):
            if m in classes:
                ns += 1
                hs += p == m
            if t:
                nt += 1
                ht += p == t
        if ns == 0:
            continue
        hit_s, n_s, hit_t, n_t, images = hit_s + hs, n_s + ns, hit_t + ht, n_t + nt, images + 1
        right += hs / ns > ht / nt
    return dict(twin_images=images, twin_recall=hit_s / n_s, twin_share=hit_t / n_t, twin_side_acc=right / images)


def test_twin_meter_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    k, n, h, w = 6, 7, 5, 6
    mask = torch.randint(0, k, (n, h, w), generator=g)
    mask[torch.rand(n, h, w, generator=g) < 0.1] = 255
    pred = torch.randint(0, k, (n, h, w), generator=g)
    twin = torch.zeros(n, h, w, dtype=torch.long)
    for i in range(n - 2):  # the last two images have no twins
        c = int(mask[i][mask[i] != 255][0]) or 1
        mask[i, 0, 0] = c
        region = (mask[i] == 0) & (torch.rand(h, w, generator=g) < 0.6)
        region[h - 1, w - 1] = True
        mask[i, h - 1, w - 1] = 0
        twin[i][region] = c
        pred[i][region & (torch.rand(h, w, generator=g) < 0.5)] = c  # some twins segmented as the source
    meter = TwinMeter(k)
    for s in (slice(0, 3), slice(3, n)):  # two batches
        meter.update(pred[s], mask[s], twin[s])
    got, want = meter.compute(), twin_reference(pred, mask, twin)
    assert got["twin_images"] == want["twin_images"] == n - 2
    for key in TWIN_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    assert 0 < want["twin_share"] < 1 and 0 < want["twin_side_acc"] < 1


def test_twin_meter_perfect_and_blind_models():
    mask = torch.tensor([[[0, 3, 3, 0, 0, 0]]])
    twin = torch.tensor([[[0, 0, 0, 0, 3, 3]]])
    m = TwinMeter(5)
    m.update(mask.clone(), mask, twin)  # segments the sounding instance only
    assert m.compute() == dict(twin_images=1, twin_recall=1.0, twin_share=0.0, twin_side_acc=1.0)
    m = TwinMeter(5)
    m.update(torch.tensor([[[0, 3, 3, 0, 3, 3]]]), mask, twin)  # segments every instance of the class
    assert m.compute() == dict(twin_images=1, twin_recall=1.0, twin_share=1.0, twin_side_acc=0.0)
    empty = TwinMeter(5)
    empty.update(mask, mask, torch.zeros_like(twin))
    assert empty.compute()["twin_images"] == 0 and math.isnan(empty.compute()["twin_recall"])
    assert "twins (1 images): sounding recall 100.00 | twin share 100.00 | side acc 0.00" in format_twins(
        m.compute())
