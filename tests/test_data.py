"""Tests for data.py: WAV I/O, audio crop, LogMel, VPO and AVSBench readers on tiny released-layout fixtures."""
import json
import math
import os
import re
import struct
import wave

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (AVSBenchDataset, DataError, LogMel, VPODataset, avss_palette, fit_length,
                  load_clip, pad_collate, read_wav, write_wav)
from fixtures_layouts import AVSS_COLOURS, H, W, shown, write_avss, write_ms3, write_s4, write_vpo

MALE, FEMALE, BABY, DOG, CAT, CAR = (data.VPO_CLASSES.index(c) for c in
                                     ("male", "female", "baby", "dog", "cat", "car"))


def raises_naming(path, match=""):
    """DataError whose single-line message names `path`."""
    return pytest.raises(DataError, match=re.escape(os.fspath(path)) + match)


# ---------------------------------------------------------------- constants
def test_class_tables():
    assert len(data.VPO_CLASSES) == 22 and data.VPO_CLASSES[0] == "background"
    assert data.VPO_COCO_IDS[-3:] == [92, 93, 94] and (MALE, FEMALE, BABY) == (19, 20, 21)
    assert data.VPO_COCO_IDS == sorted(data.VPO_COCO_IDS) and len(data.VPO_COCO_IDS) == 21
    assert set(data.VPO_AUDIO_LABELS) == set(data.VPO_CLASSES[1:])
    assert data.VPO_AUDIO_LABELS["cat"] == ["cat purring", "cat meowing", "cat caterwauling"]


# ---------------------------------------------------------------- WAV I/O
def _riff(path, tag, channels, rate, bits, payload, extensible=False):
    """Hand-written RIFF/WAVE file (for formats the stdlib `wave` writer does not produce)."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHIH", 22, bits, 0, tag) + guid_tail  # cbSize, valid bits, mask, sub-format
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(payload)) + payload)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


VALUES = np.array([0.0, 0.5, -0.5, -1.0, 0.25])


@pytest.mark.parametrize("channels", [1, 2])
def test_write_read_roundtrip(tmp_path, channels):
    x = np.stack([VALUES * (c + 1) / 2 for c in range(channels)])
    write_wav(tmp_path / "a.wav", x if channels == 2 else x[0], 22050)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 22050 and y.shape == (channels, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, x, atol=1 / 32767)
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == channels
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]  # no temp file left behind


def test_write_wav_clips_summed_sources(tmp_path):
    write_wav(tmp_path / "c.wav", np.array([1.7, -3.0, 0.5]))
    y, _ = read_wav(tmp_path / "c.wav")
    np.testing.assert_allclose(y[0], [32767 / 32768, -32767 / 32768, 16384 / 32768])


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_pcm_widths(tmp_path, width):
    full = 2 ** (8 * width - 1)
    ints = np.round(VALUES * full).astype(np.int64).clip(-full, full - 1)
    stereo = np.stack([ints, ints[::-1]]).T.reshape(-1)  # interleaved L, R
    if width == 1:
        raw = (stereo + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in stereo)
    with wave.open(str(tmp_path / "p.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(raw)
    y, rate = read_wav(tmp_path / "p.wav")
    assert rate == 8000 and y.shape == (2, 5)
    np.testing.assert_allclose(y[0], ints / full, atol=1e-7)
    np.testing.assert_allclose(y[1], ints[::-1] / full, atol=1e-7)


@pytest.mark.parametrize("extensible", [False, True])
def test_read_float_wav(tmp_path, extensible):
    x = np.stack([VALUES, VALUES[::-1]]).astype("<f4")
    _riff(tmp_path / "f.wav", 3, 2, 44100, 32, x.T.tobytes(), extensible)
    y, rate = read_wav(tmp_path / "f.wav")
    assert rate == 44100
    np.testing.assert_array_equal(y, x)


def test_load_clip_resamples(tmp_path):
    t = np.arange(8000 * 3) / 8000
    write_wav(tmp_path / "s.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 8000)
    x = load_clip(tmp_path / "s.wav")
    assert x.shape == (1, 48000) and x.dtype == torch.float32
    peak_hz = torch.fft.rfft(x[0]).abs().argmax().item() * 16000 / 48000
    assert abs(peak_hz - 440) < 1
    assert abs(x.abs().max().item() - 0.5) < 0.02


def test_fit_length_centre_and_repeat():
    x = torch.arange(10.0)[None]
    assert fit_length(x, 4).tolist() == [[3, 4, 5, 6]]
    assert fit_length(x, 4, centre=False).tolist() == [[0, 1, 2, 3]]
    assert fit_length(torch.arange(3.0)[None], 7).tolist() == [[0, 1, 2, 0, 1, 2, 0]]


def test_load_clip_centred_crop_and_repeat_pad(tmp_path):
    x = np.zeros(5 * 16000)
    x[16000:64000] = 0.5  # seconds 1..4 = the centred 3 s
    write_wav(tmp_path / "long.wav", x)
    c = load_clip(tmp_path / "long.wav")
    assert c.shape == (1, 48000) and torch.allclose(c, torch.full_like(c, 0.5), atol=1e-4)
    ramp = np.linspace(-0.9, 0.9, 16000)
    write_wav(tmp_path / "short.wav", ramp)
    s = load_clip(tmp_path / "short.wav")[0]
    assert s.shape == (48000,)
    assert torch.equal(s[:16000], s[16000:32000]) and torch.equal(s[:16000], s[32000:])
    assert abs(s[0].item() + 0.9) < 1e-4


# ---------------------------------------------------------------- LogMel
def test_logmel_silence_shape_and_floor():
    out = LogMel(frames=300)(torch.zeros(2, 2, 48000))
    assert out.shape == (2, 2, 300, 64)
    assert torch.allclose(out, torch.full_like(out, 20 * math.log10(1e-5) / 100))  # -1.0
    assert LogMel()(torch.zeros(1, 1, 48000)).shape == (1, 1, 301, 64)


def test_logmel_hop_takes_every_other_frame():
    """A 20 ms hop gives the 10 ms hop's even frames (same 25 ms windows at the same centres)."""
    x = torch.randn(1, 2, 48000) * 0.1
    torch.testing.assert_close(LogMel(frames=150, hop=320)(x), LogMel(frames=300)(x)[..., ::2, :])
    assert LogMel(frames=150, hop=320, bands=32)(x).shape == (1, 2, 150, 32)


def test_logmel_centre_reads_the_middle_frames():
    """centre=24000 of 3 s at a 10 ms hop: frame j is the full clip's frame 75 + j (same window at
    the same sample), except at the two ends where the STFT pads the cut clip."""
    x = torch.randn(1, 2, 48000) * 0.1
    cut = LogMel(frames=150, centre=24000)(x)
    assert cut.shape == (1, 2, 150, 64)
    torch.testing.assert_close(cut[..., 2:148, :], LogMel()(x)[..., 77:223, :])
    assert not torch.allclose(cut[..., :1, :], LogMel()(x)[..., 75:76, :])  # reflect-padded end


def test_logmel_tone_bin_and_scale():
    t = torch.arange(48000) / 16000
    tone = 0.1 * torch.sin(2 * math.pi * 1000 * t)[None, None]
    lm = LogMel(frames=300)
    a, b = lm(tone), lm(2 * tone)
    # power spectrum: doubling amplitude adds 20*log10(4)/100 where above the 1e-5 floor
    on = a > -0.9
    assert on.any() and torch.allclose((b - a)[on], torch.tensor(0.2 * math.log10(4)), atol=1e-4)
    # peak mel bin = the HTK-mel triangle centred closest to 1 kHz (64 bands in 125..3800 Hz)
    mel = lambda f: 2595 * math.log10(1 + f / 700)
    centres = [mel(125) + (k + 1) * (mel(3800) - mel(125)) / 65 for k in range(64)]
    expect = min(range(64), key=lambda k: abs(centres[k] - mel(1000)))
    assert a[0, 0, 150].argmax().item() == expect


# ---------------------------------------------------------------- VPO fixtures
def _mask(**cols):
    """H x W mask of COCO ids; cols: name=(id, c0, c1) columns [c0, c1) set to id."""
    m = np.zeros((H, W), np.uint8)
    for cid, c0, c1 in cols.values():
        m[:, c0:c1] = cid
    return m


def _ss(root):
    m = _mask(a=(92, 0, 6), b=(18, 18, 24))
    m[0, 10] = 255
    return write_vpo(root, "ss", [
        dict(img=1, split="train", mask=m, sources=[("male", 92, "[5, 6]", "spk", 0.5, 0.2)]),
        dict(img=2, split="train", mask=_mask(a=(3, 8, 16)), sources=[("car", 3, 7, "car1", 0.25, 0.5)]),
        dict(img=1, split="val", mask=m, sources=[("dog", 18, 9, "dog1", 0.4, 0.85)]),
    ])


def _ms(root):
    return write_vpo(root, "ms", [
        dict(img=10, split="train", mask=_mask(a=(92, 0, 6), b=(17, 18, 24)),
             sources=[("male", 92, 11, "spk", 0.5, 0.2), ("cat", 17, 12, "cat1", 0.25, 0.8)]),
        dict(img=11, split="train", mask=_mask(a=(16, 4, 8)), sources=[("bird", 16, 13, "bird1", 0.4, 0.3)]),
        dict(img=12, split="val", mask=_mask(a=(21, 4, 8)), sources=[("cow", 21, 14, "cow1", 0.2, 0.5)]),
    ])


def _left_object(root):
    """One MS image: a male on the left (columns 0..5), alpha 0.2."""
    return write_vpo(root, "ms", [dict(img=30, split="train", mask=_mask(a=(92, 0, 6)),
                                       sources=[("male", 92, 31, "spk", 0.5, 0.2)])])


def test_vpo_ss_one_sample_per_row(tmp_path):
    _ss(tmp_path)
    train, test = VPODataset(tmp_path, "ss", "train"), VPODataset(tmp_path, "ss", "test")
    assert len(train) == 2 and len(test) == 1
    s = train[0]
    assert s["name"] == "000000000001_000000000005"  # first id of "[5, 6]"
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.uint8
    assert s["mask"].dtype == torch.uint8 and s["mask"].shape == (H, W)
    assert (s["mask"][1:, :6] == MALE).all() and (s["mask"][:, 18:] == DOG).all()
    assert s["mask"][0, 10] == 255 and (s["mask"][:, 6:18][1:] == 0).all()
    assert s["audio_classes"].nonzero().flatten().tolist() == [MALE]
    assert sorted(set(s["mask"].unique().tolist()) - {0, 255}) == [DOG, MALE]
    assert s["audio_pos"].item() == pytest.approx(0.2) and s["audio_pos"].dim() == 0
    # stereo panning: L = (1 - 0.2) * 0.5, R = 0.2 * 0.5 -> object on the left, left louder
    assert s["wave"].shape == (2, 48000)
    assert torch.allclose(s["wave"][0], torch.tensor(0.4), atol=1e-3)
    assert torch.allclose(s["wave"][1], torch.tensor(0.1), atol=1e-3)
    t = test[0]
    assert t["audio_classes"].nonzero().flatten().tolist() == [DOG]
    assert t["wave"][1].mean() > t["wave"][0].mean()  # alpha 0.85: right louder
    # image: the decoded pixels at original resolution in eval
    raw = torch.from_numpy(np.array(Image.open(tmp_path / "VPO-SS/data/male/000000000001.jpg"))).permute(2, 0, 1)
    assert torch.equal(s["image"], raw)


def test_vpo_ms_groups_rows_and_sums_sources(tmp_path):
    _ms(tmp_path)
    ds = VPODataset(tmp_path, "ms", "train")
    assert len(ds) == 2  # 3 CSV rows, 2 images
    s = ds[0]
    assert s["name"] == "000000000010"
    assert s["audio_classes"].nonzero().flatten().tolist() == [CAT, MALE]
    assert sorted(set(s["mask"].unique().tolist()) - {0}) == [CAT, MALE]
    assert s["audio_pos"].item() == -1.0
    # L = 0.8 * 0.5 + 0.2 * 0.25, R = 0.2 * 0.5 + 0.8 * 0.25
    assert torch.allclose(s["wave"].mean(1), torch.tensor([0.45, 0.30]), atol=1e-3)
    mono = VPODataset(tmp_path, "ms", "train", stereo=False)[0]["wave"]
    assert mono.shape == (1, 48000) and torch.allclose(mono, torch.tensor(0.75), atol=1e-3)
    assert torch.allclose(mono[0], s["wave"].sum(0), atol=1e-6)
    assert len(VPODataset(tmp_path, "ms", "test")) == 1 and len(VPODataset(tmp_path, "ms", "val")) == 1
    assert len(VPODataset(tmp_path, "ms", "train", limit=1)) == 1


def test_vpo_msmi_multi_instance(tmp_path):
    write_vpo(tmp_path, "msmi", [
        dict(img=20, split="train", mask=_mask(a=(93, 0, 6), b=(93, 18, 24)),
             sources=[("female", 93, 21, "f1", 0.3, 0.1), ("female", 93, 22, "f2", 0.3, 0.9)]),
        dict(img=21, split="val", mask=_mask(a=(94, 0, 24)), sources=[("baby", 94, 23, "b1", 0.3, 0.5)]),
    ])
    s = VPODataset(tmp_path, "msmi", "train")[0]
    assert s["audio_classes"].nonzero().flatten().tolist() == [FEMALE]
    assert torch.allclose(s["wave"].mean(1), torch.tensor([0.3, 0.3]), atol=1e-3)
    t = VPODataset(tmp_path, "msmi", "test")[0]
    assert (t["mask"] == BABY).all() and t["audio_pos"].item() == pytest.approx(0.5)


def _force(monkeypatch, flip):
    """Train augmentation with scale 1 and no jitter; torch.rand decides the flip."""
    monkeypatch.setattr(data, "SCALE", (1.0, 1.0))
    monkeypatch.setattr(data, "JITTER", 0.0)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full(a, 0.0 if flip else 0.9))


@pytest.mark.parametrize("flip", [False, True])
def test_flip_mirrors_mask_and_stereo(tmp_path, monkeypatch, flip):
    _left_object(tmp_path)
    ev = VPODataset(tmp_path, "ms", "train")[0]
    assert (ev["mask"][:, :6] == MALE).all() and ev["wave"][0].mean() > ev["wave"][1].mean()
    _force(monkeypatch, flip)
    s = VPODataset(tmp_path, "ms", "train", train=True, crop=None)[0]
    left, right = (s["mask"][:, :6] == MALE).all(), (s["mask"][:, -6:] == MALE).all()
    assert (left, right) == (not flip, flip)
    assert (s["wave"][1].mean() > s["wave"][0].mean()) == flip  # right louder iff flipped
    assert torch.allclose(s["wave"].mean(1), torch.tensor([0.1, 0.4] if flip else [0.4, 0.1]), atol=1e-3)
    assert s["audio_pos"].item() == pytest.approx(0.8 if flip else 0.2)
    assert torch.equal(s["image"], ev["image"])  # the source; the step flips it (jitter forced to 1)
    assert torch.allclose(shown(s), ev["image"].float().flip(-1) if flip else ev["image"].float(), atol=1e-3)


def test_random_crop_pads_mask_255_and_image_mean(tmp_path, monkeypatch):
    _left_object(tmp_path)
    _force(monkeypatch, False)
    s = VPODataset(tmp_path, "ms", "train", train=True, crop=32)[0]
    image = shown(s)
    assert image.shape == (3, 32, 32) and s["mask"].shape == (32, 32)
    assert (s["mask"][H:] == 255).all() and (s["mask"][:, W:] == 255).all()
    assert (s["mask"][:H, :6] == MALE).all() and (s["mask"][:H, 6:W] == 0).all()
    mean = 255 * data.MEAN
    assert (image[:, H:] == mean).all() and (image[:, :, W:] == mean).all()


def test_train_augmentation_seeded_and_scaled(tmp_path):
    _ms(tmp_path)
    ds = VPODataset(tmp_path, "ms", "train", train=True, crop=None)
    outs = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        outs.append(ds[0])
    assert torch.equal(outs[0]["window"], outs[1]["window"]) and torch.equal(outs[0]["mask"], outs[1]["mask"])
    assert torch.equal(shown(outs[0]), shown(outs[1]))
    assert any(shown(o).shape != shown(outs[0]).shape for o in outs[2:])
    for o in outs:
        h, w = o["mask"].shape
        assert H // 2 <= h <= 2 * H and abs(w / h - W / H) < 0.2
        assert set(o["mask"].unique().tolist()) <= {0, MALE, CAT}
        assert "image_classes" not in o  # the sample dict carries no image class set
    torch.manual_seed(0)
    c = VPODataset(tmp_path, "ms", "train", train=True, crop=8)[1]
    assert shown(c).shape == (3, 8, 8) and c["mask"].shape == (8, 8)


# ---------------------------------------------------------------- counterfactual audio (audio alignment)
def _coco_json(root, images, anns):
    """COCO instances JSON; anns: (image_id, category name) pairs."""
    cats = {"person": 1, "car": 3, "cat": 17, "dog": 18, "chair": 62}
    path = os.path.join(root, "instances_val2017.json")
    with open(path, "w") as f:
        json.dump(dict(images=[dict(id=i) for i in images],
                       categories=[dict(id=v, name=k) for k, v in cats.items()],
                       annotations=[dict(id=j, image_id=i, category_id=cats[c]) for j, (i, c) in enumerate(anns)]), f)
    return path


def _two_test_images(root):
    """img 40: dog sounds (clip level 0.4), a cat is silent; img 41: car sounds (0.25), persons around."""
    write_vpo(root, "ms", [
        dict(img=40, split="val", mask=_mask(a=(18, 0, 6), b=(255, 10, 12)), sources=[("dog", 18, 1, "dog1", 0.4, 0.3)]),
        dict(img=41, split="val", mask=_mask(a=(3, 4, 8)), sources=[("car", 3, 2, "car1", 0.25, 0.6)]),
    ])
    return _coco_json(root, [40, 41], [(40, "dog"), (40, "cat"), (40, "chair"), (41, "car"), (41, "person")])


def test_coco_visible_classes_persons_and_non_vpo(tmp_path):
    visible = data.coco_visible_classes(_two_test_images(tmp_path))
    assert visible == {40: {DOG, CAT}, 41: {CAR, MALE, FEMALE, BABY}}  # chair ignored, person -> 3 classes


@pytest.mark.parametrize("stereo", [True, False])
def test_counterfactual_silence(tmp_path, stereo):
    _two_test_images(tmp_path)
    base = VPODataset(tmp_path, "ms", "test", stereo=stereo)
    cf = data.CounterfactualAudio(base, "silence")
    for i in range(len(base)):
        real, s = base[i], cf[i]
        assert s["wave"].shape == real["wave"].shape == (2 if stereo else 1, 48000) and not s["wave"].any()
        assert ((s["mask"] == 255) == (real["mask"] == 255)).all() and (s["mask"][s["mask"] != 255] == 0).all()
        assert torch.equal(s["image"], real["image"]) and not s["audio_classes"].any()
    assert (base[0]["mask"] == 255).any()  # the ignore region is kept


def test_counterfactual_absent_class_clip(tmp_path):
    ann = _two_test_images(tmp_path)
    base = VPODataset(tmp_path, "ms", "test")
    cf = data.eval_audio_set(base, "absent", ann, seed=3)
    # test clips: dog (0.4) and car (0.25); the only class absent from img 40 is car, from img 41 dog
    for i, (cls, level) in enumerate([(CAR, 0.25), (DOG, 0.4)]):
        s = cf[i]
        a = s["audio_pos"].item()
        assert 0 <= a <= 1 and s["audio_classes"].nonzero().flatten().tolist() == [cls]
        assert torch.allclose(s["wave"].mean(1), torch.tensor([(1 - a) * level, a * level]), atol=1e-3)
        assert (s["mask"][s["mask"] != 255] == 0).all()
        assert torch.equal(s["wave"], cf[i]["wave"])  # fixed by (seed, index)
    assert data.eval_audio_set(base, "real") is base
    mono = data.CounterfactualAudio(VPODataset(tmp_path, "ms", "test", stereo=False), "absent",
                                    data.coco_visible_classes(ann))[1]["wave"]
    assert mono.shape == (1, 48000) and torch.allclose(mono, torch.tensor(0.4), atol=1e-3)


def test_counterfactual_errors(tmp_path):
    ann = _two_test_images(tmp_path)
    base = VPODataset(tmp_path, "ms", "test")
    with raises_naming(tmp_path / "nope.json", " not found"):
        data.eval_audio_set(base, "absent", str(tmp_path / "nope.json"))
    with raises_naming(tmp_path / "sources/coco/annotations/instances_val2017.json", " not found: pass --coco-ann"):
        data.eval_audio_set(base, "absent")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with raises_naming(bad, ": not a COCO instances file"):
        data.coco_visible_classes(str(bad))
    with pytest.raises(DataError, match="img_Id 41 .*--coco-ann"):
        data.CounterfactualAudio(base, "absent", {40: {DOG}})
    crowded = data.CounterfactualAudio(base, "absent", {40: {DOG, CAR}, 41: {CAR}})
    with pytest.raises(DataError, match="img_Id 40: every class"):
        crowded[0]


def test_pad_collate(tmp_path):
    _ms(tmp_path)
    ds = VPODataset(tmp_path, "ms", "train")
    a, b = ds[0], ds[1]
    b = dict(b, image=b["image"][:, :10, :20], mask=b["mask"][:10, :20])
    batch = pad_collate([a, b])
    assert batch["image"].shape == (2, 3, H, W) and batch["mask"].shape == (2, H, W)
    assert (batch["mask"][1, 10:] == 255).all() and (batch["mask"][1, :, 20:] == 255).all()
    assert (batch["image"][1, :, 10:] == data.MEAN_LEVELS).all() and torch.equal(batch["mask"][0], a["mask"])
    assert torch.equal(batch["image"][1, :, :10, :20], b["image"])
    assert batch["wave"].shape == (2, 2, 48000) and batch["audio_pos"].shape == (2,)
    assert batch["name"] == ["000000000010", "000000000011"]
    # written straight into shared memory (as in a DataLoader worker): the same batch
    for pair in ([a, b], [a, a]):
        plain, shared = pad_collate(pair, shared=False), pad_collate(pair, shared=True)
        for key, v in plain.items():
            if torch.is_tensor(v):
                assert shared[key].is_shared() and not v.is_shared() and torch.equal(shared[key], v)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=pad_collate)
    assert next(iter(loader))["audio_classes"].shape == (2, 22)
    worker = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=pad_collate, num_workers=1)))
    for key, v in next(iter(loader)).items():
        assert torch.equal(worker[key], v) if torch.is_tensor(v) else worker[key] == v


# ---------------------------------------------------------------- AVSBench
def test_s4_semi_supervised_train_and_test(tmp_path):
    write_s4(tmp_path, [("a1", "dog_barking", "train"), ("a2", "race_car", "train"),
                        ("b1", "dog_barking", "test")])
    train = AVSBenchDataset(tmp_path, "s4", "train", size=None)
    assert len(train) == 2
    s = train[0]
    assert s["image"].shape == (5, 3, 20, 30) and s["mask"].shape == (5, 20, 30) and s["name"] == "a1"
    assert (s["mask"][0, :, :10] == 1).all() and (s["mask"][0, :, 10:] == 0).all()
    assert (s["mask"][1:] == 255).all() and s["valid"].all()
    assert s["wave"].shape == (1, 80000) and abs(s["wave"][0, 8000:72000].mean().item() - 0.2) < 1e-3
    assert AVSBenchDataset(tmp_path, "s4", "train", size=None, stereo=True)[0]["wave"].shape == (2, 80000)
    t = AVSBenchDataset(tmp_path, "s4", "test", size=16)[0]
    assert t["image"].shape == (5, 3, 16, 16) and t["mask"].shape == (5, 16, 16)
    assert (t["mask"][:, :, :5] == 1).all() and (t["mask"][:, :, 6:] == 0).all()  # grey and RGB gt


def test_ms3_all_frames_labelled(tmp_path):
    write_ms3(tmp_path, [("m1", "train"), ("m2", "val")])
    ds = AVSBenchDataset(tmp_path / "Multi-sources", "ms3", "train")  # root = the CSV folder also works
    s = ds[0]
    assert len(ds) == 1 and s["name"] == "m1" and s["image"].shape == (5, 3, 224, 224)
    assert (s["mask"][:, :, 112:] == 1).all() and (s["mask"][:, :, :112] == 0).all()
    assert len(AVSBenchDataset(tmp_path, "ms3", "val")) == 1


def test_avss_palette_matches_release_rule():
    pal = avss_palette()
    assert pal.shape == (71, 3) and len({tuple(c) for c in pal}) == 71
    for cls, colour in AVSS_COLOURS.items():
        assert tuple(pal[cls]) == colour


def test_avss_decode_is_the_palette_lookup():
    """decode_avss = the class of each pixel's colour in avss_palette(); the first unknown colour (in RGB
    order) named, also where it is one bit off a palette colour."""
    pal = avss_palette()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 71, (37, 53))
    assert np.array_equal(data.decode_avss(pal[labels]), labels)
    assert np.array_equal(data.decode_avss(pal[labels].astype(np.int32)), labels)
    for bad in ((255, 255, 255), (129, 0, 0), (0, 0, 32)):  # (0, 0, 32): top bits of no class
        rgb = pal[labels]
        rgb[5, 7], rgb[9, 1] = bad, (255, 255, 255)
        with pytest.raises(DataError, match=re.escape(f"m.png: colour {bad} is not in the AVSS")):
            data.decode_avss(rgb, "m.png")


def test_avss_decode_and_padding(tmp_path):
    write_avss(tmp_path, [("u1", "v1s", "train", 3), ("u2", "v2", "train", 70), ("u3", "v1m", "train", 15),
                          ("u4", "v1m", "test", 1)])
    ds = AVSBenchDataset(tmp_path, "avss", "train", size=None)
    assert len(ds) == 3
    u1, u2, u3 = ds[0], ds[1], ds[2]
    assert u1["image"].shape == (10, 3, 12, 18) and u1["mask"].shape == (10, 12, 18)
    assert u1["valid"].tolist() == [True] * 5 + [False] * 5
    assert (u1["mask"][0, :6] == 3).all() and (u1["mask"][0, 6:] == 0).all() and (u1["mask"][1:] == 255).all()
    assert (u1["image"][5:] == data.MEAN_LEVELS).all() and u1["image"][:5].float().std() > 0
    assert u1["wave"].shape == (1, 160000) and (u1["wave"][:, 80000:] == 0).all()
    assert abs(u1["wave"][0, :80000].mean().item() - 0.3) < 1e-3
    assert u2["valid"].all() and (u2["mask"][:, :6] == 70).all() and (u2["mask"][:, 6:] == 0).all()
    assert (u3["mask"][:5, :6] == 15).all() and (u3["mask"][5:] == 255).all()
    assert (AVSBenchDataset(tmp_path, "avss", "test", size=None)[0]["mask"][:5, :6] == 1).all()
    batch = pad_collate([u1, u2])
    assert batch["image"].shape == (2, 10, 3, 12, 18) and batch["valid"].shape == (2, 10)
    five = AVSBenchDataset(tmp_path, "avss", "train", size=8, frames=5)[1]
    assert five["image"].shape == (5, 3, 8, 8) and five["wave"].shape == (1, 80000)


# ---------------------------------------------------------------- bad inputs -> DataError naming the file
def _vpo_errors(tmp_path):
    _ss(tmp_path)
    return tmp_path / "VPO-SS"


def test_error_missing_root_and_csv(tmp_path):
    with raises_naming(tmp_path / "VPO-MSMI", ".*vpo_make.py"):
        VPODataset(tmp_path, "msmi", "train")
    base = _vpo_errors(tmp_path)
    os.remove(base / "vpo_ss_data_stereo.csv")
    with raises_naming(base / "vpo_ss_data_stereo.csv"):
        VPODataset(tmp_path, "ss", "train")


def test_error_missing_listed_files(tmp_path):
    base = _vpo_errors(tmp_path)
    os.remove(base / "mask/car/000000000002_000000000007.png")
    with raises_naming(base / "mask/car/000000000002_000000000007.png"):
        VPODataset(tmp_path, "ss", "train")
    os.remove(tmp_path / "audio/dog1.wav")
    with raises_naming(tmp_path / "audio/dog1.wav", ".*--audio-root"):
        VPODataset(tmp_path, "ss", "test")
    with raises_naming(tmp_path / "elsewhere"):
        VPODataset(tmp_path, "ss", "test", audio_root=tmp_path / "elsewhere")


def test_error_bad_csv(tmp_path):
    base = _vpo_errors(tmp_path)
    csv_path = base / "vpo_ss_data_stereo.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("val", "train"))
    with raises_naming(csv_path, ".*split"):  # empty test split
        VPODataset(tmp_path, "ss", "test")
    csv_path.write_text(text.replace("audio_pos", "pos"))
    with raises_naming(csv_path, ".*audio_pos"):
        VPODataset(tmp_path, "ss", "train")
    csv_path.write_text(text.replace(",92,", ",1,"))
    with raises_naming(csv_path, ".*cateId 1"):
        VPODataset(tmp_path, "ss", "train")


def test_error_decoding(tmp_path):
    base = _vpo_errors(tmp_path)
    ds = VPODataset(tmp_path, "ss", "train")
    Image.fromarray(_mask(a=(1, 0, 4))).save(base / "mask/car/000000000002_000000000007.png")  # COCO 1 = person
    with raises_naming(base / "mask/car/000000000002_000000000007.png", ".*value 1 "):
        ds[1]
    (base / "data/male/000000000001.jpg").write_bytes(b"not a jpeg")
    with raises_naming(base / "data/male/000000000001.jpg"):
        ds[0]
    (tmp_path / "audio/car1.wav").write_bytes(b"garbage")
    Image.fromarray(_mask(a=(3, 0, 4))).save(base / "mask/car/000000000002_000000000007.png")
    with raises_naming(tmp_path / "audio/car1.wav"):
        ds[1]
    _riff(tmp_path / "adpcm.wav", 2, 1, 8000, 4, b"\x00" * 8)
    with raises_naming(tmp_path / "adpcm.wav", ".*format tag 2"):
        read_wav(tmp_path / "adpcm.wav")
    with raises_naming(tmp_path / "none.wav"):
        read_wav(tmp_path / "none.wav")


def test_error_unknown_names(tmp_path):
    with pytest.raises(DataError, match="subset"):
        VPODataset(tmp_path, "xx", "train")
    with pytest.raises(DataError, match="split"):
        VPODataset(tmp_path, "ss", "dev")
    with pytest.raises(DataError, match="task"):
        AVSBenchDataset(tmp_path, "s5", "train")
    with pytest.raises(DataError, match="split"):
        AVSBenchDataset(tmp_path, "s4", "dev")
    with raises_naming(tmp_path / "missing"):
        AVSBenchDataset(tmp_path / "missing", "s4", "train")
    with raises_naming(tmp_path / "Single-source/s4_meta_data.csv"):
        AVSBenchDataset(tmp_path, "s4", "train")


def test_error_avsbench_files(tmp_path):
    write_s4(tmp_path, [("a1", "dog_barking", "train")])
    with raises_naming(tmp_path / "Single-source/s4_meta_data.csv", ".*split 'test'"):
        AVSBenchDataset(tmp_path, "s4", "test")
    frame = tmp_path / "Single-source/s4_data/visual_frames/train/dog_barking/a1/a1_3.png"
    os.remove(frame)
    with raises_naming(frame):
        AVSBenchDataset(tmp_path, "s4", "train")
    base = tmp_path / "AVSBench-semantic"
    write_avss(tmp_path, [("u1", "v1m", "test", 3)])
    ds = AVSBenchDataset(tmp_path, "avss", "test", size=None)
    bad = base / "v1m/u1/labels_rgb/2.png"
    Image.fromarray(np.full((12, 18, 3), 7, np.uint8)).save(bad)
    with raises_naming(bad, ".*palette"):
        ds[0]


def test_error_messages_are_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        VPODataset(tmp_path, "ss", "train")
    assert "\n" not in str(e.value) and "--data-root" in str(e.value)
    # what torch's DataLoader builds when a worker raises: the original line survives alone
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "data.py", line 1, in f\ndata.DataError: a.wav: cannot read WAV; re-encode it\n')
    assert str(DataError(wrapped)) == "a.wav: cannot read WAV; re-encode it"


# ---------------------------------------------------------------- silent twins and source positions
def test_source_pos_follows_flip(tiny_vpo):
    """source_pos holds each sounding class's audio_pos (-1 for the others) and mirrors with the image."""
    test = VPODataset(tiny_vpo, "msmi", "test")
    train = VPODataset(tiny_vpo, "msmi", "train", train=True, crop=None)
    for i, s in enumerate(test.samples):
        got = test[i]["source_pos"]
        want = torch.full((len(data.VPO_CLASSES),), -1.0)
        for cls, _, a in s["sources"]:
            want[cls] = a
        assert torch.equal(got, want)
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        x = train[0]
        a = {cls: alpha for cls, _, alpha in train.samples[0]["sources"]}
        heard = x["audio_classes"].nonzero().flatten().tolist()
        flipped = abs(float(x["source_pos"][heard[0]]) - a[heard[0]]) > 1e-6
        flips.add(flipped)
        for c in heard:
            assert float(x["source_pos"][c]) == pytest.approx(1 - a[c] if flipped else a[c])
    assert flips == {True, False}


def test_twins_from_coco_annotations(tiny_vpo):
    """Twins = the other non-crowd instances of a sounding object's category, decoded from the COCO JSON
    (checked with pycocotools' own annToMask), outside the sounding object; only multi-instance images."""
    from pycocotools.coco import COCO
    ann = os.path.join(tiny_vpo, "sources", "coco", "annotations", "instances_val2017.json")
    coco = COCO(ann)
    ds = VPODataset(tiny_vpo, "msmi", "test")
    assert data.attach_twins(ds) == len(ds.twins) > 0
    for i, s in enumerate(ds.samples):
        x = ds[i]
        want = torch.zeros_like(x["mask"])
        for (cls, _, _), a in zip(s["sources"], s["anns"]):
            cat = coco.anns[a]["category_id"]
            for b in coco.getAnnIds(imgIds=s["img"], catIds=[cat], iscrowd=False):
                if b != a:
                    want[torch.from_numpy(coco.annToMask(coco.anns[b])).bool() & (x["mask"] == 0)] = cls
        assert torch.equal(x["twin"], want)
        assert (i in ds.twins) == bool(want.any())
        for c in want.unique().tolist():
            if c:  # built-in MSMI: the twin sits on the other side of the image from the sounding object
                cols = lambda m: m.nonzero()[:, 1].float().mean() / m.shape[1]  # noqa: E731
                assert (cols(want == c) - 0.5) * (cols(x["mask"] == c) - 0.5) < 0
    assert "twin" not in VPODataset(tiny_vpo, "msmi", "test")[0]
    assert data.attach_twins(VPODataset(tiny_vpo, "ss", "test")) == 0


def test_twins_errors(tmp_path, tiny_vpo):
    ds = VPODataset(tiny_vpo, "msmi", "test")
    with raises_naming(tmp_path / "nope.json", " not found"):
        data.attach_twins(ds, str(tmp_path / "nope.json"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(images=[], annotations=[], categories=[])))
    with raises_naming(other, ": no annotation .* pass --coco-ann"):
        data.attach_twins(ds, str(other))
