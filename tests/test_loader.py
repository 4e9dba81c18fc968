"""The fast VPO training loader (issue 20) and pans that follow the augmentation (issue 19 item 3), on
fixtures with known rectangle objects written in the released VPO layout."""
import numpy as np
import pytest
import torch
import torchaudio
import torchvision.transforms.v2.functional as TF

import cavp
import data
import tpavi
from fixtures_layouts import write_vpo

FH, FW, CROP = 60, 90, 48  # fixture image size; crop smaller than the image, larger than its 0.5x scale
# (COCO id, name, rows, columns [c0, c1), DC level of its clip): a male left, a cat in the middle, a car right
OBJECTS = [(92, "male", (10, 30), (6, 18), 0.1), (17, "cat", (30, 50), (40, 52), 0.2),
           (3, "car", (8, 20), (70, 84), 0.3)]
DOG = (18, "dog", (20, 44), (58, 70), 0.4)  # the single source of the second image
COLOURS = {92: (250, 40, 40), 17: (40, 220, 60), 3: (30, 60, 250), 18: (240, 240, 40)}


def _sample(img, objects):
    """An MS sample dict for write_vpo: smooth gradient image with solid rectangles; audio_pos = centre of
    mass of the rectangle at pixel centres / W, i.e. (c0 + c1) / 2 / W."""
    yy, xx = np.mgrid[:FH, :FW]
    pixels = np.stack([60 + xx, 80 + yy, 200 - xx], -1).astype(np.uint8)
    mask = np.zeros((FH, FW), np.uint8)
    sources = []
    for cid, name, (r0, r1), (c0, c1), level in objects:
        mask[r0:r1, c0:c1], pixels[r0:r1, c0:c1] = cid, COLOURS[cid]
        sources.append((name, cid, 100 * img + cid, f"{name}{img}", level, (c0 + c1) / 2 / FW))
    return dict(img=img, split="train", mask=mask, pixels=pixels, sources=sources)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rects")
    write_vpo(root, "ms", [_sample(1, OBJECTS), _sample(2, [DOG])])
    return root


def _draws(seed, crop=CROP):
    """The augmentation's draws for `seed` replayed in their documented order: jitter factors, flip,
    scale, crop offset (y, x). Returns (flip, scaled h, scaled w, y0, x0)."""
    torch.manual_seed(seed)
    for _ in range(3):  # the jitter factors
        torch.empty(1).uniform_()
    flip = bool(torch.rand(1) < 0.5)
    s = float(torch.empty(1).uniform_(*data.SCALE))
    h, w = round(FH * s), round(FW * s)
    if crop is None:
        return flip, h, w, 0, 0
    return (flip, h, w, int(torch.randint(0, max(h, crop) - crop + 1, (1,))),
            int(torch.randint(0, max(w, crop) - crop + 1, (1,))))


def _centre_x(mask, cls):
    """Loop over pixels: (centre of mass x of the pixels of `cls`, at pixel centres, or None if absent,
    whether one of them lies on the crop's border)."""
    total, count, border = 0.0, 0, False
    h, w = len(mask), len(mask[0])
    for y in range(h):
        for x in range(w):
            if mask[y][x] == cls:
                total, count = total + x + 0.5, count + 1
                border |= x in (0, w - 1) or y in (0, h - 1)
    return (total / count if count else None), border


def _levels(x):
    """Mean of the left and right channel of a sample's wave."""
    return [float(v) for v in x["wave"].mean(1)]


@pytest.mark.parametrize("mode", ["crop", "csv"])
def test_pans_follow_the_augmentation(root, mode):
    """pan='crop': each source at its object's centre of mass in the augmented crop (checked against the
    pixels when the object is inside the crop), clamped to [0, 1]; pan='csv': the CSV audio_pos, mirrored on a
    flip. The stereo levels follow source_pos: L = sum (1 - p) level, R = sum p level."""
    ds = data.VPODataset(root, "ms", "train", train=True, crop=CROP, pan=mode)
    inside = clamped = 0
    for seed in range(40):
        flip, h, w, y0, x0 = _draws(seed)
        torch.manual_seed(seed)
        x = ds[0]
        mask = x["mask"].tolist()
        assert x["image"].shape == (3, CROP, CROP) and x["mask"].shape == (CROP, CROP)
        assert (x["mask"][h - y0:] == 255).all() and (x["mask"][:, w - x0:] == 255).all()  # padding
        assert (x["image"][:, h - y0:] == 0).all() and (x["image"][:, :, w - x0:] == 0).all()
        assert (x["mask"][:h - y0, :w - x0] != 255).all()
        left = right = 0.0
        for cid, name, _, (c0, c1), level in OBJECTS:
            cls = data.VPO_COCO_IDS.index(cid) + 1
            alpha = (c0 + c1) / 2 / FW
            alpha = 1 - alpha if flip else alpha
            p = float(x["source_pos"][cls])
            if mode == "csv":
                assert p == pytest.approx(alpha, abs=1e-6)
            else:
                assert p == pytest.approx(min(1.0, max(0.0, (alpha * w - x0) / CROP)), abs=1e-6)
                com, border = _centre_x(mask, cls)
                if com is not None and not border:  # the whole object is in the crop
                    assert p == pytest.approx(com / CROP, abs=0.5 / CROP + 1e-4)  # nearest: < 1/2 px off
                    inside += 1
                clamped += p in (0.0, 1.0)
            left, right = left + (1 - p) * level, right + p * level
        assert _levels(x) == pytest.approx([left, right], abs=1e-3)
        assert float(x["audio_pos"]) == -1.0  # several sources
    if mode == "crop":
        assert inside >= 20 and clamped >= 5  # both cases met


def test_single_source_stereo_energy(root):
    """One source: audio_pos == its source_pos, and sqrt(E_R) / (sqrt(E_L) + sqrt(E_R)) of the wave is
    that position (L = (1 - p) w, R = p w)."""
    ds = data.VPODataset(root, "ms", "train", train=True, crop=CROP, pan="crop")
    cls = data.VPO_COCO_IDS.index(DOG[0]) + 1
    positions = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x = ds[1]
        p = float(x["source_pos"][cls])
        assert float(x["audio_pos"]) == pytest.approx(p, abs=1e-6)
        e_left, e_right = x["wave"].pow(2).sum(1).sqrt().tolist()
        assert e_right / (e_left + e_right) == pytest.approx(p, abs=1e-3)
        positions.add(round(p, 2))
    assert len(positions) > 5


def _reference(ds, i, seed):
    """The augmentation written plainly on the whole image (the implementation before issue 20): jitter,
    flip, resize and normalise the whole image, pad, crop; the mask resized to nearest pixel centres."""
    s = ds.samples[i]
    img = data.read_image(s["image"])
    coco = np.asarray(data._open_image(s["mask"], None))
    torch.manual_seed(seed)
    for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
        img = adjust(img, float(torch.empty(1).uniform_(1 - data.JITTER, 1 + data.JITTER)))
    flip = bool(torch.rand(1) < 0.5)
    scale = float(torch.empty(1).uniform_(*data.SCALE))
    h, w = round(FH * scale), round(FW * scale)
    img = data.normalize(TF.resize(img, [h, w], antialias=True).clamp(0, 1))
    rows = [int((y + 0.5) * FH / h) for y in range(h)]
    cols = [int((x + 0.5) * FW / w) for x in range(w)]
    mask = torch.tensor([[data.VPO_COCO_IDS.index(v) + 1 if v else 0 for v in coco[r, cols]] for r in rows])
    if flip:
        img, mask = img.flip(-1), mask.flip(-1)
    canvas = torch.zeros(3, max(h, CROP), max(w, CROP))
    labels = torch.full(canvas.shape[1:], 255)
    canvas[:, :h, :w], labels[:h, :w] = img, mask
    y0 = int(torch.randint(0, canvas.shape[1] - CROP + 1, (1,)))
    x0 = int(torch.randint(0, canvas.shape[2] - CROP + 1, (1,)))
    return canvas[:, y0:y0 + CROP, x0:x0 + CROP], labels[y0:y0 + CROP, x0:x0 + CROP]


def test_matches_whole_image_reference(root):
    """Same draws, same sample as jittering / resizing the whole image first: equal masks; images equal but
    for rounding to uint8 levels (mean < 0.02 ~ 1 level) and where a jitter clamp meets the resampling filter
    (jitter after the resize here)."""
    ds = data.VPODataset(root, "ms", "train", train=True, crop=CROP)
    for seed in range(8):
        torch.manual_seed(seed)
        x = ds[0]
        image, mask = _reference(ds, 0, seed)
        assert torch.equal(x["mask"], mask)
        diff = (x["image"] - image).abs()
        assert float(diff.mean()) < 0.02 and float((diff > 0.05).float().mean()) < 0.03


def test_flip_mirrors_image_mask_and_channels(root, monkeypatch):
    """With the same other draws, the flipped sample is the mirror of the unflipped one: image, mask, stereo
    channels swapped and positions 1 - p."""
    ds = data.VPODataset(root, "ms", "train", train=True, crop=None)
    for seed in range(4):
        out = []
        for u in (0.9, 0.1):  # torch.rand decides the flip (< 0.5) and nothing else
            monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full(a, u))
            torch.manual_seed(seed)
            out.append(ds[0])
        plain, flipped = out
        assert torch.allclose(flipped["image"], plain["image"].flip(-1), atol=1e-6)
        assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
        assert torch.allclose(flipped["wave"], plain["wave"].flip(0), atol=1e-6)
        heard = plain["source_pos"] >= 0
        assert torch.allclose(flipped["source_pos"][heard], 1 - plain["source_pos"][heard], atol=1e-6)


@pytest.mark.parametrize("rate", [44100, 22050, 48000, 8000])
def test_load_clip_cut_before_resampling(tmp_path, rate):
    """Cutting the crop (with its margin) before resampling gives the samples of resampling the whole clip:
    centred 3 s and 5 s from the start, long and short (repeat-padded) clips, mono and stereo."""
    rng = np.random.default_rng(rate)
    for seconds in (1.3, 3.0, 3.01, 10.0):
        x = rng.uniform(-0.9, 0.9, (2, int(seconds * rate)))
        data.write_wav(tmp_path / "c.wav", x, rate)
        whole = torchaudio.functional.resample(torch.from_numpy(data.read_wav(tmp_path / "c.wav")[0]), rate, 16000)
        for length, centre in ((3.0, True), (5.0, False)):
            want = data.fit_length(whole, int(length * 16000), centre)
            got = data.load_clip(tmp_path / "c.wav", seconds=length, centre=centre)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
            mono = data.load_clip(tmp_path / "c.wav", seconds=length, centre=centre, mono=True)
            assert torch.allclose(mono, want.mean(0, keepdim=True), atol=1e-4)


def test_pan_flag_reaches_the_datasets(tiny_vpo):
    for script, build in ((cavp, lambda a: cavp.build_datasets(a, ["train"])),
                          (tpavi, lambda a: tpavi.build_datasets(a, tpavi.DATASETS[a.data], ["train"]))):
        assert script.parse_args(["--data-root", tiny_vpo]).pan == "csv"
        assert build(script.parse_args(["--data-root", tiny_vpo, "--pan", "crop"]))["train"].pan == "crop"
    with pytest.raises(data.DataError, match="unknown pan"):
        data.VPODataset(tiny_vpo, "ms", "train", pan="mask")
