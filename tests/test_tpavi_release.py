"""tpavi.py as the authors ran it: VGGish's own front end (data.VGGishLogMel, vggish_examples)
against a numpy loop written from VGGish's definition, and its example timing against a torchaudio
MelSpectrogram front end cut per second; released AVSBench layouts (names and shapes of the
authors' files, tests/release_layouts) -> from_release -> strict load -> forward, and
`--eval-only --ckpt` / `--predict` on random weights in each layout; the backbone files the
release trains from; TPAVI over 5-frame windows against the two halves."""
import glob
import json
import os
from argparse import Namespace

import numpy as np
import pytest
import torch
import torchaudio
import torchvision

import data
import fixtures_layouts as fl
import tpavi
from script_runner import run_script

# names and shapes of the tensors in the released state dicts (S4 and MS3 share the objects layout)
LAYOUTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "release_layouts", "*.json")))
IDS = [os.path.basename(p)[:-5] for p in LAYOUTS]


# ----------------------------------------------------------------------------- reference front end
def ref_logmel(x):
    """VGGish's log-mel, one frame at a time in float64: x (C, N) at 16 kHz -> (F, 64)."""
    x = np.asarray(x, dtype=np.float64).mean(0)
    window = np.array([0.5 - 0.5 * np.cos(2 * np.pi * i / 400) for i in range(400)])  # periodic

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    bin_mel = [mel(8000.0 * j / 256) for j in range(257)]
    edges = [mel(125.0) + (mel(7500.0) - mel(125.0)) * i / 65 for i in range(66)]
    weights = np.zeros((257, 64))
    for i in range(64):
        lo, mid, hi = edges[i:i + 3]
        for j in range(1, 257):  # the DC bin keeps weight 0
            rising, falling = (bin_mel[j] - lo) / (mid - lo), (hi - bin_mel[j]) / (hi - mid)
            weights[j, i] = max(0.0, min(rising, falling))
    frames = []
    for start in range(0, len(x) - 400 + 1, 160):
        frame = np.zeros(512)
        frame[:400] = x[start:start + 400] * window
        spectrum = np.abs(np.fft.rfft(frame))
        frames.append([np.log(sum(spectrum[j] * weights[j, i] for j in range(257)) + 0.01)
                       for i in range(64)])
    return np.array(frames).reshape(-1, 64)


def ref_examples(logmel, slots, pad):
    """96-frame examples at a 96-frame hop; slots past the last one repeat it or are zeros."""
    examples = [logmel[s:s + 96] for s in range(0, len(logmel) - 96 + 1, 96)]
    out = []
    for k in range(slots):
        if k < len(examples):
            out.append(examples[k])
        elif pad == "repeat" and examples:
            out.append(examples[-1])
        else:
            out.append(np.zeros((96, 64)))
    return np.stack(out)


def int16(x):
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def speech_like(rate, seconds, seed=0):
    """Voiced syllables (harmonics of a gliding 100-220 Hz f0 under three formant peaks, 4 Hz
    syllable envelope) with noise bursts between them, as int16."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    f0 = 160 + 60 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = np.zeros_like(t)
    for h in range(1, 40):
        f = h * f0
        gain = sum(np.exp(-((f - c) / 120.0) ** 2) for c in (700.0, 1200.0, 2600.0)) + 0.02
        voiced += gain * np.sin(h * phase) * (f < rate / 2)
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    noise = rng.standard_normal(len(t)) * (1 - envelope) * 0.05
    return int16(0.1 * voiced * envelope + noise)


def tonal(rate, seconds):
    t = np.arange(int(rate * seconds)) / rate
    return int16(0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1760.5 * t)
                 + 0.1 * np.sin(2 * np.pi * 6000 * t))


def at_16k(x, rate):
    """int16 (C, N) at `rate` -> float (C, N') at 16 kHz, int16 / 32768, resampled as load_clip."""
    w = torch.from_numpy(x.astype(np.float32) / 32768.0)
    return w if rate == 16000 else data._resampler(rate, 16000)(w)


@pytest.mark.parametrize("rate", [16000, 44100])
@pytest.mark.parametrize("signal", ["speech", "tonal"])
def test_front_end_matches_reference(signal, rate):
    """Stereo (the right channel at a different level) clips of 4.5 s: log-mel frames and examples
    (5 slots, repeat / zero padding) within 1e-4 of the float64 loop."""
    mono = speech_like(rate, 4.5) if signal == "speech" else tonal(rate, 4.5)
    x = np.stack([mono, (mono // 2).astype(np.int16)])
    w = at_16k(x, rate)
    ref = ref_logmel(w.double().numpy())
    got = data.VGGishLogMel()(w[None])[0]
    assert got.shape == ref.shape
    assert np.abs(got.numpy() - ref).max() <= 1e-4
    for pad in ("repeat", "zero"):
        ex = data.vggish_examples(got[None], 5, pad=pad)[0].numpy()
        assert np.abs(ex - ref_examples(ref, 5, pad)).max() <= 1e-4
    if rate == 16000:  # int16 samples are scaled by 1 / 32768 as VGGish does
        assert torch.equal(data.VGGishLogMel()(torch.from_numpy(x)[None])[0], got)


def test_examples_lengths_and_padding():
    """A 4.5-s clip (4 examples) zero-padded, or repeat-padded as data.load_clip does, to 5 s and
    read with its length gives the short clip's examples; a 1-s clip's one example fills every slot;
    a clip under 0.975 s has no example: zeros."""
    front = data.VGGishLogMel()
    w = at_16k(speech_like(16000, 4.5)[None], 16000)
    short = front(w[None])
    assert [front(torch.zeros(1, 1, n)).shape[1] // 96 for n in (w.shape[-1], 80000, 15600, 15599)] == [4, 5, 1, 0]
    for fill in (torch.zeros(1, 8000), w[:, :8000]):
        long = front(torch.cat([w, fill], -1)[None].repeat(3, 1, 1))
        lengths = torch.tensor([w.shape[-1], 16000, 15599])
        for pad in ("repeat", "zero"):
            got = data.vggish_examples(long, 5, lengths, pad)
            want = data.vggish_examples(short, 5, pad=pad)[0]
            assert torch.allclose(got[0], want, atol=1e-6, rtol=0)
            assert torch.equal(got[1, 0], long[1, :96])
            assert torch.equal(got[1, 1:], long[1, :96].expand(4, 96, 64) if pad == "repeat"
                               else torch.zeros(4, 96, 64))
            assert not got[2].any()
    assert data.vggish_examples(short, 5, pad="repeat")[0, 4].equal(short[0, 288:384])
    assert not data.vggish_examples(short, 5, pad="zero")[0, 4].any()


def per_second_examples(mel, wave, t):
    """A VGGish-like front end from torchaudio (`mel`: MelSpectrogram n_fft 512, win_length 400, not
    centred, HTK mel 125-7500 Hz, magnitude) on the channels' sum, one 96-frame example cut from each
    1-s segment."""
    segments = wave[..., :16000 * t].unflatten(-1, (t, 16000)).transpose(1, 2).flatten(0, 1)
    logmel = torch.log(mel(segments.sum(1)) + 0.01).transpose(1, 2)
    return logmel[:, :96].view(wave.shape[0], t, 96, 64)


def test_old_and_new_timing_differ_where_they_should():
    """VGGish's example k starts at 0.96 k s, a per-second cut's at k s: a 10-ms click at 0.985 s is
    in VGGish's example 1 only and in no per-second example; a click at 4.9 s is in the per-second
    example 4 only and in no VGGish example (VGGish reads the 5 s up to 4.815 s)."""
    base = torch.from_numpy(speech_like(16000, 5.0, seed=1).astype(np.float32) / 32768)[None, None]
    base *= 0.1
    front = data.VGGishLogMel()
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=512, win_length=400, hop_length=160, f_min=125.0,
                                               f_max=7500.0, n_mels=64, power=1.0, center=False, mel_scale="htk")

    def click(at):
        w = base.clone()
        w[..., int(at * 16000):int(at * 16000) + 160] += 0.5
        return w

    def changed(f, w):
        a, b = f(w)[0], f(base)[0]
        return [k for k in range(5) if not torch.allclose(a[k], b[k], atol=1e-6, rtol=0)]

    def new(w):
        return data.vggish_examples(front(w), 5)

    def old(w):
        return per_second_examples(mel, w, 5)

    assert changed(new, click(0.985)) == [1] and changed(old, click(0.985)) == []
    assert changed(new, click(4.9)) == [] and changed(old, click(4.9)) == [4]
    assert changed(new, click(0.5)) == changed(old, click(0.5)) == [0]  # both start at 0 s
    # the same instant is one example earlier from 3.84 s on (VGGish's example 4 starts there)
    assert changed(new, click(3.9)) == [4] and changed(old, click(3.9)) == [3]
    # example 0 (same start): window placement and mel weights, and with a mono WAV read as stereo
    # L + R against the mean; examples 1-4 also start 0.04 k s apart
    mono_diff = (old(base) - new(base))[0].abs().mean((1, 2))
    stereo_diff = (old(base.repeat(1, 2, 1)) - new(base.repeat(1, 2, 1)))[0].abs().mean((1, 2))
    assert 0 < mono_diff[0] < stereo_diff[0] and stereo_diff[0] > 0.3
    assert (mono_diff[1:] > mono_diff[0]).all() and (stereo_diff[1:] > stereo_diff[0]).all()


def test_vggish_slots_and_clip_length():
    """tpavi.VGGish: T = 5 slots of a 5-s clip; T = 1 (VPO, 3 s) the mean of its 3 examples'
    embeddings; an AVSS v1 clip (5 s of audio in 10 s, zero padding) has silent examples in slots 5-9."""
    torch.manual_seed(0)
    net = tpavi.VGGish(None).eval()
    assert not net.state_dict().keys() - {k for k in net.state_dict() if k.startswith(("features.", "embeddings."))}
    wave = torch.randn(2, 2, 160000) * 0.1
    with torch.no_grad():
        five = net(wave[..., :80000], 5)
        vpo = net(wave[..., :48000], 1)
        each = net(wave[..., :48000], 3)
        net.pad = "zero"
        ten = net(wave, 10, torch.tensor([160000, 80000]))
        silent = net.embeddings(net.features(torch.zeros(1, 1, 96, 64)).permute(0, 2, 3, 1).flatten(1))
    assert five.shape == (2, 5, 128) and vpo.shape == (2, 1, 128)
    assert torch.allclose(vpo[:, 0], each.mean(1), atol=1e-6)
    assert torch.allclose(ten[1, :5], five[1], atol=1e-6) and torch.allclose(ten[1, 5:], silent.expand(5, 128))


def test_avsbench_clip_reports_its_audio_length(tmp_path):
    """AVSBenchDataset's audio_len: the WAV's own samples at 16 kHz (an AVSS v1 clip: 5 s of its 10 s
    of frames; a 4.5-s S4 WAV, repeat-padded to 5 s)."""
    fl.write_avss(str(tmp_path / "avs"), [("u1", "v2", "test", 1), ("u2", "v1m", "test", 3)])
    root = fl.write_s4(str(tmp_path / "avs"), [("d", "cat", "test")])
    wav = tmp_path / "avs" / "Single-source" / "s4_data" / "audio_wav" / "test" / "cat" / "d.wav"
    fl.dc_wav(str(wav), 0.2, seconds=4.5, rate=8000)
    avss = data.AVSBenchDataset(root, "avss", "test")
    assert [avss[i]["audio_len"].item() for i in range(2)] == [160000, 80000]
    s4 = data.AVSBenchDataset(root, "s4", "test")[0]
    assert s4["audio_len"].item() == 72000 and s4["wave"].shape == (1, 80000)


# ----------------------------------------------------------------------------- released checkpoints


def released_state(layout, seed=0):
    """Random tensors in a released layout (BN variances positive, counters int64)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.02
    return out


def read_layout(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("path", LAYOUTS, ids=IDS)
def test_from_release_strict_load_forward(path, tmp_path):
    """Random tensors in a released layout (AVSS with the `module.` prefix of a DataParallel state
    dict) -> load_checkpoint (architecture from the names, unused branches dropped) -> strict load
    -> the tensors where they belong -> forward."""
    layout = read_layout(path)
    state = released_state(layout)
    avss = "avss" in path
    if avss:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "release.pth")
    ckpt = tpavi.load_checkpoint(str(tmp_path / "release.pth"))
    arch = ckpt["args"]
    backbone = "pvt_v2_b5" if "pvt" in path else "resnet50"
    assert (arch["data"], arch["backbone"], arch["tpavi_stages"], arch["tpavi_window"]) == \
        ("avss" if avss else "avsbench_s4", backbone, [0, 1, 2, 3], 5)
    unused = ["path4.resConfUnit1.*"] if "pvt" in path else ["resnet.layer3_2.*", "resnet.layer4_2.*",
                                                             "path4.resConfUnit1.*"]
    assert ckpt["release"].endswith("dropped its unused " + ", ".join(unused))
    assert len(ckpt["model"]) == len(layout) - sum(k.startswith(tpavi.RELEASE_UNUSED) for k in layout) + 4 * avss

    args = Namespace(**arch, resume=None, ckpt="release.pth", vggish_weights=None)
    torch.manual_seed(0)
    model = tpavi.make_model(args, ckpt, arch["data"])  # strict: every tensor but VGGish's from the file
    p = "module." if avss else ""
    sd = model.state_dict()
    assert torch.equal(sd["tpavi.2.phi.weight"], state[f"{p}tpavi_b3.phi.weight"].flatten(1))
    assert torch.equal(sd["tpavi.0.w_z.0.weight"][..., 0, 0], state[f"{p}tpavi_b1.W_z.0.weight"][..., 0, 0, 0])
    assert torch.equal(sd["tpavi.3.norm.bias"], state[f"{p}tpavi_b4.norm_layer.bias"])
    assert torch.equal(sd["aspp.3.convs.2.bias"], state[f"{p}conv4.conv2d_list.2.bias"])
    assert torch.equal(sd["fuse.0.rcu1.conv2.weight"], state[f"{p}path1.resConfUnit1.conv2.weight"])
    assert torch.equal(sd["head2.0.weight"], state[f"{p}output_conv.2.weight"])
    assert torch.equal(sd["head2.2.weight"], state[f"{p}output_conv.4.weight"])
    if avss:
        assert not sd["tpavi.1.align.bias"].any()
    else:
        assert torch.equal(sd["tpavi.1.align.bias"], state["tpavi_b2.align_channel.bias"])
    if backbone == "resnet50":
        assert torch.equal(sd["encoder.net.layer3.5.conv3.weight"], state[f"{p}resnet.layer3_1.5.conv3.weight"])
        assert torch.equal(sd["encoder.net.layer4.0.downsample.1.running_var"],
                           state[f"{p}resnet.layer4_1.0.downsample.1.running_var"])
    else:
        assert torch.equal(sd["encoder.block3.39.mlp.dwconv.weight"],
                           state[f"{p}encoder_backbone.block3.39.mlp.dwconv.dwconv.weight"])
    t = 10 if avss else 5
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, t, 3, 64, 64), torch.randn(1, 1, t * 16000) * 0.1)[0]
    assert logits.shape == (t, 71 if avss else 1, 64, 64) and torch.isfinite(logits).all()


def test_release_files_refused_where_they_do_not_fit(tmp_path):
    """A name outside the released layout, --resume or no --vggish-weights with a release file, a
    VGGish checkpoint of a front end other than VGGish's own: one-line errors; a checkpoint without
    tpavi_window attends over the whole clip."""
    torch.save({"tpavi_b1.extra.weight": torch.zeros(1), "output_conv.4.weight": torch.zeros(1, 32, 1, 1)},
               tmp_path / "odd.pth")
    with pytest.raises(data.DataError, match=r"odd.pth: 1 tensor\(s\) of the released .* e.g. tpavi_b1.extra.weight"):
        tpavi.load_checkpoint(str(tmp_path / "odd.pth"))
    release = dict(release="note", args={})
    for resume, weights in ((None, None), ("r.pth", "v.pth")):
        with pytest.raises(data.DataError, match="is for --eval-only or --predict"):
            tpavi.use_checkpoint_args(Namespace(resume=resume, ckpt="r.pth", vggish_weights=weights), release)
    torch.save(dict(script="tpavi", args={}, model={"audio.mel.spectrogram.window": torch.zeros(400)}),
               tmp_path / "old.pt")
    with pytest.raises(data.DataError, match="old.pt: its VGGish was trained on a log-mel front end other than"):
        tpavi.load_checkpoint(str(tmp_path / "old.pt"))
    args = Namespace(resume=None, ckpt="c.pt", vggish_weights=None)
    saved = dict(backbone="resnet18", pretrained="none", tpavi_stages=[0], audio_encoder="resnet18", mono=False)
    tpavi.use_checkpoint_args(args, dict(args=saved))
    assert args.tpavi_window == 0


@pytest.fixture(scope="module")
def vggish_file(tmp_path_factory):
    """vggish-10086976.pth's layout (torchvggish: features.* convs, embeddings.* linears), random."""
    torch.manual_seed(0)
    convs = [(1, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    state = {}
    for i, (cin, cout) in zip((0, 3, 6, 8, 11, 13), convs):
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3) * (2 / (9 * cin)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(cout) * 0.01
    for i, (cin, cout) in zip((0, 2, 4), [(12288, 4096), (4096, 4096), (4096, 128)]):
        state[f"embeddings.{i}.weight"] = torch.randn(cout, cin) * (2 / cin) ** 0.5
        state[f"embeddings.{i}.bias"] = torch.randn(cout) * 0.01
    path = tmp_path_factory.mktemp("vggish") / "vggish-10086976.pth"
    torch.save(state, path)
    return state, path


@pytest.mark.parametrize("path", LAYOUTS, ids=IDS)
def test_eval_only_on_released_layout(path, vggish_file, tmp_path):
    """`tpavi.py --eval-only --ckpt` on random weights in each released layout runs end to end on
    an AVSBench fixture (S4 for the objects layouts, AVSS with v1 and v2 clips) and logs the dropped
    branches; AVSS ResNet-50 also through --predict (the classes tell the dataset)."""
    avss = "avss" in path
    root = str(tmp_path / "avs")
    if avss:
        fl.write_avss(root, [("u1", "v2", "test", 1), ("u2", "v1m", "test", 3)])
    else:
        fl.write_s4(root, [("d", "cat", "test")])
    torch.save(released_state(read_layout(path)), tmp_path / "release.pth")
    out = tmp_path / "eval"
    proc = run_script("tpavi.py", "--data", "avss" if avss else "avsbench_s4", "--data-root", root, "--eval-only",
                      "--ckpt", tmp_path / "release.pth", "--audio-encoder", "vggish", "--vggish-weights",
                      vggish_file[1], "--crop", "64", "--workers", "0", "--out", out, "--overlays", "1",
                      "--eval-batch-size", "2", *(["--backbone", "pvt_v2_b5"] if "pvt" in path else []))
    assert "a released AVSBench model" in proc.stdout and "dropped its unused" in proc.stdout
    res = json.loads((out / "eval-real.json").read_text())
    assert res["args"]["tpavi_window"] == 5 and res["args"]["mono"]
    assert all(np.isfinite(res["eval"][k]) for k in ("miou", "mean_fbeta"))
    if avss and "resnet50" in path:
        frames = tmp_path / "frames"
        frames.mkdir()
        for i in range(2):
            fl._rgb(20, 30, i).save(frames / f"{i}.png")
        fl.dc_wav(str(tmp_path / "a.wav"), 0.2, seconds=2)
        run_script("tpavi.py", "--predict", frames, "--audio", tmp_path / "a.wav", "--ckpt", tmp_path / "release.pth",
                   "--audio-encoder", "vggish", "--vggish-weights", vggish_file[1], "--max-size", "64",
                   "--out", tmp_path / "pred")
        assert json.loads((tmp_path / "pred" / "frames.json").read_text())["data"] == "avss"


# ----------------------------------------------------------------------------- backbone files


def test_backbone_files_load_as_they_are(vggish_file, tmp_path):
    """resnet50-19c8e357.pth (torchvision ResNet-50 names, fc included), pvt_v2_b5.pth (the PVT
    release: the released encoder_backbone.* names, `.mlp.dwconv.dwconv.`, plus its ImageNet head)
    and vggish-10086976.pth (torchvggish: features.* convs, embeddings.* linears) load with every
    tensor."""
    torch.manual_seed(0)
    resnet = {k: torch.randn(v.shape) if v.is_floating_point() else v
              for k, v in torchvision.models.resnet50().state_dict().items()}
    torch.save(resnet, tmp_path / "resnet50-19c8e357.pth")
    enc = tpavi.ResNetEncoder("resnet50", str(tmp_path / "resnet50-19c8e357.pth"))
    assert all(torch.equal(v, resnet[k]) for k, v in enc.net.state_dict().items())

    layout = read_layout(next(p for p in LAYOUTS if p.endswith("avsbench_objects_pvt_v2_b5.json")))
    pvt = {k.removeprefix("encoder_backbone."): torch.randn(s) for k, s in layout.items()
           if k.startswith("encoder_backbone.")}
    pvt.update({"head.weight": torch.randn(1000, 512), "head.bias": torch.randn(1000)})
    torch.save(pvt, tmp_path / "pvt_v2_b5.pth")
    enc = tpavi.PVTv2(str(tmp_path / "pvt_v2_b5.pth"))
    own = enc.state_dict()
    assert len(own) == len(pvt) - 2
    assert all(torch.equal(own[k.replace("dwconv.dwconv", "dwconv")], v) for k, v in pvt.items()
               if not k.startswith("head."))

    net = tpavi.VGGish(str(vggish_file[1]))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in vggish_file[0].items())


# ----------------------------------------------------------------------------- TPAVI windows


def tpavi_block(seed=0):
    torch.manual_seed(seed)
    block = tpavi.TPAVI()
    with torch.no_grad():  # a trained W_z BN: not the identity start
        block.w_z[1].weight.normal_()
        block.w_z[1].bias.normal_()
        block.w_z[1].running_mean.normal_()
        block.w_z[1].running_var.uniform_(0.5, 1.5)
    return block.eval()


def windowed(block, window, *inputs):
    block.window = window
    return block(*inputs)


@pytest.mark.parametrize("t,lengths", [(10, None), (10, [10, 5]), (7, None)])
def test_tpavi_window_equals_halves(t, lengths):
    """Two clips of T frames (AVSS v2: 10; with a v1 clip padded to 10; a ragged 7): the default
    window of 5 frames equals TPAVI run on frames 0-4 and 5.. of each clip separately; window 0 and
    window >= T are the same computation."""
    block = tpavi_block()
    assert block.window == 5
    b = 2
    x = torch.randn(b * t, 256, 6, 5)
    audio = torch.randn(b, t, 128)
    valid = None if lengths is None else torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        z, a = block(x, audio, valid)
        xs = x.view(b, t, *x.shape[1:])
        parts = [block(xs[:, s].flatten(0, 1), audio[:, s], None if valid is None else valid[:, s])
                 for s in (slice(0, 5), slice(5, t))]
        want = torch.cat([p[0].view(b, -1, *x.shape[1:]) for p in parts], 1).flatten(0, 1)
        assert torch.allclose(z, want, atol=1e-5, rtol=1e-5)
        assert torch.allclose(a, torch.cat([p[1] for p in parts], 1), atol=1e-6, rtol=0)
        whole = windowed(block, 0, x, audio, valid)
        assert (z - whole[0]).abs().max() > 1e-3  # the windows matter
        for window in (t, 16):
            zw, aw = windowed(block, window, x, audio, valid)
            assert torch.equal(zw, whole[0]) and torch.equal(aw, whole[1])


def test_model_with_windows_equals_halves():
    """AVSModel's TPAVI blocks with the default windows of 5 on a 10-frame clip give the logits of
    the model run on the two 5-frame halves (image and 5 s of audio each); --tpavi-window 0 does not."""
    torch.manual_seed(0)
    model = tpavi.AVSModel("resnet18", "none", 3, [0, 1, 2, 3], audio_channels=1).eval()
    for block in model.tpavi.values():
        with torch.no_grad():
            block.w_z[1].weight.normal_()
    image, wave = torch.randn(1, 10, 3, 64, 64), torch.randn(1, 1, 160000)
    with torch.no_grad():
        halves = torch.cat([model(image[:, s], wave[..., 16000 * s.start:16000 * s.stop])[0]
                            for s in (slice(0, 5), slice(5, 10))])
        windows = model(image, wave)[0]
        for block in model.tpavi.values():
            block.window = 0
        whole = model(image, wave)[0]
    assert torch.allclose(windows, halves, atol=1e-4, rtol=1e-4)
    assert (whole - halves).abs().max() > 1e-3
