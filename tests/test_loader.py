"""The fast VPO training loader and pans that follow the augmentation (--pan crop), on
fixtures with known rectangle objects written in the released VPO layout."""
import numpy as np
import pytest
import torch
import torchaudio
import torchvision.transforms.v2.functional as TF
from PIL import Image

import cavp
import data
import tpavi
from fixtures_layouts import shown, write_vpo

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
        mask, image = x["mask"].tolist(), shown(x)
        assert image.shape == (3, CROP, CROP) and x["mask"].shape == (CROP, CROP)
        assert (x["mask"][h - y0:] == 255).all() and (x["mask"][:, w - x0:] == 255).all()  # padding
        mean = 255 * data.MEAN
        assert (image[:, h - y0:] == mean).all() and (image[:, :, w - x0:] == mean).all()
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
    """The augmentation written plainly on the whole image (a slow, plain reference): jitter,
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
    img = (TF.resize(img, [h, w], antialias=True).clamp(0, 1) - data.MEAN) / data.STD
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
    for PIL's rounding in the reference's resize (mean < 0.02 ~ 1 level) and where a jitter clamp meets the
    resampling filter (jitter after the resize here)."""
    ds = data.VPODataset(root, "ms", "train", train=True, crop=CROP)
    for seed in range(8):
        torch.manual_seed(seed)
        x = ds[0]
        image, mask = _reference(ds, 0, seed)
        assert torch.equal(x["mask"].long(), mask)
        diff = (data.device_batch(data.pad_collate([x]), torch.device("cpu"), ("image",))[0][0]
                - image).abs()
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
        assert torch.equal(flipped["image"], plain["image"])  # the source
        assert torch.allclose(shown(flipped), shown(plain).flip(-1), rtol=0, atol=1e-3)
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


@pytest.mark.parametrize("rate", [44100, 22050, 11025, 48000, 8000])
def test_block_sparse_resampling_is_torchaudios(rate):
    """data._resampler: torchaudio's output length, and its samples up to float sums: off the float64
    resampling by at most twice torchaudio's own float32 error. 44.1 / 22.05 / 11.025 kHz go block-sparse,
    48 / 8 kHz through torchaudio's convolution."""
    rng = np.random.default_rng(rate)
    resample = data._resampler(rate, 16000)
    assert (resample.groups is None) == (rate in (48000, 8000))
    for n in (1, 7, 1000, 3 * rate + 517):
        x = torch.from_numpy(rng.uniform(-1, 1, (2, n)).astype(np.float32))
        exact = torchaudio.functional.resample(x.double(), rate, 16000)
        want = torchaudio.functional.resample(x, rate, 16000)
        got = resample(x)
        assert got.shape == want.shape
        assert float((got - exact).abs().max()) <= 2 * float((want - exact).abs().max()) + 1e-7


def test_pan_flag_reaches_the_datasets(tiny_vpo):
    for script, build in ((cavp, lambda a: cavp.build_datasets(a, ["train"])),
                          (tpavi, lambda a: tpavi.build_datasets(a, tpavi.DATASETS[a.data], ["train"]))):
        assert script.parse_args(["--data-root", tiny_vpo]).pan == "csv"
        assert build(script.parse_args(["--data-root", tiny_vpo, "--pan", "crop"]))["train"].pan == "crop"
    with pytest.raises(data.DataError, match="unknown pan"):
        data.VPODataset(tiny_vpo, "ms", "train", pan="mask")


def _float_augment(im, mask, crop):
    """The training augmentation with float images that the device windows replace, as a reference: the
    same draws in the same order, PIL's resize of the window (uint8), flip and a brightness / contrast
    table rounded to levels; saturation and the normalisation in float32 on the window, padding 0 (the
    mean) -> (image, mask long, flipped, (brightness, contrast, saturation))."""
    bright, contrast, sat = (float(torch.empty(1).uniform_(1 - data.JITTER, 1 + data.JITTER))
                             for _ in range(3))
    flip = bool(torch.rand(1) < 0.5)
    s = float(torch.empty(1).uniform_(*data.SCALE))
    w_src, h_src = im.size
    h, w = max(1, round(h_src * s)), max(1, round(w_src * s))
    ch, cw, y0, x0 = h, w, 0, 0
    if crop is not None:
        ch = cw = crop
        y0 = int(torch.randint(0, max(h, ch) - ch + 1, (1,)))
        x0 = int(torch.randint(0, max(w, cw) - cw + 1, (1,)))
    vh, vw = min(h - y0, ch), min(w - x0, cw)
    left = w - x0 - vw if flip else x0
    sy, sx = h_src / h, w_src / w
    win = im.resize((vw, vh), Image.BILINEAR,
                    box=(left * sx, y0 * sy, (left + vw) * sx, (y0 + vh) * sy))
    rows = np.arange(2 * y0 + 1, 2 * (y0 + vh), 2) * h_src // (2 * h)
    cols = np.arange(2 * left + 1, 2 * (left + vw), 2) * w_src // (2 * w)
    if flip:
        win, cols = win.transpose(Image.FLIP_LEFT_RIGHT), cols[::-1]
    hist = np.asarray(im.histogram(), np.float64).reshape(3, 256)
    levels = np.minimum(np.arange(256) * bright, 255.0)
    mean = data._GREY.double().numpy() @ (hist @ levels) / hist[0].sum()
    lut = np.clip(contrast * levels + (1 - contrast) * mean, 0, 255).round()
    x = torch.from_numpy(np.array(win.point(lut.tolist() * 3))).permute(2, 0, 1).float()
    x = x.mul(sat).add(torch.tensordot(data._GREY * (1 - sat), x, 1)).clamp(0.0, 255.0)
    image, labels = torch.zeros(3, ch, cw), torch.full((ch, cw), 255)
    image[:, :vh, :vw] = x.mul(1.0 / (255.0 * data.STD)).sub(data.MEAN / data.STD)
    labels[:vh, :vw] = torch.from_numpy(np.asarray(mask).take(rows, 0).take(cols, 1))
    return image, labels, flip, (bright, contrast, sat)


@pytest.mark.parametrize("crop", [CROP, 200, None])
def test_device_window_is_the_float_path_without_its_roundings(root, crop):
    """Same seed, same draws (the RNG ends in the same state), same crop, flip and mask as the float path.
    The step's image (window_images, normalised) differs from it only by the float path's roundings to uint8
    levels: PIL's resize (after each of its two passes, <= 1 level together), then the brightness / contrast
    table (0.5), carried through the jitter: per pixel at most (brightness x contrast + 0.5) x (|s| + |1 - s|)
    levels for saturation s; 0.4 level on average. Padding: 0 within float32. On the fixture's image and on
    uniform noise, whose jitter often meets the clamps."""
    s = data.VPODataset(root, "ms", "train").samples[0]
    noise = np.random.default_rng(0).integers(0, 256, (FH, FW, 3), dtype=np.uint8)
    mask = data.read_vpo_mask(s["mask"])
    level = 1 / (255 * data.STD)
    for im in (data._open_image(s["image"], "RGB"), Image.fromarray(noise)):
        mean = []
        for seed in range(12):
            torch.manual_seed(seed)
            source, window, labels, flip, _ = data.augment(im, mask, crop)
            after = torch.get_rng_state()
            torch.manual_seed(seed)
            ref, ref_labels, ref_flip, (b, c, sat) = _float_augment(im, mask, crop)
            assert torch.equal(torch.get_rng_state(), after) and flip == ref_flip
            assert source.dtype == labels.dtype == torch.uint8 and torch.equal(source, data._rgb(im))
            assert torch.equal(labels.long(), ref_labels)
            batch = data.pad_collate([dict(image=source, window=window)])
            image = data.device_batch(batch, torch.device("cpu"), ("image",))[0][0]
            assert image.shape == ref.shape
            bound = (b * c + 0.5) * (abs(sat) + abs(1 - sat)) * level + 1e-5
            assert ((image - ref).abs() <= bound).all()
            mean.append(float(((image - ref).abs() / level).mean()))
            padding = image[:, ref_labels == 255]
            assert padding.numel() == 0 or float(padding.abs().max()) < 1e-6
        assert np.mean(mean) < 0.4


def test_window_resize_is_pils():
    """_bilinear's matrices give PIL's bilinear resize of a box (shrinking, enlarging, sub-pixel boxes, a
    flip, the image's edges) within PIL's own rounding: < 1 level (two roundings of its uint8 passes)."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    source = torch.from_numpy(arr).permute(2, 0, 1)[None]
    for box, size, flip in [((0, 0, 53, 37), (53, 37), False), ((3.5, 2.25, 40.1, 30.7), (11, 9), False),
                            ((3.5, 2.25, 40.1, 30.7), (70, 50), True), ((0, 0, 53, 37), (20, 64), True),
                            ((41.2, 0.3, 53, 37), (5, 61), False)]:
        want = im.resize(size, Image.BILINEAR, box=box)
        want = np.asarray(want.transpose(Image.FLIP_LEFT_RIGHT) if flip else want)
        window = torch.tensor([[*box, *size, *size, 53, 37, flip, 1, 1, 1]], dtype=torch.float64)
        got = data.window_images(source, window)[0].permute(1, 2, 0)
        diff = (got - torch.from_numpy(want.astype(np.float32))).abs()
        assert float(diff.max()) < 1.0 and float(diff.mean()) < 0.4, (box, size, flip)


def test_sources_of_two_sizes_collate_and_window_alone():
    """Sources of different sizes in one batch (padded by pad_collate, channels last as decoded) give each
    image what it gives alone; a crop larger than the scaled image pads with the mean colour."""
    rng = np.random.default_rng(2)
    torch.manual_seed(0)
    samples = []
    for h, w in ((30, 41), (47, 22)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        source, window, labels, _, _ = data.augment(im, Image.new("L", (w, h)), 36)
        samples.append(dict(image=source, window=window, mask=labels))
    batch = data.pad_collate(samples)
    assert batch["image"].shape == (2, 3, 47, 41) and batch["image"].permute(0, 2, 3, 1).is_contiguous()
    together = data.window_images(batch["image"], batch["window"])
    for k, x in enumerate(samples):
        assert torch.allclose(together[k], shown(x), rtol=0, atol=1e-3)


def test_device_normalisation_equals_the_cpu_one():
    """normalize on the step's device (CPU, and CUDA where present) gives the float32 of the CPU,
    bit for bit: x * (1 / (255 STD)) - MEAN / STD, within 1e-6 of (x / 255 - MEAN) / STD; device_batch
    normalises images, makes label maps int64 and leaves the rest."""
    x = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 2, 1)
    cpu = x.float().mul_(1.0 / (255.0 * data.STD)).sub_(data.MEAN / data.STD)
    assert torch.allclose(cpu, (x / 255.0 - data.MEAN) / data.STD, rtol=0, atol=1e-6)
    batch = dict(image=x, mask=torch.full((2, 2, 256), 255, dtype=torch.uint8), wave=torch.rand(2, 2, 9),
                 twin=torch.ones(2, 2, 256, dtype=torch.uint8))
    for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
        image, mask, wave, twin = data.device_batch(batch, torch.device(device),
                                                    ("image", "mask", "wave", "twin"))
        assert image.device.type == device and image.dtype == torch.float32
        assert torch.equal(image.cpu(), cpu) and torch.equal(data.normalize(x.to(device)).cpu(), cpu)
        assert mask.dtype == twin.dtype == torch.long and torch.equal(mask.cpu(), batch["mask"].long())
        assert torch.equal(wave.cpu(), batch["wave"])
