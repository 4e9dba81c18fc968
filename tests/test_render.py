"""Overlay pictures (save_panels, label_overlay, heatmap_overlay, legend_for) and the --predict
inputs (read_rgb, load_predict_audio): --predict at --max-size (read_rgb's scaled decode,
upsample_labels) and WAVs of more than 2 channels."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import (PANEL_GAP, PANEL_MIN, SAMPLE_RATE, VPO_CLASSES, DataError, class_colors, class_shares,
                  heatmap_overlay, label_overlay, legend_for, load_clip, load_predict_audio, pan,
                  read_rgb, save_panels, shown_size, upsample_labels, write_wav)

N = 3 * SAMPLE_RATE  # a 3 s clip, as VPODataset's sample["wave"] (C, N)


def scene(h=64, w=64, seed=0):
    """(image uint8 (h, w, 3), labels (h, w)): class 3 square at [10:30, 10:30], class 20 at
    [40:56, 36:60], an ignore (255) strip in rows 0..3, background elsewhere."""
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 200, (h, w, 3), dtype=np.uint8)
    lab = np.zeros((h, w), dtype=np.int64)
    lab[10:30, 10:30] = 3
    lab[40:56, 36:60] = 20
    lab[0:4] = 255
    return img, lab


def rect(mask):
    """(top, left, height, width) of the True pixels' bounding box."""
    ys, xs = np.nonzero(mask)
    return ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


# ---------------------------------------------------------------- save_panels
@pytest.mark.parametrize("h, w, shown", [(64, 64, (192, 192)), (50, 40, (200, 160)), (1024, 600, (512, 300))])
def test_panels_side_by_side_under_titles_above_legend(tmp_path, h, w, shown):
    cols = [(10, 200, 30), (10, 200, 70), (10, 200, 110)]
    panels = [np.full((h, w, 3), c, dtype=np.uint8) for c in cols]
    save_panels(panels, ["image", "ground truth", "prediction"], [("cat", (255, 0, 255))], tmp_path / "p.png")
    out = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    ph, pw = shown
    assert out.shape[1] == 3 * pw + 2 * PANEL_GAP
    for i, c in enumerate(cols):
        where = (out == c).all(-1)
        top, left, hh, ww = rect(where)
        assert (hh, ww) == (ph, pw) and where.sum() == ph * pw  # one solid, upscaled / downscaled panel
        assert left == i * (pw + PANEL_GAP)
        assert top > 0 and out.shape[0] - (top + ph) > 0  # a title strip above, a legend strip below
        assert (out[:top, left:left + pw].min(-1) < 100).any()  # dark title text above each panel
    assert ((out[top + ph:] == (255, 0, 255)).all(-1)).sum() > 20  # the legend's swatch


def test_legend_wraps_and_shows_exactly_its_classes(tmp_path):
    colors = class_colors()
    panel = np.full((64, 64, 3), (10, 200, 30), dtype=np.uint8)
    heights = {}
    for n in (1, 21):
        legend = [(VPO_CLASSES[c], tuple(colors[c])) for c in range(1, n + 1)]
        save_panels([panel, panel], ["a", "b"], legend, tmp_path / f"{n}.png")
        out = np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB"))
        below = out[rect((out == (10, 200, 30)).all(-1))[0] + PANEL_MIN:]
        heights[n] = out.shape
        for c in range(1, len(VPO_CLASSES)):
            count = (below == colors[c]).all(-1).sum()
            assert (count > 20) == (c <= n), (n, VPO_CLASSES[c], count)
    assert heights[21][1] == heights[1][1] == 2 * PANEL_MIN + PANEL_GAP
    assert heights[21][0] > heights[1][0]  # 21 names do not fit on one line of 388 px


def test_save_panels_rejects_mismatched_panels(tmp_path):
    with pytest.raises(ValueError):
        save_panels([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], ["a", "b"], [], tmp_path / "x.png")


# ---------------------------------------------------------------- overlays and legends
def test_legend_for_lists_exactly_the_classes_present():
    colors = class_colors()
    _, lab = scene()
    pred = np.zeros_like(lab)
    pred[5:9, 5:9] = 7
    legend = legend_for([torch.from_numpy(lab), pred], VPO_CLASSES, colors)
    assert legend == [(VPO_CLASSES[c], tuple(int(v) for v in colors[c])) for c in (3, 7, 20)]
    assert legend_for([np.zeros((4, 4)), np.full((4, 4), 255)], VPO_CLASSES, colors) == []


def test_class_colors_distinct_and_background_black():
    for n in (2, 22, 71):
        cols = class_colors(n)
        assert cols.shape == (n, 3) and cols.dtype == np.uint8 and (cols[0] == 0).all()
    vpo = class_colors()
    assert len({tuple(c) for c in vpo}) == 22
    assert (vpo[1:].max(1).astype(int) >= 200).all()  # bright enough to show on dark images


def test_label_overlay_fill_outline_ignore():
    img, lab = scene()
    colors = class_colors()
    out = label_overlay(img, torch.from_numpy(lab), colors)
    assert out.shape == img.shape and out.dtype == np.uint8
    bg = lab == 0
    assert (out[bg] == img[bg]).all()  # background left as the image
    obj = (lab > 0) & (lab != 255)
    assert (out[obj] != img[obj]).any(-1).all()  # every object pixel changed
    border = np.zeros_like(obj)
    border[10:30, 10:30] = True
    border[11:29, 11:29] = False
    assert (out[border] == colors[3]).all()  # a solid 1 px outline in the class colour
    inner = out[12:28, 12:28].reshape(-1, 3)
    assert not (inner == colors[3]).all(-1).any()  # ... around a semi-transparent fill
    expected = np.round(0.5 * img[12:28, 12:28].astype(float) + 0.5 * colors[3]).reshape(-1, 3)
    assert np.abs(inner.astype(float) - expected).max() <= 1
    assert (out[40, 36:60] == colors[20]).all() and (out[55, 36:60] == colors[20]).all()
    ign = out[0:4]
    assert (ign == 255).all(-1).any() and (ign != img[0:4]).any(-1).all()  # white hatch, rest greyed


def test_label_overlay_outline_2px_on_large_images():
    img = np.full((400, 400, 3), 100, np.uint8)
    lab = np.zeros((400, 400), np.int64)
    lab[100:200, 100:200] = 1
    out = label_overlay(img, lab, class_colors())
    on = (out == class_colors()[1]).all(-1)
    assert on[150, 100] and on[150, 101] and not on[150, 102] and not on[150, 99]


def test_heatmap_overlay_follows_attention():
    img = np.full((64, 48, 3), 128, np.uint8)
    attn = torch.zeros(8, 6, dtype=torch.bfloat16)
    attn[0, 0] = 5.0
    out = heatmap_overlay(img, attn).astype(int)
    assert out.shape == img.shape
    assert out[0, 0, 0] > out[0, 0, 2] + 100  # high: red
    assert out[-1, -1, 2] > out[-1, -1, 0] + 100  # low: blue
    assert heatmap_overlay(img, np.ones((3, 3))).shape == img.shape  # flat map: no division by 0


def test_class_shares():
    lab = np.zeros((10, 10), np.int64)
    lab[:5, :4] = 7
    lab[5:, :2] = 3
    lab[9] = 255
    assert class_shares(torch.from_numpy(lab), VPO_CLASSES) == {"dog": 0.2, "airplane": 0.08}


# ---------------------------------------------------------------- --predict inputs
def test_read_rgb_returns_training_tensor_and_pixels(tmp_path):
    img, _ = scene(37, 53)
    Image.fromarray(img).save(tmp_path / "b.png")
    x, pixels, size = read_rgb(tmp_path / "b.png", 53)  # within --max-size: as is
    assert x.shape == (3, 37, 53) and x.dtype == torch.uint8 and (x.permute(1, 2, 0).numpy() == img).all()
    assert (pixels == img).all() and pixels.dtype == np.uint8 and size == (37, 53)
    Image.fromarray(img[..., 0]).save(tmp_path / "grey.png")  # a greyscale file: converted to RGB
    assert read_rgb(tmp_path / "grey.png", 64)[1].shape == (37, 53, 3)


def photo(h, w):
    """A smooth photo-like (h, w, 3) uint8 picture (gradients and blobs, little noise)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([128 + 90 * np.sin(7 * x + 3 * c) * np.cos(5 * y - c) + 20 * np.sin(31 * x * y) for c in range(3)],
                   -1)
    return img.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_read_rgb_scales_a_large_image(tmp_path, fmt):
    """A 1200 x 1600 picture at --max-size 200: the model input is the picture resized to 150 x 200 (as a
    full decode resized, within JPEG's scaled-decode error), the display copy is save_panels' 512 x 683."""
    img = photo(1200, 1600)
    Image.fromarray(img).save(tmp_path / f"p.{fmt}", quality=95)
    x, pixels, size = read_rgb(tmp_path / f"p.{fmt}", 200)
    assert size == (1200, 1600) and x.shape == (3, 150, 200) and pixels.shape == (*shown_size(1200, 1600), 3)
    assert shown_size(1200, 1600) == (512, 683)
    want = np.asarray(Image.fromarray(img).resize((200, 150), Image.BILINEAR)).astype(np.float32)
    assert np.abs(x.permute(1, 2, 0).numpy().astype(np.float32) - want).mean() < 3  # of 255
    shown = np.asarray(Image.fromarray(img).resize((683, 512), Image.BOX)).astype(np.float32)
    assert np.abs(pixels.astype(np.float32) - shown).mean() < 3


def test_read_rgb_turns_by_exif_orientation(tmp_path):
    """A phone photo stored landscape with EXIF orientation 6 (turn 90 degrees clockwise) is read upright."""
    img = photo(60, 80)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    x, pixels, size = read_rgb(tmp_path / "turned.jpg", 40)
    assert size == (80, 60) and pixels.shape == (80, 60, 3) and x.shape == (3, 40, 30)
    upright = np.rot90(img, -1)  # clockwise
    assert np.abs(pixels.astype(np.float32) - upright).mean() < 3


@pytest.mark.parametrize("k, low, size", [(22, (48, 64), (300, 400)), (22, (37, 53), (37, 53)), (5, (30, 40), (17, 11)),
                                          (1, (10, 13), (97, 130)), (4, (7, 5), (61, 23))])
def test_upsample_labels_is_bilinear_then_argmax(k, low, size):
    """upsample_labels (only the pixels between differing labels interpolated, a few at a time) against
    F.interpolate on all the logits, then argmax (or > 0 for one logit): equal but where two classes tie to
    within float rounding."""
    torch.manual_seed(0)
    logits = F.interpolate(torch.randn(1, k, 4, 5) * 3, low, mode="bilinear")[0] + 0.3 * torch.randn(k, *low)
    got = upsample_labels(logits, size, points=97)
    ref = F.interpolate(logits[None], size, mode="bilinear", align_corners=False)[0]
    assert got.dtype == torch.uint8 and got.shape == size
    if k == 1:
        differ, margin = got.bool() != (ref[0] > 0), ref[0].abs()
    else:
        top2 = ref.topk(2, 0).values
        differ, margin = got.long() != ref.argmax(0), top2[0] - top2[1]
    assert (margin[differ] < 1e-4).all() and differ.float().mean() < 1e-3


@pytest.mark.parametrize("kind", ["missing", "text"])
def test_read_rgb_bad_file(tmp_path, kind):
    path = tmp_path / "photo.jpg"
    if kind == "text":
        path.write_text("not an image\n")
    with pytest.raises(DataError, match="photo.jpg") as e:
        read_rgb(path, 512)
    assert "\n" not in str(e.value)


def sine(freq, rate, seconds, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def rms(x):
    return float(x.pow(2).mean().sqrt())


def test_stereo_44k_clip_as_is_or_averaged(tmp_path):
    path = tmp_path / "s.wav"
    write_wav(path, np.stack([sine(440, 44100, 4.0, 0.5), sine(440, 44100, 4.0, 0.1)]), 44100)
    x, note = load_predict_audio(path, stereo=True)
    assert x.shape == (2, N) and x.dtype == torch.float32 and note is None
    assert rms(x[0]) / rms(x[1]) == pytest.approx(5.0, rel=0.02)  # left stays left
    m = load_predict_audio(path, stereo=False)[0]
    assert m.shape == (1, N) and torch.allclose(m, x.mean(0, keepdim=True))
    moved = load_predict_audio(path, stereo=True, audio_pos=1.0)[0]  # --audio-pos: panned fully right
    assert rms(moved[0]) < 1e-6 < rms(moved[1])


def test_mono_22k_panned_by_audio_pos(tmp_path):
    path = tmp_path / "m.wav"
    write_wav(path, sine(300, 22050, 2.0), 22050)
    x = load_predict_audio(path, stereo=True, audio_pos=0.25)[0]
    assert x.shape == (2, N)
    assert rms(x[0]) / rms(x[1]) == pytest.approx(3.0, rel=1e-4)  # L = 0.75 w, R = 0.25 w
    assert torch.allclose(x, pan(load_clip(path), 0.25))


def test_mono_16k_for_mono_model(tmp_path):
    path = tmp_path / "m.wav"
    w = sine(500, SAMPLE_RATE, 5.0)
    write_wav(path, w, SAMPLE_RATE)
    x = load_predict_audio(path, stereo=False)[0]
    assert x.shape == (1, N)
    start = (len(w) - N) // 2  # centred 3 s crop, like load_clip
    assert np.abs(x[0].numpy() - w[start:start + N]).max() < 1e-4


@pytest.mark.parametrize("rate", [44100, 22050, 8000])
def test_resampling_keeps_frequency(tmp_path, rate):
    path = tmp_path / "f.wav"
    write_wav(path, np.stack([sine(1000, rate, 3.5)] * 2), rate)
    x = load_predict_audio(path, stereo=True)[0]
    spec = np.abs(np.fft.rfft(x[0].numpy()))
    peak = np.fft.rfftfreq(x.shape[1], 1 / SAMPLE_RATE)[spec.argmax()]
    assert abs(peak - 1000) < 2


def test_six_channels_rule_and_note(tmp_path):
    """A 5.1 WAV (FL FR FC LFE BL BR): a stereo model gets channels 1 and 2 as left and right, a mono model
    the mean of all six, --audio-pos the mean panned; each time a note says so."""
    path = tmp_path / "six.wav"
    chans = np.stack([sine(200 * (c + 1), SAMPLE_RATE, 3.0, 0.1 * (c + 1)) for c in range(6)])
    write_wav(path, chans, SAMPLE_RATE)
    full = load_clip(path)
    x, note = load_predict_audio(path, stereo=True)
    assert torch.equal(x, full[:2]) and "6 channels" in note and "channels 1 and 2 as left and right" in note
    assert "channels 3-6 dropped" in note and "six.wav" in note and "\n" not in note
    m, note = load_predict_audio(path, stereo=False)
    assert torch.allclose(m, full.mean(0, keepdim=True)) and "mono model gets the mean of its 6 channels" in note
    p, note = load_predict_audio(path, stereo=True, audio_pos=0.25)
    assert torch.allclose(p, pan(full.mean(0, keepdim=True), 0.25)) and "panned at 0.25" in note


@pytest.mark.parametrize("kind, words", [
    ("missing", "not found"), ("text", "ffmpeg"), ("mono", "--audio-pos"), ("pos", "not in [0, 1]")])
def test_predict_audio_bad_input(tmp_path, kind, words):
    path = tmp_path / "clip.wav"
    if kind == "text":
        path.write_text("this is not audio\n")
    elif kind in ("mono", "pos"):
        write_wav(path, sine(440, SAMPLE_RATE, 1.0))
    with pytest.raises(DataError) as e:
        load_predict_audio(path, stereo=True, audio_pos=1.5 if kind == "pos" else None)
    msg = str(e.value)
    assert "clip.wav" in msg and words in msg and "\n" not in msg
