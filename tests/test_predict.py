"""`--predict` on your own image (cavp.py) or frames (tpavi.py) and sound, run as a user would, and
the titled training overlays; a phone photo at --max-size in bounded time and memory, and WAVs of
more than 2 channels. Tiny checkpoints trained on the tiny built-in VPO."""
import csv
import json
import os
import subprocess
import sys
import time
import wave
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cavp
import data
import tpavi
from data import PANEL_GAP, PANEL_MAX, PANEL_MIN, SAMPLE_RATE
from script_runner import ENV, ROOT, command, run_script


def train(script, root, out):
    run_script(script, "--data", "vpo_msmi", "--data-root", root, "--out", out, "--workers", "0", "--batch-size",
               "4", "--limit", "8", "--max-iters", "2", "--overlays", "1")
    return os.path.join(out, "last.pt")


@pytest.fixture(scope="module")
def cavp_ckpt(tiny_vpo, tmp_path_factory):
    return train("cavp.py", tiny_vpo, str(tmp_path_factory.mktemp("cavp_run")))


@pytest.fixture(scope="module")
def tpavi_ckpt(tiny_vpo, tmp_path_factory):
    return train("tpavi.py", tiny_vpo, str(tmp_path_factory.mktemp("tpavi_run")))


def builtin_test_image(tiny_vpo):
    """(image path, its first sound source's WAV, that source's audio_pos) of the first VPO-MSMI test image."""
    with open(os.path.join(tiny_vpo, "VPO-MSMI", "vpo_msmi_data_stereo.csv")) as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "val")
    return (os.path.join(tiny_vpo, "VPO-MSMI", "data", f"{int(row['img_Id']):012d}.jpg"),
            os.path.join(tiny_vpo, "audio", row["vgg_file"] + ".wav"), row["audio_pos"])


def write_pcm(path, x, rate):
    """(C, N) float in [-1, 1] -> 16-bit PCM WAV at `rate` with the standard library."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).round().astype("<i2").T.tobytes())
    return str(path)


def run_predict(script, *argv, check=True):
    return run_script(script, "--predict", *argv, "--no-amp", check=check)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def panels_width(w, n):
    """Width of a save_panels PNG of n panels of an image w px wide and PANEL_MIN or more high (no rescale)."""
    return n * w + (n - 1) * PANEL_GAP


def eval_path_shares(ckpt_path, image_path, wave_, model_size=None):
    """Class shares of the prediction the evaluation path (model on the normalised image and the log-mel of
    `wave_`, argmax) gives, computed here in-process without --predict's code; with `model_size` (h, w) the
    image is resized to it (PIL bilinear) and the logits back to the image's size (F.interpolate, bilinear)
    before the argmax."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    args = Namespace(**{k: ckpt["args"][k] for k in cavp.CKPT_KEYS}, pretrained="none")
    model = cavp.CAVPModel(args, len(data.VPO_CLASSES)).eval()
    model.load_state_dict(ckpt["model"])
    with Image.open(image_path) as im:
        rgb = im.convert("RGB")
    small = rgb.resize(model_size[::-1], Image.BILINEAR) if model_size else rgb
    image = data.normalize(torch.from_numpy(np.array(small)).permute(2, 0, 1))
    with torch.no_grad():
        logits = model(image[None], cavp.log_mel(args)(wave_[None]))[0]
    logits = F.interpolate(logits, rgb.size[::-1], mode="bilinear", align_corners=False)
    return data.class_shares(logits.argmax(1)[0], data.VPO_CLASSES)


def assert_same_shares(got, want, pixels):
    assert list(got) == list(want), (got, want)  # same classes, same order (largest first)
    assert all(abs(got[k] - want[k]) <= 2 / pixels for k in want)


# ----------------------------------------------------------------------------- cavp.py --predict


def test_cavp_predict_builtin_image(tiny_vpo, cavp_ckpt, tmp_path):
    image, wav, pos = builtin_test_image(tiny_vpo)
    proc = run_predict("cavp.py", image, "--audio", wav, "--audio-pos", pos, "--ckpt", cavp_ckpt)
    stem = os.path.splitext(os.path.basename(image))[0]
    out = os.path.join(os.path.dirname(cavp_ckpt), "predict", stem)  # default --out: the checkpoint's folder
    assert proc.stdout.split("\n")[:2] == [f"wrote {out}.png", f"wrote {out}.json"]
    res = read_json(out + ".json")
    h, w = Image.open(image).size[::-1]
    assert (res["height"], res["width"]) == (h, w)
    assert res["image"] == image and res["audio"] == wav and res["audio_pos"] == float(pos)
    assert res["checkpoint"] == cavp_ckpt and res["audio_note"] is None
    assert res["max_size"] == 64 and res["model_size"] == [h, w]  # default: the built-in image size
    k = -(-PANEL_MIN // h)  # the 64 px panels are upscaled by k
    assert Image.open(out + ".png").size[0] == panels_width(k * w, 3)  # image | prediction | attention
    assert res["classes"] == list(res["shares"]) and set(res["classes"]) <= set(data.VPO_CLASSES[1:])
    assert res["background"] + sum(res["shares"].values()) == pytest.approx(1.0)
    # the saved classes are those of the model's prediction for this input (stereo, panned at pos)
    pan = data.load_predict_audio(wav, stereo=True, audio_pos=float(pos))[0]
    assert_same_shares(res["shares"], eval_path_shares(cavp_ckpt, image, pan), h * w)


def test_cavp_predict_silence_equals_eval_path(tiny_vpo, cavp_ckpt, tmp_path):
    """A WAV of zeros: --predict gives the evaluation path's prediction with silent audio (--eval-audio silence
    feeds zeros); a model that learned silence -> background then predicts no object."""
    image = builtin_test_image(tiny_vpo)[0]
    silence = write_pcm(tmp_path / "silence.wav", np.zeros((1, SAMPLE_RATE)), SAMPLE_RATE)
    run_predict("cavp.py", image, "--audio", silence, "--audio-pos", "0.5", "--ckpt", cavp_ckpt, "--out",
                str(tmp_path))
    res = read_json(tmp_path / (os.path.splitext(os.path.basename(image))[0] + ".json"))
    assert res["audio_pos"] == 0.5
    assert_same_shares(res["shares"], eval_path_shares(cavp_ckpt, image, torch.zeros(2, 3 * SAMPLE_RATE)),
                       res["height"] * res["width"])


def test_checkpoint_keeps_its_log_mel(cavp_ckpt, tmp_path):
    """The built-in run's 150 x 64 log-mel of 1.5 s comes back from its checkpoint (it overrides the
    flags); a checkpoint that names no log-mel was trained on the release's 300 x 64 of 3 s."""
    args = cavp.parse_args(["--clip-ms", "3000", "--mel-hop", "20", "--mel-bands", "32"])
    cavp.use_checkpoint_args(args, cavp.load_checkpoint(cavp_ckpt))
    assert (args.clip_ms, args.mel_hop, args.mel_bands) == (1500, 10, 64)
    ckpt = torch.load(cavp_ckpt, weights_only=True)
    for key in ("clip_ms", "mel_hop", "mel_bands"):
        del ckpt["args"][key]
    torch.save(ckpt, tmp_path / "unnamed.pt")
    cavp.use_checkpoint_args(args, cavp.load_checkpoint(str(tmp_path / "unnamed.pt")))
    assert (args.clip_ms, args.mel_hop, args.mel_bands) == (3000, 10, 64)


def test_cavp_predict_external_inputs(cavp_ckpt, tmp_path):
    """A 44.1 kHz stereo WAV (used as is) with a PNG and a JPEG of other sizes than the training images: the
    PNG within --max-size (run at its own size), the JPEG above the checkpoint's 64 px (run at 64 x 23, the
    logits resized bilinearly to 101 x 37)."""
    t = np.arange(2 * 44100) / 44100
    stereo = write_pcm(tmp_path / "ext.wav", np.stack([0.3 * np.sin(2 * np.pi * 440 * t),
                                                       0.1 * np.sin(2 * np.pi * 660 * t)]), 44100)
    rng = np.random.default_rng(0)
    for name, (h, w), flags, model_size in (("wide.png", (50, 90), ["--max-size", "90"], None),
                                            ("tall.jpg", (101, 37), [], (64, 23))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        run_predict("cavp.py", str(tmp_path / name), "--audio", stereo, "--ckpt", cavp_ckpt, "--out",
                    str(tmp_path / "out"), *flags)
        stem = str(tmp_path / "out" / os.path.splitext(name)[0])
        res = read_json(stem + ".json")
        assert (res["height"], res["width"]) == (h, w) and res["audio_pos"] is None
        assert res["model_size"] == list(model_size or (h, w))
        k = -(-PANEL_MIN // h)
        assert Image.open(stem + ".png").size[0] == panels_width(k * w, 3)
        want = eval_path_shares(cavp_ckpt, str(tmp_path / name), data.load_predict_audio(stereo, stereo=True)[0],
                                model_size)
        assert_same_shares(res["shares"], want, h * w)


PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def phone_photo(path, h=3000, w=4000):
    """A photo-like JPEG of h x w (smooth shapes, texture and sensor noise; ~4 MB at quality 90)."""
    y, x = np.mgrid[0:h // 8, 0:w // 8] / (w // 8)
    small = np.stack([128 + 90 * np.sin(9 * x + 2 * c) * np.cos(7 * y - c) + 25 * np.sin(60 * x * y)
                      for c in range(3)], -1).clip(0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img += np.random.default_rng(0).integers(-12, 13, img.shape, dtype=np.int16)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return str(path)


def test_cavp_predict_phone_photo_bounded(cavp_ckpt, tmp_path):
    """A 4000 x 3000 JPEG with a 4 s stereo WAV at --max-size 512 (the paper models' default): well under a
    minute and under 2 GB peak memory (the process's maxrss); the JSON and the PNG at the image's size (the
    PNG's panels shown 512 high, as save_panels shows any picture higher than PANEL_MAX)."""
    image = phone_photo(tmp_path / "phone.jpg")
    t = np.arange(4 * 44100) / 44100
    wav = write_pcm(tmp_path / "street.wav", np.stack([0.3 * np.sin(2 * np.pi * 440 * t),
                                                       0.2 * np.sin(2 * np.pi * 660 * t)]), 44100)
    argv = ["--predict", image, "--audio", wav, "--ckpt", cavp_ckpt, "--out", str(tmp_path / "out"), "--max-size",
            "512", "--no-amp"]
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", PEAK, *command("cavp.py", argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    seconds, peak_gb = time.time() - start, int(proc.stderr.split()[-1]) / 2 ** 20  # ru_maxrss: KiB on Linux
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"4000 x 3000 predict: {seconds:.1f} s, peak {peak_gb:.2f} GB")
    assert seconds < 60 and peak_gb < 2, (seconds, peak_gb)
    res = read_json(tmp_path / "out" / "phone.json")
    assert (res["height"], res["width"]) == (3000, 4000) and res["model_size"] == [384, 512]
    assert res["background"] + sum(res["shares"].values()) == pytest.approx(1.0)
    assert Image.open(tmp_path / "out" / "phone.png").size[0] == panels_width(round(4000 * PANEL_MAX / 3000), 3)


def test_tpavi_predict_six_channel_wav(tpavi_ckpt, tmp_path):
    """A 5.1 WAV on a stereo model: channels 1 and 2 are left and right, a note line says so (and the JSON);
    a 200 x 300 image runs at the checkpoint's 64 px, its JSON and PNG at 200 x 300."""
    image = tmp_path / "room.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(image)
    t = np.arange(SAMPLE_RATE * 3) / SAMPLE_RATE
    wav = write_pcm(tmp_path / "surround.wav", np.stack([0.1 * np.sin(2 * np.pi * 200 * (c + 1) * t)
                                                         for c in range(6)]), SAMPLE_RATE)
    proc = run_predict("tpavi.py", str(image), "--audio", wav, "--ckpt", tpavi_ckpt, "--out", str(tmp_path / "out"))
    note = proc.stdout.split("\n")[0]
    assert note.startswith(f"note: {wav} has 6 channels; the stereo model gets channels 1 and 2 as left and right")
    res = read_json(tmp_path / "out" / "room.json")
    assert res["audio_note"] == note[len("note: "):]
    assert (res["height"], res["width"]) == (200, 300) and res["max_size"] == 64 and res["model_size"] == [43, 64]
    assert Image.open(tmp_path / "out" / "room.png").size[0] == panels_width(300, 2)


def test_training_overlays_have_titled_panels(cavp_ckpt, tpavi_ckpt):
    """Training overlays: image | ground truth | prediction (| attention for cavp) above titles and a legend."""
    for ckpt, n in ((cavp_ckpt, 4), (tpavi_ckpt, 3)):
        folder = os.path.join(os.path.dirname(ckpt), "overlays")
        (name,) = os.listdir(folder)
        w, h = Image.open(os.path.join(folder, name)).size
        assert w == panels_width(3 * 64, n) and h > 3 * 64  # 64 px images upscaled x3, plus title and legend


# ----------------------------------------------------------------------------- tpavi.py --predict


def test_tpavi_predict_frames_and_image(tiny_vpo, tpavi_ckpt, tmp_path):
    folder = os.path.join(tiny_vpo, "VPO-MSMI", "data")
    clip = tmp_path / "clip"
    clip.mkdir()
    names = sorted(os.listdir(folder))[:3]
    for i, name in enumerate(names):  # frame_2 before frame_10: name order is natural
        Image.open(os.path.join(folder, name)).save(clip / f"frame_{[2, 10, 33][i]}.png")
    (clip / "notes.txt").write_text("not a frame")
    wav = write_pcm(tmp_path / "clip.wav", np.random.default_rng(0).uniform(-0.5, 0.5, (2, 3 * 22050)), 22050)
    out = tmp_path / "out"
    proc = run_predict("tpavi.py", str(clip), "--audio", wav, "--ckpt", tpavi_ckpt, "--out", str(out))
    pngs = [str(out / f"frame_{i}.png") for i in (2, 10, 33)]
    assert proc.stdout.split() == sum([["wrote", p] for p in pngs + [str(out / "clip.json")]], [])
    res = read_json(out / "clip.json")
    assert len(res["frames"]) == 3 and [f["png"] for f in res["frames"]] == pngs
    assert [f["image"] for f in res["frames"]] == [str(clip / f"frame_{i}.png") for i in (2, 10, 33)]
    assert (res["height"], res["width"]) == (64, 64) and res["data"] == "vpo_msmi"
    for f in res["frames"]:
        assert Image.open(f["png"]).size[0] == panels_width(3 * 64, 2)  # image | prediction
        assert f["background"] + sum(f["shares"].values()) == pytest.approx(1.0)
        assert f["classes"] == list(f["shares"]) and set(f["classes"]) <= set(data.VPO_CLASSES[1:])
    # a single image on a VPO model: VPO's 3 s audio; the default --out is the checkpoint's folder
    image, mono, pos = builtin_test_image(tiny_vpo)
    run_predict("tpavi.py", image, "--audio", mono, "--audio-pos", pos, "--ckpt", tpavi_ckpt)
    res = read_json(os.path.join(os.path.dirname(tpavi_ckpt), "predict",
                                 os.path.splitext(os.path.basename(image))[0] + ".json"))
    assert len(res["frames"]) == 1 and res["frames"][0]["image"] == image


# ----------------------------------------------------------------------------- bad input: one line, exit 2


@pytest.mark.parametrize("script", ["cavp.py", "tpavi.py"])
def test_predict_bad_input_one_line(script, tiny_vpo, cavp_ckpt, tpavi_ckpt, tmp_path, capsys):
    ckpt, other = (cavp_ckpt, tpavi_ckpt) if script == "cavp.py" else (tpavi_ckpt, cavp_ckpt)
    image, wav, pos = builtin_test_image(tiny_vpo)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not audio")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 64)).save(mixed / "1.png")
    Image.new("RGB", (32, 64)).save(mixed / "2.png")
    cases = [  # (argv, a word the line must name)
        ([str(tmp_path / "none.png"), "--audio", wav, "--audio-pos", pos, "--ckpt", ckpt], "none.png"),
        ([str(tmp_path / "broken.png"), "--audio", wav, "--audio-pos", pos, "--ckpt", ckpt], "broken.png"),
        ([image, "--audio", str(tmp_path / "none.wav"), "--ckpt", ckpt], "none.wav"),
        ([image, "--audio", str(tmp_path / "broken.wav"), "--ckpt", ckpt], "broken.wav"),
        ([image, "--audio", wav, "--audio-pos", pos, "--ckpt", other], "not a"),
        ([image, "--audio", wav, "--ckpt", ckpt], "--audio-pos"),  # mono clip, stereo model
        ([image, "--audio", wav, "--audio-pos", "1.5", "--ckpt", ckpt], "--audio-pos"),
        ([image, "--audio", wav], "--ckpt"),
        ([image, "--ckpt", ckpt], "--audio"),
    ]
    if script == "tpavi.py":
        cases.append(([str(mixed), "--audio", wav, "--audio-pos", pos, "--ckpt", ckpt], "differ in size"))
    module = cavp if script == "cavp.py" else tpavi
    capsys.readouterr()
    for i, (argv, word) in enumerate(cases):
        if i == 0:  # once as a user runs it: a subprocess
            proc = run_predict(script, *argv, check=False)
            code, err = proc.returncode, proc.stderr
        else:  # the others in this process, through the same exit path as the script's __main__
            with pytest.raises(SystemExit) as stop:
                try:
                    module.main(module.parse_args(["--predict", *argv, "--no-amp"]))
                except Exception as e:
                    module.exit_on_error(e)
            code, err = stop.value.code, capsys.readouterr().err
        lines = err.strip().split("\n")
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert word in lines[0], (word, lines[0])
    proc = run_script(script, "--audio", wav, "--max-size", "512", check=False)  # without --predict
    assert proc.returncode == 2 and proc.stderr.startswith("error: --audio, --audio-pos and --max-size are for")
