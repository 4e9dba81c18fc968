"""Datasets, audio features and pictures shared by cavp.py and tpavi.py, in the order a sample
travels through them:

  label sets      VPO's 21 classes + background (CAVP Sec. 3, App. A, Table 7); AVSBench-Objects
                  S4's 23 categories and AVSBench-Semantics' 71 classes (AVS Sec. 3)
  files           WAV read / write (standard library `wave` + numpy), images, CSVs, run folders,
                  COCO JSON
  audio           clip crop / repeat-pad and resampling to 16 kHz, stereo panning (CAVP Fig. 3),
                  the log-mel front end of the released cyh-0/CAVP code
  images          resize, uint8 (3, H, W) tensors, ImageNet normalisation (in the step)
  augmentation    the joint train augmentation of CAVP App. B.1: colour jitter, h-flip, scale, crop;
                  drawn in the loader, the image cut and jittered in the step (window_images)
  datasets        VPODataset (the layout of cyh-0/CAVP's VPO release), the audio alignment check
                  (CounterfactualAudio: silent or absent-class audio), AVSBenchDataset and
                  AVSBenchFrames (the layouts of OpenNLPLab/AVSBench's release)
  collate         worker_init, pad_collate, device_batch (the step's copy, training windows and
                  normalisation)
  pictures        overlays and panels of the saved figures
  --predict       the inputs of one prediction: any picture, any WAV

Bad input data raises DataError, one line naming the file and what to do.
"""
import colorsys
import contextlib
import ctypes
import csv
import functools
import json
import math
import os
import re
import struct
import tempfile
import wave

import numpy as np
import torch
import torchaudio
from PIL import Image, ImageDraw, ImageFont, ImageOps
from pycocotools import mask as mask_utils


class DataError(Exception):
    """Bad input data; the message is one line naming the file and what to do."""

    def __init__(self, msg):
        # a DataLoader worker re-raises with the whole traceback as the message: keep our line
        if "\nOriginal Traceback" in msg:
            msg = msg.rstrip().rsplit("\n", 1)[-1].split("DataError: ", 1)[-1]
        super().__init__(msg)


# ---------------------------------------------------------------- label sets
# VPO (CAVP Sec. 3, App. A): index 0 = background, then the 21 classes in ascending COCO category
# id (the release uses 92/93/94 for male/female/baby).
VPO_CLASSES = ["background", "car", "motorcycle", "airplane", "bus", "bird", "cat", "dog",
               "horse", "sheep", "cow", "elephant", "zebra", "sports ball", "skateboard",
               "tennis racket", "mouse", "keyboard", "cell phone", "male", "female", "baby"]
VPO_COCO_IDS = [3, 4, 5, 6, 16, 17, 18, 19, 20, 21, 22, 24, 37, 41, 43, 74, 76, 77, 92, 93, 94]
# CAVP Table 7: visual label -> VGGSound labels
VPO_AUDIO_LABELS = {
    "bird": ["mynah bird singing"],
    "keyboard": ["typing on computer keyboard"],
    "bus": ["driving buses"],
    "cat": ["cat purring", "cat meowing", "cat caterwauling"],
    "dog": ["dog growling", "dog bow-wow", "dog whimpering", "dog howling", "dog barking",
            "dog baying"],
    "horse": ["horse neighing", "horse clip-clop"],
    "car": ["car passing by", "car engine idling", "car engine starting", "race car, auto racing",
            "car engine knocking"],
    "sports ball": ["shot football"],
    "airplane": ["airplane", "airplane flyby"],
    "sheep": ["sheep bleating"],
    "cow": ["cow lowing"],
    "motorcycle": ["driving motorcycle"],
    "mouse": ["mouse clicking"],
    "cell phone": ["cell phone buzzing"],
    "elephant": ["elephant trumpeting"],
    "zebra": ["zebra braying"],
    "tennis racket": ["playing tennis"],
    "skateboard": ["skateboarding"],
    "male": ["male speech, man speaking", "male singing"],
    "female": ["female speech, woman speaking"],
    "baby": ["baby babbling", "baby crying", "baby laughter"],
}
AVSS_NUM_CLASSES = 71
# AVSBench-Objects S4: the 23 categories of s4_meta_data.csv (VGGSound labels written with '_'),
# in the order of the CAVP release's AVSBench index table (cyh-0/CAVP, config/class_list.py)
AVS_S4_CATEGORIES = [
    "ambulance_siren", "baby_laughter", "cap_gun_shooting", "cat_meowing", "chainsawing_trees",
    "coyote_howling", "dog_barking", "driving_buses", "female_singing", "helicopter",
    "horse_clip-clop", "lawn_mowing", "lions_roaring", "male_speech", "mynah_bird_singing",
    "playing_acoustic_guitar", "playing_glockenspiel", "playing_piano", "playing_tabla",
    "playing_ukulele", "playing_violin", "race_car", "typing_on_computer_keyboard"]
# AVSBench-Semantics: class j is label2idx.json's entry j + 1 (the release numbers from 1,
# background first)
AVSS_CLASSES = [
    "background", "accordion", "airplane", "axe", "baby", "bassoon", "bell", "bird", "boat", "boy",
    "bus", "car", "cat", "cello", "clarinet", "clipper", "clock", "dog", "donkey", "drum", "duck",
    "elephant", "emergency-car", "erhu", "flute", "frying-food", "girl", "goose", "guitar", "gun",
    "guzheng", "hair-dryer", "handpan", "harmonica", "harp", "helicopter", "hen", "horse",
    "keyboard", "leopard", "lion", "man", "marimba", "missile-rocket", "motorcycle", "mower",
    "parrot", "piano", "pig", "pipa", "saw", "saxophone", "sheep", "sitar", "sorna", "squirrel",
    "tabla", "tank", "tiger", "tractor", "train", "trombone", "truck", "trumpet", "tuba",
    "ukulele", "utv", "vacuum-cleaner", "violin", "wolf", "woman"]
SAMPLE_RATE = 16000


# ---------------------------------------------------------------- files: WAV, image, CSV, COCO
def _decode_pcm(raw, width, channels, is_float, path):
    if is_float and width in (4, 8):
        x = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw[:len(raw) // 3 * 3], dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    else:
        raise DataError(f"{path}: unsupported WAV sample width {8 * width} bit; "
                        "convert it to 16-bit PCM")
    n = len(x) // channels
    return np.ascontiguousarray(x[:n * channels].reshape(n, channels).T)


def _read_riff(path):
    """Minimal RIFF reader for what `wave` (3.11) rejects: IEEE float and WAVE_FORMAT_EXTENSIBLE."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DataError(f"{path}: not a RIFF/WAVE file; convert it to a 16-bit PCM .wav")
    pos, fmt, raw = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt = body
        elif cid == b"data":
            raw = body
            if len(body) < size:
                raise DataError(f"{path}: WAV truncated: it holds {len(body)} of the {size} data "
                                "bytes its header claims; re-download or re-encode the file")
        pos += 8 + size + (size & 1)
    if fmt is None or raw is None or len(fmt) < 16:
        raise DataError(f"{path}: WAV without fmt/data chunk; re-encode it as 16-bit PCM .wav")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: sub-format GUID starts at 24
        tag = struct.unpack("<H", fmt[24:26])[0]
    if tag not in (1, 3) or channels < 1:
        raise DataError(f"{path}: unsupported WAV format tag {tag}; convert it to 16-bit PCM .wav")
    return _decode_pcm(raw, bits // 8, channels, tag == 3, path), rate


def _wav_open(path):
    """(sample rate, frames, read(start, stop) -> float32 (C, stop - start) in [-1, 1]) of a WAV
    file; PCM WAVs are read only over [start, stop)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: audio file not found; check --audio-root / --data-root")
    try:
        with open(path, "rb") as f, wave.open(f) as w:
            c, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            # `wave` stops at the data chunk's header: the samples start here
            held = (os.fstat(f.fileno()).st_size - f.tell()) // (c * width)
    except (wave.Error, EOFError):
        x, rate = _read_riff(path)
        return rate, x.shape[1], lambda start, stop: x[:, start:stop]
    except OSError as e:
        raise DataError(f"{path}: cannot read WAV ({e}); re-encode it as 16-bit PCM .wav") from e
    if held < n:
        raise DataError(f"{path}: WAV truncated: it holds {held} of the {n} samples its header "
                        "claims; re-download or re-encode the file")

    def read(start, stop):
        with wave.open(path, "rb") as w:
            w.setpos(start)
            return _decode_pcm(w.readframes(stop - start), width, c, False, path)
    return rate, n, read


def _wav_samples(path):
    """_wav_open of a WAV that holds at least one sample."""
    rate, length, read = _wav_open(path)
    if length == 0:
        raise DataError(f"{os.fspath(path)}: WAV has no samples; replace the file")
    return rate, length, read


def _check_wavs(paths):
    """Header check (a few hundredths of a millisecond per PCM file) of every listed WAV."""
    for path in dict.fromkeys(paths):
        _wav_samples(path)


def read_wav(path):
    """Read a WAV file -> (float32 array (C, N) in [-1, 1], sample_rate)."""
    rate, n, read = _wav_open(path)
    return read(0, n), rate


def write_wav(path, wave_, sample_rate=SAMPLE_RATE):
    """Write (N,) or (C, N) float audio as 16-bit PCM, clipped to [-1, 1], atomically."""
    x = np.asarray(wave_.detach().cpu() if torch.is_tensor(wave_) else wave_, dtype=np.float64)
    x = x[None] if x.ndim == 1 else x
    pcm = np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").T.tobytes()
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".wav.tmp")
    try:
        with os.fdopen(fd, "wb") as f, wave.open(f, "wb") as w:
            w.setnchannels(x.shape[0])
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(pcm)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _open_image(path, mode, size_only=False):
    """PIL image of `path` in `mode` (None: as stored); size_only: its (width, height) from the
    header alone."""
    try:
        with Image.open(path) as im:
            if size_only:
                return im.size
            im.load()
            return im.convert(mode) if mode and im.mode != mode else im
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e}); re-download or replace the file") from e


def _missing(paths, what, fix):
    """Raise one DataError naming the first missing file (checked at construction time)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]} not found{more}, listed in {what}; {fix}")


def _read_csv(path, required, fix):
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; {fix}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{k: (v if isinstance(v, str) else "").strip()
                     for k, v in r.items() if k is not None} for r in reader]
            header = [h.strip() for h in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({e}); re-download it") from e
    absent = [c for c in required if c not in header]
    if absent:
        raise DataError(f"{path}: missing column(s) {', '.join(absent)}; expected "
                        f"{', '.join(required)} in its header row: fix it or re-download the file")
    return rows, header


def _limit(items, limit):
    return items if limit is None else items[:limit]


def _int_field(value, path, column):
    ids = re.findall(r"-?\d+", str(value))
    if not ids:
        raise DataError(f"{path}: column {column} has no integer in {value!r}; fix the CSV row")
    return int(ids[0])


RUN_FILES = ("last.pt", "best.pt", "metrics.json")  # what a training run writes to its folder


def check_new_run(out):
    """DataError when the folder `out` holds a run that a new training run would replace."""
    found = [f for f in RUN_FILES if os.path.isfile(os.path.join(out, f))]
    if found:
        raise DataError(f"--out {out} holds another run ({', '.join(found)}); pass a new --out, "
                        f"--resume {os.path.join(out, 'last.pt')} to continue it, or --overwrite "
                        "to replace it")


def read_coco(ann_file):
    """COCO instances JSON -> dict(names {category id: name}, images [ids],
    anns {img_Id: [annotation]})."""
    fix = ("pass --coco-ann with the COCO instances JSON of the test images "
           "(e.g. instances_val2017.json)")
    try:
        with open(ann_file) as f:
            coco = json.load(f)
        anns = {}
        for a in coco["annotations"]:
            anns.setdefault(int(a["image_id"]), []).append(a)
        return dict(names={c["id"]: c["name"] for c in coco["categories"]},
                    images=[int(im["id"]) for im in coco["images"]], anns=anns)
    except FileNotFoundError:
        raise DataError(f"{ann_file} not found: {fix}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{ann_file}: not a COCO instances file ({type(e).__name__}: {e}); "
                        f"{fix}") from None


def decode_coco(seg, h, w):
    """COCO segmentation (polygons, RLE or compressed RLE) -> (h, w) uint8 {0, 1} mask."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle)


# ---------------------------------------------------------------- audio: clips, panning, log-mel
def fit_length(x, n, centre=True):
    """Crop the last axis to n samples around the middle (or from the start if not `centre`);
    repeat-pad shorter signals (the audio clips of the released cyh-0/CAVP code)."""
    length = x.shape[-1]
    if length < n:
        x = x.repeat(*([1] * (x.dim() - 1)), -(-n // length))
        return x[..., :n]
    start = (length - n) // 2 if centre else 0
    return x[..., start:start + n]


def pan(mono, alpha, stereo=True):
    """CAVP Sec. 3 / Fig. 3: a (1, N) mono source at relative position alpha -> (2, N) with
    L = (1 - alpha) * w, R = alpha * w; with stereo=False the mono source itself."""
    return torch.cat([(1 - alpha) * mono, alpha * mono]) if stereo else mono


class _Resampler:
    """torchaudio's resampling (transforms.Resample: sinc, Hann window, 6 zero crossings) of (C, N)
    signals. Where a block of input samples (`orig`) is longer than the filter, as from 44.1 kHz
    to 16 kHz, it is computed block-sparse: output phase i of `new` reads only the input samples
    within the filter's reach of its position, so each group of consecutive phases multiplies just
    the taps where its kernels are non-zero (44.1 -> 16 kHz: a sixth of the products of
    torchaudio's dense convolution); equal to torchaudio's result up to the order of float sums."""

    GROUPS = 8  # phase groups: fewer products per group vs one matrix product each

    def __init__(self, orig, new):
        self.dense = torchaudio.transforms.Resample(orig, new)
        g = math.gcd(orig, new)
        self.orig, self.new, self.width = orig // g, new // g, self.dense.width
        kernel = self.dense.kernel[:, 0]  # (new, 2 width + orig): phase i's taps
        self.taps, self.groups = kernel.shape[1], []
        step = -(-self.new // self.GROUPS)
        for first in range(0, self.new, step):
            block = kernel[first:first + step]
            used = torch.nonzero(block.abs().sum(0)).flatten()
            lo, hi = int(used.min()), int(used.max()) + 1
            self.groups.append((first, lo, block[:, lo:hi].T.contiguous()))
        if max(b.shape[0] for _, _, b in self.groups) > self.orig:  # overlapping reads: dense
            self.groups = None

    def __call__(self, x):
        if self.groups is None:
            return self.dense(x)
        channels, length = x.shape
        padded = torch.nn.functional.pad(x, (self.width, self.width + self.orig))
        frames = (padded.shape[1] - self.taps) // self.orig + 1  # conv1d's output length
        out = x.new_empty(channels, frames, self.new)
        for c in range(channels):
            for first, lo, block in self.groups:
                rows = padded[c].as_strided((frames, block.shape[0]), (self.orig, 1),
                                            padded[c].storage_offset() + lo)
                out[c, :, first:first + block.shape[1]] = rows @ block
        return out.reshape(channels, -1)[:, :-(-self.new * length // self.orig)]


@functools.lru_cache(maxsize=None)
def _resampler(orig, new):
    """The _Resampler of a rate pair, built once."""
    return _Resampler(orig, new)


def load_clip(path, sample_rate=SAMPLE_RATE, seconds=3.0, centre=True, mono=False,
              with_length=False):
    """Read a WAV, resample to `sample_rate`, `seconds` crop (centred) / repeat-pad -> (C, N); mono:
    channels averaged, (1, N); with_length: -> ((C, N), the samples of the clip's own audio in
    it, the rest repeat-padding). The crop is cut in source samples before resampling, with a
    margin of whole resampling blocks beyond the sinc filter's reach, so the result is that of
    resampling the whole clip."""
    rate, length, read = _wav_samples(path)
    n = int(round(seconds * sample_rate))
    g = math.gcd(rate, sample_rate)
    # resampling maps each block_in samples to block_out
    block_in, block_out = rate // g, sample_rate // g
    full = -(-length * block_out // block_in)  # length of the whole clip resampled
    skip, start, stop = 0, 0, length
    if full >= n:  # else repeat-pad: the whole clip is needed
        begin = (full - n) // 2 if centre else 0
        # blocks; 8 > the filter's half-width of ~6 input periods
        reach = -(-8 // min(block_in, block_out))
        first, last = max(0, begin // block_out - reach), -(-(begin + n) // block_out) + reach
        start, stop, skip = (first * block_in, min(length, last * block_in),
                             begin - first * block_out)
    x = torch.from_numpy(read(start, stop))
    if mono:
        x = x.mean(0, keepdim=True)
    if rate != sample_rate:
        x = _resampler(rate, sample_rate)(x)
    # the crop starts at skip; a short clip is repeat-padded
    x = fit_length(x[:, skip:], n, centre=False)
    return (x, min(full, n)) if with_length else x


class LogMel(torch.nn.Module):
    """The audio front end of the released cyh-0/CAVP code: (B, C, N) waveform -> (B, C, frames,
    bands) scaled log-mel, per channel; 25 ms windows every `hop` samples (160: 10 ms), 64 bands.
    centre: read only that many samples at the middle of the N (None: all of them)."""

    def __init__(self, sample_rate=SAMPLE_RATE, frames=None, hop=160, bands=64, centre=None):
        super().__init__()
        self.frames, self.centre = frames, centre
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=512, win_length=400, hop_length=hop, n_mels=bands,
            f_min=125.0, f_max=3800.0, power=2.0, window_fn=torch.hann_window)

    def forward(self, wave_):
        if self.centre is not None:
            start = (wave_.shape[-1] - self.centre) // 2
            wave_ = wave_[..., start:start + self.centre]
        x = self.mel(wave_.float()).transpose(-1, -2)  # (B, C, frames, bands)
        if self.frames is not None:
            x = x[..., :self.frames, :]
        return 20.0 * torch.log10(x.clamp_min(1e-5)) / 100.0  # 20*log10(max(x,1e-5))/100


VGGISH_WINDOW, VGGISH_HOP, VGGISH_FFT = 400, 160, 512  # 25 ms frames every 10 ms at 16 kHz
VGGISH_BANDS, VGGISH_EXAMPLE = 64, 96  # mel bands; frames per example (0.96 s) and example hop


def vggish_mel_matrix():
    """(257, 64) float64 weights of VGGish's rFFT magnitude bins: HTK mel, 1127 ln(1 + f / 700);
    band edges equally spaced in mel from 125 to 7500 Hz, triangles linear in mel; the DC bin's
    row 0."""
    def mel(f):
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)
    bins = mel(torch.linspace(0.0, SAMPLE_RATE / 2, VGGISH_FFT // 2 + 1, dtype=torch.float64))
    edges = torch.linspace(mel(125.0).item(), mel(7500.0).item(), VGGISH_BANDS + 2,
                           dtype=torch.float64)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    weights = torch.minimum(rising, falling).clamp(min=0.0)
    weights[0] = 0.0
    return weights


class VGGishLogMel(torch.nn.Module):
    """VGGish's own front end (Hershey et al., 2017; its published vggish_input / mel_features,
    which AVSBench's preprocessing runs): (B, C, N) waveform at 16 kHz, int16 samples or floats in
    [-1, 1] (int16 / 32768) -> (B, F, 64) log-mel frames of the mean of the channels.

    Frames of 400 samples every 160, not centred, periodic Hann, 512-point rFFT zero-padded at the
    end, magnitude; vggish_mel_matrix; log(mel + 0.01). Computed in float64 with autocast off
    (log(mel + 0.01) of a quiet band next to loud ones moves by up to 1e-4 in float32, far more in
    bf16), returned as float32. The window and the mel matrix are not in the state dict, so VGGish
    weight files load as they are."""

    def __init__(self):
        super().__init__()
        n = torch.arange(VGGISH_WINDOW, dtype=torch.float64)
        hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n / VGGISH_WINDOW)  # periodic
        self.register_buffer("window", hann, persistent=False)
        self.register_buffer("fb", vggish_mel_matrix(), persistent=False)

    def forward(self, wave_):
        with torch.autocast(wave_.device.type, enabled=False):
            x = wave_.to(torch.float64)
            x = (x if wave_.is_floating_point() else x / 32768.0).mean(1)  # (B, N)
            if x.shape[-1] < VGGISH_WINDOW:
                return x.new_zeros(x.shape[0], 0, VGGISH_BANDS, dtype=torch.float32)
            frames = x.unfold(-1, VGGISH_WINDOW, VGGISH_HOP) * self.window  # (B, F, 400)
            spec = torch.fft.rfft(frames, n=VGGISH_FFT).abs()
            return torch.log(spec @ self.fb + 0.01).float()


def vggish_examples(logmel, slots, lengths=None, pad="repeat"):
    """VGGish's examples of whole clips, one per frame slot: 96 frames at a hop of 96, so example k
    starts at 0.96 k s (a 5-s clip has 5, at 0, 0.96, ..., 3.84 s; a 10-s clip 10).

    logmel (B, F, 64) VGGishLogMel frames of clips of N samples; lengths (B,) samples of each
    clip's own audio (the rest of the N is padding; None: all N). Slot k gets example k; past the
    clip's last example pad "repeat" repeats it (AVSBench-Objects: the released
    audio_log_mel/*.pkl) or "zero" gives zeros (AVSBench-Semantics: the released test script). A
    clip without a whole example gets zeros. -> (B, slots, 96, 64)."""
    b, f = logmel.shape[:2]
    have = f // VGGISH_EXAMPLE  # examples in the N samples
    if have == 0:
        return logmel.new_zeros(b, slots, VGGISH_EXAMPLE, VGGISH_BANDS)
    count = torch.full((b,), have, dtype=torch.long, device=logmel.device)
    if lengths is not None:  # whole frames, then whole examples, of the clip's own audio
        frames = (lengths.to(logmel.device).long() - VGGISH_WINDOW) // VGGISH_HOP + 1
        count = frames.clamp(0, f) // VGGISH_EXAMPLE
    examples = logmel[:, :VGGISH_EXAMPLE * have].unflatten(1, (have, VGGISH_EXAMPLE))
    k = torch.arange(slots, device=logmel.device)
    idx = torch.minimum(k[None], (count - 1).clamp(min=0)[:, None]).clamp(max=have - 1)
    out = examples[torch.arange(b, device=logmel.device)[:, None], idx]  # (B, slots, 96, 64)
    keep = count[:, None] > (k[None] if pad == "zero" else 0)
    return out * keep[:, :, None, None].to(out.dtype)


# ---------------------------------------------------------------- images: resize, normalise
# A sample's image stays uint8 (3, H, W) through the loader (a quarter of float32's bytes to
# collate, move and copy to the device); the training or evaluation step normalises it on the
# device (device_batch).
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
MEAN_LEVELS = (255 * MEAN).round().byte()  # the padding colour: 0 after normalize, up to rounding


def read_image(path, size=None):
    """RGB image -> float (3, H, W) in [0, 1]; optional bilinear resize to (size, size)."""
    im = _open_image(path, "RGB")
    if size is not None:
        im = im.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0


def _resize_mask(arr, size):
    return arr if size is None else np.asarray(Image.fromarray(arr).resize((size, size),
                                                                            Image.NEAREST))


def normalize(img):
    """ImageNet normalisation of images (..., 3, H, W) in levels 0..255 (uint8, or float from
    window_images) on their own device: float32 (img / 255 - MEAN) / STD, computed as
    img * (1 / (255 STD)) - MEAN / STD."""
    scale, shift = (1.0 / (255.0 * STD)).to(img.device), (MEAN / STD).to(img.device)
    return img.float().mul(scale).sub_(shift)


def _hwc(im):
    """PIL image -> uint8 tensor (H, W[, C])."""
    return torch.from_numpy(np.array(im))


def _rgb(im, out=None):
    """RGB PIL image -> uint8 (3, H, W), written into `out` when given."""
    out = torch.empty(3, im.height, im.width, dtype=torch.uint8) if out is None else out
    # one contiguous copy per band: faster than a transposing one
    for channel, band in zip(out, im.split()):
        channel.copy_(_hwc(band))
    return out


def to_uint8(img):
    """Normalised (3, H, W) image tensor -> (H, W, 3) uint8 (undoes `normalize`)."""
    img = (img.detach().cpu().float() * STD + MEAN).clamp(0, 1)
    return (img * 255).round().byte().permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- augmentation
JITTER = 0.4  # train colour jitter: brightness / contrast / saturation factor in 1 +- 0.4
SCALE = (0.5, 2.0)  # train random scale range


_GREY = torch.tensor([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale weights
# what a training sample's `window` holds: the step resamples and jitters its source image there
WINDOW = ("left", "top", "right", "bottom", "width", "height", "crop_width", "crop_height",
          "source_width", "source_height", "flip", "brightness", "contrast", "saturation")


def augment(im, mask, crop, pan="csv"):
    """Joint train augmentation (CAVP App. B.1) of a PIL image and its PIL label map, drawn in this
    order: colour jitter factors, h-flip, scale s, then the offset (y, x) of a crop x crop window
    (None: no crop) of the scaled image padded to crop (image: the mean colour, mask 255). The mask
    is cut here: the source pixel under each output pixel's centre. The image leaves as it was
    decoded, with a `window`: the part of the source that the crop shows (PIL resize's box), its
    size, the flip and the jitter factors (WINDOW); the step resamples, flips and jitters that part
    on its device (window_images). Returns (source uint8 (3, H, W), stored (H, W, 3) as decoded,
    window float64 (14,), mask uint8 (h, w), flipped, pos), pos(audio_pos) being where a source is
    panned: the CSV position mirrored on a flip (pan 'csv') or its centre of mass moved with the
    crop ('crop')."""
    bright, contrast, sat = (float(torch.empty(1).uniform_(1 - JITTER, 1 + JITTER))
                             for _ in range(3))
    flip = bool(torch.rand(1) < 0.5)
    s = float(torch.empty(1).uniform_(SCALE[0], SCALE[1]))
    w_src, h_src = im.size
    h, w = max(1, round(h_src * s)), max(1, round(w_src * s))
    ch, cw, y0, x0 = h, w, 0, 0
    if crop is not None:
        ch = cw = crop
        y0 = int(torch.randint(0, max(h, ch) - ch + 1, (1,)))
        x0 = int(torch.randint(0, max(w, cw) - cw + 1, (1,)))
    vh, vw = min(h - y0, ch), min(w - x0, cw)  # the part of the crop inside the scaled image
    left = w - x0 - vw if flip else x0  # ... its first column in the unflipped scaled image
    sy, sx = h_src / h, w_src / w
    window = torch.tensor([left * sx, y0 * sy, (left + vw) * sx, (y0 + vh) * sy, vw, vh, cw, ch,
                           w_src, h_src, flip, bright, contrast, sat], dtype=torch.float64)
    # mask: the source pixel under each output pixel's centre, floor((y + 0.5) * h_src / h) in
    # integers
    rows = np.arange(2 * y0 + 1, 2 * (y0 + vh), 2) * h_src // (2 * h)
    cols = np.arange(2 * left + 1, 2 * (left + vw), 2) * w_src // (2 * w)
    labels = torch.full((ch, cw), 255, dtype=torch.uint8)
    cols = cols[::-1] if flip else cols
    labels[:vh, :vw] = torch.from_numpy(np.asarray(mask).take(rows, 0).take(cols, 1))

    def pos(alpha):  # audio_pos = centre of mass / W (pixel centres), so x = alpha * W maps exactly
        alpha = 1.0 - alpha if flip else alpha  # a flip mirrors the sound too (CAVP Sec. 3)
        return alpha if pan == "csv" else min(1.0, max(0.0, (alpha * w - x0) / cw))
    return _hwc(im).permute(2, 0, 1), window, labels, flip, pos


def _bilinear(lo, hi, n, size, n_src, length, flip):
    """(B, size, length) matrices of PIL's bilinear resize (its precompute_coeffs) of the source
    span [lo, hi) (B,), out of n_src (B,) valid samples, to n (B,) outputs, mirrored where flip:
    the triangle filter, widened by the scale when it shrinks, each row normalised; rows past n
    are 0."""
    i = torch.arange(size, device=lo.device, dtype=lo.dtype)
    scale = ((hi - lo) / n)[:, None]
    at = torch.where(flip[:, None], n[:, None] - 1 - i, i)  # the output's column before the flip
    centre = lo[:, None] + (at + 0.5) * scale
    j = torch.arange(length, device=lo.device, dtype=lo.dtype)
    w = (1 - ((j + 0.5 - centre[..., None]) / scale.clamp(min=1)[..., None]).abs()).clamp(min=0)
    w = w * (j < n_src[:, None, None]) * (i < n[:, None])[..., None]
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def window_images(src, window):
    """Training images from their sources on the step's device: uint8 sources (B, 3, H, W) and
    their augment windows (B, 14, on the host) -> float32 (B, 3, crop_h, crop_w) in levels
    0..255. PIL's bilinear resize of each window (float32 weights, no rounding between its
    passes), the flip, then torchvision's brightness, contrast (towards the mean grey of the whole
    brightness-adjusted source) and saturation formulas, in float; the crop's padding is the mean
    colour. Against the uint8 pipeline of PIL (two roundings in the resize, one in the jitter
    table, one after saturation) it differs by those roundings only."""
    # the crop's size from the host's windows: no wait for the device
    size = (int(window[:, WINDOW.index("crop_height")].max()),
            int(window[:, WINDOW.index("crop_width")].max()))
    win = dict(zip(WINDOW, window.to(src.device, torch.float64, non_blocking=True).unbind(1)))
    flip = win["flip"] > 0
    rows = _bilinear(win["top"], win["bottom"], win["height"], size[0], win["source_height"],
                     src.shape[-2], torch.zeros_like(flip)).float()
    cols = _bilinear(win["left"], win["right"], win["width"], size[1], win["source_width"],
                     src.shape[-1], flip).float()
    x = src.float()
    with _ieee_matmul(x.device):
        img = rows[:, None] @ x @ cols.transpose(1, 2)[:, None]
    b, c, s = (win[k].float()[:, None, None, None] for k in ("brightness", "contrast",
                                                             "saturation"))
    grey = _GREY.to(x.device)
    img = img.mul_(b).clamp_(max=255)                                    # brightness
    whole = torch.einsum("c,bchw->bhw", grey, x.mul_(b).clamp_(max=255))
    inside = _inside(x.shape[-2:], win["source_height"], win["source_width"])
    mean = (whole * inside).sum((1, 2)) / inside.sum((1, 2))
    img = img.mul_(c).add_((1 - c) * mean[:, None, None, None]).clamp_(0, 255)  # contrast
    img_grey = torch.einsum("c,bchw->bhw", grey, img)[:, None]
    img = img.mul_(s).add_((1 - s) * img_grey).clamp_(0, 255)                # saturation
    shown = _inside(size, win["height"], win["width"])
    return torch.where(shown[:, None], img, (255 * MEAN).to(x.device))


def _inside(size, h, w):
    """(B, *size) bool: the top-left h x w (B,) of each."""
    rows, cols = (torch.arange(n, device=h.device) for n in size)
    return (rows[:, None] < h[:, None, None]) & (cols < w[:, None, None])


@contextlib.contextmanager
def _ieee_matmul(device):
    """float32 matrix products in full precision (no TF32) on CUDA, whatever the run allows."""
    if device.type != "cuda":
        yield
        return
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


# ---------------------------------------------------------------- datasets: VPO
VPO_SUBSETS = {"ss": "VPO-SS", "ms": "VPO-MS", "msmi": "VPO-MSMI"}
_VPO_LUT = np.full(256, -1, dtype=np.int64)
_VPO_LUT[0], _VPO_LUT[255] = 0, 255
_VPO_LUT[VPO_COCO_IDS] = np.arange(1, len(VPO_COCO_IDS) + 1)
_VPO_SPLITS = {"train": "train", "val": "test", "test": "test"}  # the release's "val" = test set
_VPO_COLUMNS = ["cateName", "img_Id", "ann_Ids", "cateId", "vgg_file", "split", "audio_pos"]


_VPO_POINT = _VPO_LUT.clip(0).tolist()  # checked COCO ids -> VPO labels, as a PIL point() table


def read_vpo_mask(path):
    """Mask PNG of COCO category ids (0 bg, 92/93/94 male/female/baby, 255 ignore) -> PIL image ("L"
    or "P") of VPO labels 0..21 / 255; DataError on any other value."""
    im = _open_image(path, None)
    if im.mode in ("L", "P"):
        values = np.flatnonzero(im.histogram())
    else:
        arr = np.asarray(im)
        if arr.ndim != 2:
            raise DataError(f"{path}: mask must be a single-channel PNG of COCO ids, "
                            f"got shape {arr.shape}")
        values = np.unique(arr)
    bad = values[(values < 0) | (values > 255) | (_VPO_LUT[np.clip(values, 0, 255)] < 0)]
    if bad.size:
        raise DataError(f"{path}: mask value {int(bad[0])} is not a VPO COCO class id "
                        f"({VPO_COCO_IDS}, 0, 255); fix the mask or rebuild with vpo_make.py")
    if im.mode not in ("L", "P"):
        im = Image.fromarray(arr.astype(np.uint8), "L")
    return im.point(_VPO_POINT)


class VPODataset(torch.utils.data.Dataset):
    """VPO-SS/MS/MSMI (CAVP Sec. 3, App. A) in the layout of cyh-0/CAVP's VPO release, which
    vpo_make.py writes too: per subset vpo_{ss,ms,msmi}_data_stereo.csv, data/ and mask/.

    A sample is a dict: image (3, H, W) uint8 (normalised in the step: device_batch), mask (H, W)
    uint8 (VPO labels, 255 ignore), wave (C, N), audio_classes (K,) {0, 1}, audio_pos () (the
    source's position, -1 for several sources), source_pos (K,) (each sounding class's position,
    -1 elsewhere), name; with load_twins, test samples also carry `twin` (H, W) uint8.

    root holds VPO-SS/, VPO-MS/, VPO-MSMI/; audio_root (default root/audio) holds {vgg_file}.wav
    (vgg_file may already end in .wav). SS: one sample per CSV row; MS/MSMI: one per image with
    one CSV row per sound source. train=True: colour jitter, h-flip (mirrors the stereo),
    scale 0.5-2.0 and a random `crop` (None: no crop); all randomness drawn from torch's RNG; the
    image is then the decoded source with its `window` (augment), cut in the step.
    pan: where a training sample's sources are panned: "csv", at the CSV audio_pos, mirrored on a
    flip (the release); "crop", at their object's centre of mass (the CSV audio_pos) moved by the
    flip, scale and crop and clamped to [0, 1]. source_pos / audio_pos carry the positions used.

    Checked before training, as DataError naming the file: the CSV (columns, split names, classes,
    positions, a row repeated), every listed file's presence, every WAV's header (a WAV shorter
    than its header says is truncated) and, for the test split, every mask's values and size
    against its image's header. Every read checks a mask's values and size.
    """

    def __init__(self, root, subset, split, audio_root=None, stereo=True, train=False, crop=512,
                 limit=None, pan="csv"):
        self.twins = None
        if pan not in ("crop", "csv"):
            raise DataError(f"unknown pan {pan!r}; use crop or csv")
        if subset not in VPO_SUBSETS:
            raise DataError(f"unknown VPO subset {subset!r}; use one of {sorted(VPO_SUBSETS)}")
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown VPO split {split!r}; use train or test")
        root = os.fspath(root)
        self.dir = os.path.join(root, VPO_SUBSETS[subset])
        build = ("build the built-in VPO with `python vpo_make.py --synthetic --out data` "
                 "or pass --data-root")
        if not os.path.isdir(self.dir):
            raise DataError(f"{self.dir} not found: {build}")
        self.audio_root = (os.fspath(audio_root) if audio_root is not None
                           else os.path.join(root, "audio"))
        if not os.path.isdir(self.audio_root):
            raise DataError(f"{self.audio_root} not found: pass --audio-root "
                            "(folder of {vgg_file}.wav)")
        self.subset, self.stereo, self.train, self.crop, self.pan = subset, stereo, train, crop, pan
        self.csv = os.path.join(self.dir, f"vpo_{subset}_data_stereo.csv")
        rows, _ = _read_csv(self.csv,
                            _VPO_COLUMNS + (["multi_instance"] if subset == "msmi" else []), build)
        bad = [r["split"] for r in rows if r["split"] not in _VPO_SPLITS]
        if bad:
            raise DataError(f"{self.csv}: split value {bad[0]!r} is not train/val/test; "
                            "fix the CSV")
        seen = {}
        for k, r in enumerate(rows):
            first = seen.setdefault(tuple(r.items()), k)
            if first != k:
                raise DataError(f"{self.csv}: rows {first + 1} and {k + 1} under the header are "
                                f"the same (img_Id {r['img_Id']}, ann_Ids {r['ann_Ids']}); "
                                "remove one of them")
        rows = [r for r in rows if _VPO_SPLITS[r["split"]] == _VPO_SPLITS[split]]
        self.samples = _limit(self._group([self._parse(r) for r in rows]), limit)
        if not self.samples:
            raise DataError(f"{self.csv}: no rows with split {split!r}; "
                            "check the CSV or --data-root")
        _missing([p for s in self.samples for p in (s["image"], s["mask"])], self.csv,
                 "re-download the VPO release or rebuild with vpo_make.py")
        _missing([src[1] for s in self.samples for src in s["sources"]], self.csv,
                 "pass --audio-root pointing at the VGGSound wav folder")
        _check_wavs(src[1] for s in self.samples for src in s["sources"])
        if split != "train":
            for s in self.samples:
                self._mask(s, _open_image(s["image"], None, size_only=True))

    def _parse(self, r):
        img = _int_field(r["img_Id"], self.csv, "img_Id")
        cate = _int_field(r["cateId"], self.csv, "cateId")
        if cate not in VPO_COCO_IDS:
            raise DataError(f"{self.csv}: cateId {cate} (img_Id {img}) is not a VPO class id; "
                            "fix the CSV")
        try:
            alpha = float(r["audio_pos"])
        except ValueError:
            alpha = math.nan
        if not 0.0 <= alpha <= 1.0:
            raise DataError(f"{self.csv}: audio_pos {r['audio_pos']!r} (img_Id {img}) "
                            "is not in [0, 1]; fix the CSV")
        vgg = r["vgg_file"]
        wav = os.path.join(self.audio_root, vgg if vgg.lower().endswith(".wav") else vgg + ".wav")
        return dict(cate_name=r["cateName"], img=img,
                    ann=_int_field(r["ann_Ids"], self.csv, "ann_Ids"),
                    cls=VPO_COCO_IDS.index(cate) + 1, wav=wav, alpha=alpha)

    def _group(self, rows):
        """Samples with `sources` [(class, wav, audio_pos)] and `anns` (the sounding objects'
        COCO ids)."""
        if self.subset == "ss":
            return [dict(name=f"{r['img']:012d}_{r['ann']:012d}", img=r["img"],
                         image=os.path.join(self.dir, "data", r["cate_name"],
                                            f"{r['img']:012d}.jpg"),
                         mask=os.path.join(self.dir, "mask", r["cate_name"],
                                           f"{r['img']:012d}_{r['ann']:012d}.png"),
                         sources=[(r["cls"], r["wav"], r["alpha"])], anns=[r["ann"]]) for r in rows]
        by_img = {}
        for r in rows:
            s = by_img.setdefault(r["img"], dict(
                name=f"{r['img']:012d}", img=r["img"],
                image=os.path.join(self.dir, "data", f"{r['img']:012d}.jpg"),
                mask=os.path.join(self.dir, "mask", f"{r['img']:012d}.png"), sources=[], anns=[]))
            s["sources"].append((r["cls"], r["wav"], r["alpha"]))
            s["anns"].append(r["ann"])
        return list(by_img.values())

    def load_twins(self, ann_file):
        """Find every sounding object's silent twins (VPO-MSMI: other instances of its class in the
        image, from the COCO instances JSON); test samples then carry `twin` (H, W): the class at
        twin pixels, 0 elsewhere. Returns the number of samples with twins."""
        coco = read_coco(ann_file)
        self.twins = {}
        for i, s in enumerate(self.samples):
            anns = {a["id"]: a for a in coco["anns"].get(s["img"], [])}
            missing = [a for a in s["anns"] if a not in anns]
            if missing:
                raise DataError(f"{ann_file}: no annotation {missing[0]} of img_Id {s['img']} "
                                f"({self.csv}); pass --coco-ann with the COCO instances JSON of "
                                "the test images")
            twins = [(cls, a["segmentation"]) for (cls, _, _), ann in zip(s["sources"], s["anns"])
                     for a in anns.values()
                     if a["category_id"] == anns[ann]["category_id"] and a["id"] != ann
                     and not a.get("iscrowd")]
            if twins:
                self.twins[i] = twins
        return len(self.twins)

    def __len__(self):
        return len(self.samples)

    @staticmethod
    def _mask(s, size):
        """The VPO label map of sample s whose image has `size` (W, H); DataError unless it has
        that size."""
        mask = read_vpo_mask(s["mask"])
        if mask.size != size:
            raise DataError(f"{s['mask']}: mask size {mask.size[::-1]} != image size "
                            f"{size[::-1]} of {s['image']}")
        return mask

    def __getitem__(self, i):
        s = self.samples[i]
        im = _open_image(s["image"], "RGB")
        mask = self._mask(s, im.size)
        extra = {}
        if self.train:
            img, extra["window"], mask, _, pos = augment(im, mask, self.crop, self.pan)
        else:
            img, mask = _rgb(im), _hwc(mask)
            pos = float  # the CSV positions
        wave_, audio_classes = 0.0, torch.zeros(len(VPO_CLASSES))
        source_pos = torch.full((len(VPO_CLASSES),), -1.0)
        for cls, wav, alpha in s["sources"]:
            a = pos(alpha)
            # sources panned one by one, then summed (CAVP Sec. 3, Fig. 3)
            wave_ = wave_ + pan(load_clip(wav, mono=True), a, self.stereo)
            audio_classes[cls], source_pos[cls] = 1.0, a
        audio_pos = torch.tensor(a if len(s["sources"]) == 1 else -1.0)
        out = dict(image=img, mask=mask, wave=wave_, audio_classes=audio_classes,
                   audio_pos=audio_pos, source_pos=source_pos, name=s["name"], **extra)
        if self.twins is not None and not self.train:
            twin = torch.zeros_like(mask)
            for cls, seg in self.twins.get(i, []):
                twin[torch.from_numpy(decode_coco(seg, *mask.shape)).bool() & (mask == 0)] = cls
            out["twin"] = twin
        return out


# ---------------------------------------------------------------- datasets: audio alignment check
EVAL_AUDIO = ("real", "silence", "absent")


def default_coco_ann(test_set, coco_ann=None):
    """--coco-ann, or the built-in VPO's
    DATA_ROOT/sources/coco/annotations/instances_val2017.json."""
    return coco_ann or os.path.join(os.path.dirname(test_set.dir), "sources", "coco", "annotations",
                                    "instances_val2017.json")


def attach_twins(test_set, coco_ann=None):
    """test_set.load_twins from --coco-ann, or from the built-in VPO's annotations; 0 (no twin
    metrics) when no --coco-ann is given and the built-in file does not exist."""
    path = default_coco_ann(test_set, coco_ann)
    if coco_ann is None and not os.path.isfile(path):
        return 0
    return test_set.load_twins(path)


def coco_visible_classes(ann_file):
    """COCO instances JSON -> {img_Id: set of VPO class indices with an object in the image}.

    A COCO person counts as male, female and baby (VPO's person class comes from the captions,
    which may not name it); categories outside VPO are ignored.
    """
    coco = read_coco(ann_file)
    visible = {i: set() for i in coco["images"]}
    for img, anns in coco["anns"].items():
        for a in anns:
            name = coco["names"].get(a["category_id"])
            classes = (("male", "female", "baby") if name == "person"
                       else (name,) if name in VPO_CLASSES else ())
            visible.setdefault(img, set()).update(VPO_CLASSES.index(c) for c in classes)
    return visible


class CounterfactualAudio(torch.utils.data.Dataset):
    """A VPO test set whose audio says that nothing in the image sounds, so every predicted object
    is a false detection (the paper's Fig. 1 / Fig. 14 made a number).

    mode 'silence': all-zero audio. mode 'absent': one test clip of a class with no object in the
    image (`visible`: coco_visible_classes of the test images), panned at a random position; the
    class, clip and position are fixed by (seed, index). The target is background wherever labelled.
    """

    def __init__(self, base, mode, visible=None, seed=0):
        if mode not in EVAL_AUDIO[1:]:
            raise DataError(f"unknown counterfactual audio {mode!r}; use silence or absent")
        self.base, self.mode, self.visible, self.seed = base, mode, visible, seed
        self.clips = {}
        for s in base.samples:
            for cls, wav, _ in s["sources"]:
                self.clips.setdefault(cls, []).append(wav)
        if mode == "absent":
            missing = [s["img"] for s in base.samples if s["img"] not in visible]
            if missing:
                raise DataError(f"img_Id {missing[0]} of {base.csv} has no COCO annotation; "
                                "pass --coco-ann with the COCO instances JSON of the test images")

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        sample = self.base[i]
        wave_ = torch.zeros_like(sample["wave"])
        audio_classes = torch.zeros_like(sample["audio_classes"])
        pos, source_pos = torch.tensor(-1.0), torch.full_like(sample["source_pos"], -1.0)
        if self.mode == "absent":
            rng = np.random.default_rng([self.seed, i])
            img = self.base.samples[i]["img"]
            classes = sorted(c for c in self.clips if c not in self.visible[img])
            if not classes:
                raise DataError(f"img_Id {img}: every class with a test clip is in the image; "
                                "use --eval-audio silence")
            cls = classes[rng.integers(len(classes))]
            w = load_clip(self.clips[cls][rng.integers(len(self.clips[cls]))]).mean(0, keepdim=True)
            a = float(rng.uniform())
            wave_ = pan(w, a, self.base.stereo)
            audio_classes[cls], pos, source_pos[cls] = 1.0, torch.tensor(a), a
        mask = sample["mask"].masked_fill(sample["mask"] != 255, 0)
        return dict(sample, wave=wave_, mask=mask, audio_classes=audio_classes, audio_pos=pos,
                    source_pos=source_pos)


def eval_audio_set(test_set, mode, coco_ann=None, seed=0):
    """The test set for --eval-audio: itself ('real') or wrapped in CounterfactualAudio. coco_ann
    defaults to the built-in VPO's sources/coco/annotations/instances_val2017.json."""
    if mode == "real":
        return test_set
    visible = (coco_visible_classes(default_coco_ann(test_set, coco_ann)) if mode == "absent"
               else None)
    return CounterfactualAudio(test_set, mode, visible, seed)


# ---------------------------------------------------------------- datasets: AVSBench
def avss_palette(num_classes=AVSS_NUM_CLASSES):
    """(71, 3) uint8 colours of the released AVSS label2idx.json order: the bits of class j are
    spread over R, G, B (bit 0 -> R, 1 -> G, 2 -> B), filled from the most significant bit down."""
    pal = np.zeros((num_classes, 3), dtype=np.int64)
    for j in range(num_classes):
        lab, shift = j, 7
        while lab > 0:
            for c in range(3):
                pal[j, c] |= ((lab >> c) & 1) << shift
            lab, shift = lab >> 3, shift - 1
    return pal.astype(np.uint8)


def _check_label2idx(path):
    """The release's label2idx.json ({name: 1-based index}), where present, must list AVSS_CLASSES
    in order: the palette and the class names follow that order."""
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            names = sorted((int(v), k) for k, v in json.load(f).items())
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a label2idx.json ({type(e).__name__}); re-download it from "
                        "the AVSBench-Semantics release") from None
    got = [k for _, k in names] + [None] * (len(AVSS_CLASSES) - len(names))
    expected = AVSS_CLASSES + [None] * (len(names) - len(AVSS_CLASSES))
    diff = next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if diff is not None:
        raise DataError(f"{path}: class {diff + 1} of {len(names)} is {got[diff]!r} where the "
                        f"{len(AVSS_CLASSES)} AVSBench-Semantics classes have {expected[diff]!r}; "
                        "use the released label2idx.json")


_AVSS_CODES = {int(r) << 16 | int(g) << 8 | int(b): j for j, (r, g, b) in enumerate(avss_palette())}


def _top_bits(rgb):
    """uint8 (..., 3) colours -> the top 3 bits of R, G and B as one number in 0..511 (the 71 AVSS
    colours use no other bit)."""
    top = (rgb >> 5).astype(np.intp)
    return top[..., 0] << 6 | top[..., 1] << 3 | top[..., 2]


_AVSS_TOP = np.full(512, -1, dtype=np.int16)  # _top_bits -> class, -1: no AVSS colour
_AVSS_TOP[_top_bits(avss_palette())] = np.arange(AVSS_NUM_CLASSES)


def decode_avss(rgb, path="mask"):
    """Colour mask (H, W, 3) -> class ids (H, W) in 0..70; an unknown colour raises DataError. A
    uint8 mask of palette colours is one table look-up (no sort); any other goes through the
    sorted colours, which name the first unknown one."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8 and not (rgb & 31).any():
        labels = _AVSS_TOP[_top_bits(rgb)]
        if labels.min(initial=0) >= 0:
            return labels.astype(np.uint8)
    rgb = rgb.astype(np.int64)
    codes = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    uniq, inv = np.unique(codes, return_inverse=True)
    lut = np.array([_AVSS_CODES.get(int(c), -1) for c in uniq])
    if (lut < 0).any():
        c = int(uniq[lut < 0][0])
        raise DataError(f"{path}: colour {(c >> 16, c >> 8 & 255, c & 255)} is not in the AVSS "
                        "71-class palette; replace the mask with the released labels_rgb PNG")
    return lut[inv.reshape(codes.shape)].astype(np.uint8)


def binary_mask(im, path="mask"):
    """AVSBench-Objects gt PNG -> uint8 {0,1}: a palette PNG's indices 0 (background) and 1
    (sounding object); a grey or RGB PNG's levels 0 and 255 (each channel), foreground = any channel
    > 0. Any other value raises DataError."""
    if im.mode == "P":
        index = np.asarray(im)
        if index.max() > 1:
            raise DataError(f"{path}: palette index {int(index.max())} is not an AVSBench-Objects "
                            "label (0 background, 1 sounding object); replace the mask with the "
                            "released gt_masks PNG")
        return index.astype(np.uint8)
    arr = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
    levels = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    bad = levels[(levels != 0) & (levels != 255)]
    if bad.size:
        raise DataError(f"{path}: mask value {int(bad[0])} is not an AVSBench-Objects level (0 "
                        "background, 255 sounding object); replace the mask with the released "
                        "gt_masks PNG")
    return ((arr.max(-1) if arr.ndim == 3 else arr) > 0).astype(np.uint8)


_AVS_TASKS = {  # task -> (release folder, CSV, data folder)
    "s4": ("Single-source", "s4_meta_data.csv", "s4_data"),
    "ms3": ("Multi-sources", "ms3_meta_data.csv", "ms3_data"),
    "avss": ("AVSBench-semantic", "metadata.csv", ""),
}
_AVSS_FRAMES = {"v1s": 5, "v1m": 5, "v2": 10}


class AVSBenchDataset(torch.utils.data.Dataset):
    """AVSBench-Objects S4/MS3 and AVSBench-Semantics (AVS Sec. 3) in the layouts of
    OpenNLPLab/AVSBench's release: s4_meta_data.csv, ms3_meta_data.csv and metadata.csv with their
    frame, mask and audio folders.

    root: the folder with the task CSV, or its parent holding Single-source/, Multi-sources/
    or AVSBench-semantic/. Every clip is returned with T = `frames` frames (default 5 for
    s4/ms3, 10 for avss), image (T, 3, H, W) uint8 (normalised in the step: device_batch) and mask
    (T, H, W) uint8: shorter clips (AVSS v1, 5 frames) are padded with mean-colour images
    (MEAN_LEVELS), 255 masks and silent audio, longer ones truncated; `valid` (T,) bool marks real
    frames, so all samples batch with pad_collate. Masks: s4/ms3 binary {0,1}, avss 0..70
    (colour PNG decoded with the release palette); unlabelled frames (S4 train frames 2..5,
    AVSS v1s train frames 1..4) are 255. size: frames resized to size x size (masks nearest),
    None keeps the original size. Audio: 1 s per frame from the clip start at 16 kHz,
    wave (C, T*16000), mono (channels averaged) unless stereo=True (then 2 channels);
    audio_len: the samples of the WAV's own audio in wave (the rest is padding).

    Checked before training, as DataError naming the file: the CSV (columns, split names, a clip
    listed twice), AVSS's label2idx.json against AVSS_CLASSES, every listed file's presence and
    every WAV's header (a WAV shorter than its header says is truncated). The clips are scanned too
    (frame sizes from the headers, masks decoded): S4 / MS3 (224 x 224 files) all, AVSS (original
    resolution) val / test only, which would otherwise be read only after training; its train clips
    are checked on their first read, in the first epoch. Every read checks that a clip's frames
    share one size, that each mask has its frame's size and that mask values are labels
    (binary_mask, decode_avss).
    """

    def __init__(self, root, task, split, size=224, stereo=False, limit=None, frames=None):
        if task not in _AVS_TASKS:
            raise DataError(f"unknown AVSBench task {task!r}; use one of {sorted(_AVS_TASKS)}")
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown AVSBench split {split!r}; use train, val or test")
        folder, csv_name, data = _AVS_TASKS[task]
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"{root} not found: download AVSBench and pass --data-root")
        self.dir = (root if os.path.isfile(os.path.join(root, csv_name))
                    else os.path.join(root, folder))
        self.csv = os.path.join(self.dir, csv_name)
        self.task, self.split, self.size, self.stereo = task, split, size, stereo
        self.frames = frames or (10 if task == "avss" else 5)
        columns = dict(s4=["category", "split"], ms3=["split"], avss=["uid", "label", "split"])
        rows, header = _read_csv(self.csv, columns[task],
                                 f"download AVSBench ({folder}/{csv_name}) and pass --data-root")
        key = "uid" if task == "avss" else header[0]  # the clip's name
        bad = [r for r in rows if r["split"] not in ("train", "val", "test")]
        if bad:
            raise DataError(f"{self.csv}: split {bad[0]['split']!r} of clip {bad[0][key]} is not "
                            "train, val or test; fix the CSV")
        base = os.path.join(self.dir, data)
        clips, seen = [self._clip(base, r, header) for r in rows], {}
        for k, c in enumerate(clips):  # rows naming the same files
            first = seen.setdefault(c["frames"][0], k)
            if first != k:
                raise DataError(f"{self.csv}: clip {c['name']} is listed twice (rows {first + 1} "
                                f"and {k + 1} under the header); remove one of them")
        if task == "avss":
            _check_label2idx(os.path.join(self.dir, "label2idx.json"))
        self.samples = _limit([c for c, r in zip(clips, rows) if r["split"] == split], limit)
        if not self.samples:
            raise DataError(f"{self.csv}: no clips with split {split!r}; "
                            "check the CSV or --data-root")
        _missing([p for s in self.samples
                  for p in s["frames"] + [m for m in s["masks"] if m] + [s["wav"]]],
                 self.csv, "re-download AVSBench or fix --data-root")
        _check_wavs(s["wav"] for s in self.samples)
        if split != "train" or task != "avss":
            for s in self.samples:
                self._labels(s, [_open_image(p, None, size_only=True) for p in s["frames"]])

    def _clip(self, base, r, header):
        """The files of the clip of CSV row r (in r's split)."""
        name, split = r[header[0]], r["split"]
        if self.task == "avss":
            name, label = r["uid"], r["label"]
            if label not in _AVSS_FRAMES:
                raise DataError(f"{self.csv}: label {label!r} of {name} not in v1s/v1m/v2; "
                                "fix the CSV")
            n = min(_AVSS_FRAMES[label], self.frames)
            clip = os.path.join(self.dir, label, name)
            frames = [os.path.join(clip, "frames", f"{i}.jpg") for i in range(n)]
            masks = [os.path.join(clip, "labels_rgb", f"{i}.png") for i in range(n)]
            wav, semi = os.path.join(clip, "audio.wav"), label == "v1s"
        else:  # S4 folders add split/category levels to visual_frames and category to the rest
            s4, n = self.task == "s4", min(5, self.frames)
            cat = (r["category"],) if s4 else ()
            frame_dir = os.path.join(base, "visual_frames", *((split, *cat) if s4 else ()), name)
            frame_name = "{}_{}.png" if s4 else "{}.mp4_{}.png"
            frames = [os.path.join(frame_dir, frame_name.format(name, i)) for i in range(1, n + 1)]
            masks = [os.path.join(base, "gt_masks", split, *cat, name, f"{name}_{i}.png")
                     for i in range(1, n + 1)]
            wav, semi = os.path.join(base, "audio_wav", split, *cat, f"{name}.wav"), s4
        if semi and split == "train":  # semi-supervised: only the first frame is labelled
            masks = masks[:1] + [None] * (n - 1)
        return dict(name=name, frames=frames, masks=masks, wav=wav)

    def __len__(self):
        return len(self.samples)

    def _labels(self, s, sizes):
        """The label maps (None: unlabelled frame) of clip s whose frames have `sizes` (W, H);
        DataError unless the frames share one size and each mask has its frame's."""
        labels = []
        for frame, size, m in zip(s["frames"], sizes, s["masks"]):
            if size != sizes[0]:
                raise DataError(f"{frame}: frame size {size[0]}x{size[1]} differs from the "
                                f"{sizes[0][0]}x{sizes[0][1]} of {s['frames'][0]} in the same "
                                "clip; replace the frame with the released file")
            label = None
            if m:
                im = _open_image(m, None)
                label = (decode_avss(np.asarray(im.convert("RGB")), m) if self.task == "avss"
                         else binary_mask(im, m))
                if im.size != size:
                    raise DataError(f"{m}: mask size {im.size[0]}x{im.size[1]} differs from the "
                                    f"{size[0]}x{size[1]} of its frame {frame}; replace the "
                                    "mask or frame with the released file")
            labels.append(label)
        return labels

    def __getitem__(self, i):
        s, t = self.samples[i], self.frames
        frames = [_open_image(p, "RGB") for p in s["frames"]]
        labels = self._labels(s, [im.size for im in frames])
        if self.size is not None:
            frames = [im.resize((self.size, self.size), Image.BILINEAR) for im in frames]
        w, h = frames[0].size
        n = len(frames)
        image = torch.empty(t, 3, h, w, dtype=torch.uint8)
        image[n:] = MEAN_LEVELS
        mask = torch.full((t, h, w), 255, dtype=torch.uint8)
        for k, (im, label) in enumerate(zip(frames, labels)):
            _rgb(im, image[k])
            if label is not None:
                mask[k] = torch.from_numpy(_resize_mask(label, self.size).copy())
        x, audio_len = load_clip(s["wav"], seconds=n, centre=False, mono=not self.stereo,
                                 with_length=True)
        x = (x[:2] if x.shape[0] >= 2 else x.repeat(2, 1)) if self.stereo else x
        wave_ = torch.zeros(x.shape[0], t * SAMPLE_RATE)
        wave_[:, :x.shape[1]] = x
        valid = torch.arange(t) < n
        return dict(image=image, mask=mask, wave=wave_, valid=valid,
                    audio_len=torch.tensor(audio_len), name=s["name"])


AVS_BINARY = ["background", "sounding object"]
AVSS_PARTS = ("all",) + tuple(_AVSS_FRAMES)


def avs_classes(task, labels="binary"):
    """Class names of an AVSBench task for an image model: AVSS its 71; S4 / MS3 background and
    sounding object, or with labels='category' (S4) background and the 23 S4 categories."""
    if task == "avss":
        return AVSS_CLASSES
    return ["background"] + AVS_S4_CATEGORIES if labels == "category" else AVS_BINARY


class AVSBenchFrames(torch.utils.data.Dataset):
    """AVSBenchDataset as frames, for an image model (cavp.py): one sample per labelled frame (S4
    train: the first frame of each clip; otherwise every frame), with that frame's own second of the
    clip's audio as AVSBenchDataset cuts it (second i from the clip start for frame i),
    repeat-padded to `seconds`.

    The sample dict is VPODataset's: image (3, H, W) uint8, mask (H, W) uint8 (255 ignore), wave (C,
    seconds * 16 kHz), audio_classes (K,), audio_pos (), source_pos (K,), name '<clip>_<frame>'
    (frame numbered as its file). Classes (avs_classes): AVSS its 71; S4 / MS3 binary, or S4 with
    labels='category' the clip's CSV category at the foreground pixels. Audio class sets (CAVP Eq.
    (1)-(3)): S4 the clip's category (binary: {sounding object}) in every frame, one category per
    clip as in the CAVP release's S4 loader; MS3 / AVSS the classes in the frame's mask, as the
    release's MS3 / AVSS loaders (AVSBench labels only sounding objects). AVSBench has no source
    positions: a sounding class sits at 0.5 (centre); audio_pos is 0.5 for one class, else -1. part:
    only the AVSS clips of one release part (v1s, v1m, v2). train=True: `augment` with `crop` (a
    flip swaps stereo channels). size: frames resized to size x size, None keeps the original
    resolution.
    """

    def __init__(self, root, task, split, size=224, stereo=False, train=False, crop=None,
                 labels="binary", part="all", limit=None, seconds=3.0):
        if labels not in ("binary", "category") or (labels == "category" and task != "s4"):
            raise DataError(f"labels {labels!r} for AVSBench {task}: "
                            "use binary (or category for s4)")
        if part not in AVSS_PARTS or (part != "all" and task != "avss"):
            raise DataError(f"part {part!r} for AVSBench {task}: "
                            f"use all (or {', '.join(_AVSS_FRAMES)} for avss)")
        self.clips = AVSBenchDataset(root, task, split, size=size, stereo=stereo)
        self.task, self.train, self.crop, self.seconds = task, train, crop, seconds
        self.classes = avs_classes(task, labels)
        csv_path, meta = self.clips.csv, {}  # S4: each clip's category; AVSS: its release part
        if task != "ms3":
            rows, header = _read_csv(csv_path, [], "")
            key, column = ("uid", "label") if task == "avss" else (header[0], "category")
            meta = {r[key]: r[column] for r in rows}
        self.fg = [1] * len(self.clips)  # the class of each clip's foreground pixels (S4)
        if labels == "category":
            bad = [s["name"] for s in self.clips.samples
                   if meta[s["name"]] not in AVS_S4_CATEGORIES]
            if bad:
                raise DataError(f"{csv_path}: category {meta[bad[0]]!r} of clip {bad[0]} is not "
                                "one of the 23 S4 categories (data.AVS_S4_CATEGORIES); "
                                "fix the CSV or use binary labels")
            self.fg = [1 + AVS_S4_CATEGORIES.index(meta[s["name"]]) for s in self.clips.samples]
        self.index = _limit([(i, j) for i, s in enumerate(self.clips.samples)
                             if part == "all" or meta[s["name"]] == part
                             for j, m in enumerate(s["masks"]) if m], limit)
        if not self.index:
            raise DataError(f"{csv_path}: no labelled frame of part {part} in split {split!r}; "
                            "check the CSV, --data-root or the part")
        # (clip index, AVSBenchDataset sample): the frames of a clip come one after another
        self._clip = None

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        i, j = self.index[k]
        if self._clip is None or self._clip[0] != i:
            self._clip = (i, self.clips[i])
        clip = self._clip[1]
        img, mask = clip["image"][j], clip["mask"][j]
        if self.task == "s4":
            mask = torch.where(mask == 1, self.fg[i], mask)
            classes = [self.fg[i]]
        else:
            present = mask.unique()
            classes = present[(present > 0) & (present != 255)].tolist()
        second = clip["wave"][:, j * SAMPLE_RATE:(j + 1) * SAMPLE_RATE]
        # the frame's second, repeat-padded to `seconds` as any short clip is (fit_length)
        wave_ = fit_length(second, round(self.seconds * SAMPLE_RATE))
        extra = {}
        if self.train:  # no source positions on AVSBench: the centre stays the centre
            img, extra["window"], mask, flip, _ = augment(
                Image.fromarray(img.permute(1, 2, 0).numpy()),
                Image.fromarray(mask.numpy().astype(np.uint8)), self.crop, "csv")
            if flip:
                # stereo: left and right swap with the image (mono: unchanged)
                wave_ = wave_.flip(0)
        audio_classes = torch.zeros(len(self.classes))
        audio_classes[classes] = 1.0
        return dict(image=img, mask=mask.long(), wave=wave_, audio_classes=audio_classes,
                    audio_pos=torch.tensor(0.5 if len(classes) == 1 else -1.0),
                    source_pos=torch.where(audio_classes > 0, 0.5, -1.0),
                    name=f"{clip['name']}_{j + (self.task != 'avss')}", **extra)


# ---------------------------------------------------------------- collate
def worker_init(worker_id=0):
    """DataLoader workers (worker_init_fn): glibc keeps freed memory for reuse (mmap threshold 32
    MB, trim threshold 128 MB) instead of its defaults, which hand a sample's MB-sized buffers
    (decoded image, audio) back to the system and take them again as fresh pages; that cost up to
    2 ms per VPO sample at crop 512 in some worker processes and not in others (page faults).
    Elsewhere than glibc: nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD


def pad_collate(batch, shared=None):
    """Stack sample dicts, padding every tensor to the largest shape in the batch.

    Fill: 255 for `mask`, the mean colour MEAN_LEVELS for `image`, 0 otherwise (AVSBench clips of
    different length get silent audio / invalid frames). Images stored channels last, as training
    sources are (augment), stay so (B, 3, H, W) in the layout of (B, H, W, 3). Strings -> list.
    shared: write the batch
    straight into shared memory, which carries it from a DataLoader worker to the main process
    (default: inside a worker), instead of copying it there afterwards.
    """
    if shared is None:
        shared = torch.utils.data.get_worker_info() is not None
    out = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if not torch.is_tensor(vals[0]):
            out[key] = vals
            continue
        last = key == "image" and vals[0].dim() == 3 and vals[0].stride(0) == 1
        if last:
            vals = [v.permute(1, 2, 0) for v in vals]
        shape = (len(vals), *[max(v.shape[d] for v in vals) for d in range(vals[0].dim())])
        if shared:  # as torch's default_collate does in a worker
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * vals[0].element_size())
            padded = vals[0].new_empty(0).set_(storage, 0, shape)
        else:
            padded = vals[0].new_empty(shape)
        if all(v.shape == shape[1:] for v in vals):
            torch.stack(vals, out=padded)
        else:
            fill = MEAN_LEVELS.view(3) if last else MEAN_LEVELS
            padded[:] = {"mask": 255, "image": fill}.get(key, 0)
            for j, v in enumerate(vals):
                padded[(j, *[slice(0, n) for n in v.shape])] = v
        out[key] = padded.permute(0, 3, 1, 2) if last else padded
    return out


def device_batch(batch, device, keys=("image", "mask", "wave")):
    """The batch's `keys` on `device` as the model takes them, copied without waiting for the
    device (from pinned memory on CUDA): uint8 images normalised there (normalize), training
    images first cut from their sources there (window_images), label maps (mask, twin) as int64,
    the rest as they are."""
    out = []
    for key in keys:
        x = batch[key].to(device, non_blocking=True)
        if key == "image" and "window" in batch:
            x = window_images(x, batch["window"])
        out.append(normalize(x) if key == "image" else x.long() if key in ("mask", "twin") else x)
    return out


# ---------------------------------------------------------------- pictures: overlays and panels
PANEL_MIN = 192  # panels are shown at least this high (nearest-neighbour upscale) so titles fit
PANEL_MAX = 512  # ... and at most this high (downscaled), so the PNGs stay small
PANEL_GAP = 4  # white pixels between panels


def _array(x):
    return np.asarray(x.detach().cpu() if torch.is_tensor(x) else x)


# VPO classes 1..21 (car .. baby): bright saturated colours that show on dark and light images
# alike; the most distinct (blue, red, green) for the people, who appear with every other class
_CLASS_COLORS = [(255, 140, 0), (180, 80, 255), (0, 230, 255), (255, 235, 0), (170, 255, 0),
                 (255, 0, 255), (0, 255, 170), (255, 120, 190), (120, 140, 255), (255, 90, 40),
                 (255, 200, 120), (0, 170, 255), (230, 255, 100), (210, 130, 255), (255, 60, 130),
                 (100, 255, 100), (255, 190, 0), (150, 255, 230), (30, 90, 255), (255, 20, 40),
                 (0, 220, 60)]


def class_colors(n=len(VPO_CLASSES)):
    """(n, 3) uint8 class colours that stand out from photographs: index 0 (background, never drawn)
    black, 1..21 a fixed saturated set, further classes hues a golden angle apart."""
    extra = [colorsys.hsv_to_rgb(j * 0.618034 % 1.0, 1.0, (1.0, 0.7)[j % 2])
             for j in range(max(0, n - 22))]
    cols = [(0, 0, 0)] + _CLASS_COLORS + [tuple(round(255 * v) for v in c) for c in extra]
    return np.array(cols[:n], dtype=np.uint8).reshape(n, 3)


def label_overlay(image, labels, colors, alpha=0.5, width=None):
    """Label map (H, W) over an (H, W, 3) uint8 image: classes > 0 filled with `colors` at `alpha`
    and outlined solid `width` px (default 1, 2 from 384 px up) along their borders, 0 left as the
    image, 255 (ignore) grey with a white hatch."""
    img = np.asarray(image).astype(np.float32)
    lab = _array(labels).astype(np.int64)
    obj = (lab > 0) & (lab != 255)
    col = np.asarray(colors)[np.where(obj, lab, 0)].astype(np.float32)
    out = np.where(obj[..., None], (1 - alpha) * img + alpha * col, img)
    y, x = np.indices(lab.shape)
    out = np.where((lab == 255)[..., None],
                   np.where(((y + x) % 4 == 0)[..., None], 255.0, 0.5 * img + 64), out)
    width = width or (2 if min(lab.shape) >= 384 else 1)
    padded = np.pad(lab, width, mode="edge")
    h, w = lab.shape
    same = np.ones_like(obj)
    for d in range(1, width + 1):  # a pixel within `width` of another label is on a border
        for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d)):
            same &= padded[width + dy:width + dy + h, width + dx:width + dx + w] == lab
    return np.where((obj & ~same)[..., None], col, out).round().astype(np.uint8)


def heatmap_overlay(image, attn, alpha=0.6):
    """Attention map (any h x w) resized bilinearly to the (H, W, 3) uint8 image, min-max normalised
    and blended as blue (low) -> green -> red (high)."""
    a = torch.as_tensor(attn).detach().cpu().float()[None, None]
    a = torch.nn.functional.interpolate(a, size=image.shape[:2], mode="bilinear",
                                        align_corners=False)[0, 0]
    a = ((a - a.min()) / (a.max() - a.min() + 1e-8)).numpy()
    heat = np.stack([a, 1 - np.abs(2 * a - 1), 1 - a], -1) * 255
    return ((1 - alpha) * np.asarray(image) + alpha * heat).round().astype(np.uint8)


def legend_for(labels_list, class_names, colors):
    """[(class name, (r, g, b))] of the classes (> 0, != 255) present in any of the label maps."""
    present = set()
    for lab in labels_list:
        present.update(int(c) for c in np.unique(_array(lab)))
    return [(class_names[c], tuple(int(v) for v in colors[c]))
            for c in sorted(present) if 0 < c < len(class_names)]


def class_shares(labels, class_names):
    """{class name: share of the pixels} of the classes (> 0, != 255) in a label map,
    largest first."""
    lab = _array(labels).ravel()
    # a photo-sized map: no sort (np.unique)
    counts = np.bincount(lab, minlength=len(class_names)).tolist()
    shares = {class_names[c]: counts[c] / lab.size for c in range(1, len(class_names)) if counts[c]}
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text, font, width):
    """`text`, cut with '...' to at most `width` px."""
    if font.getbbox(text)[2] <= width:
        return text
    while text and font.getbbox(text + "...")[2] > width:
        text = text[:-1]
    return text + "..."


def shown_size(h, w, max_height=PANEL_MAX):
    """(height, width) at which save_panels shows a panel of h x w px higher than `max_height`."""
    return min(h, max_height), max(1, round(w * min(1.0, max_height / h)))


def save_panels(panels, titles, legend, path, min_height=PANEL_MIN, max_height=PANEL_MAX):
    """One PNG: (H, W, 3) uint8 panels side by side, each under its title, above a legend strip
    (colour swatch + class name per (name, (r, g, b)), wrapped over several lines). Panels lower
    than `min_height` are upscaled (nearest, integer factor), higher than `max_height`
    downscaled."""
    h, w = panels[0].shape[:2]
    if any(p.shape != panels[0].shape for p in panels) or len(titles) != len(panels):
        raise ValueError("save_panels: panels must share one (H, W, 3) shape, one title each")
    if h < min_height:
        k = -(-min_height // h)
        tiles = [Image.fromarray(np.asarray(p).repeat(k, 0).repeat(k, 1)) for p in panels]
    else:
        size = shown_size(h, w, max_height)[::-1]
        tiles = [Image.fromarray(np.asarray(p)).resize(size, Image.BOX) for p in panels]
    pw, ph = tiles[0].size
    font = _font(max(12, min(20, ph // 13)))
    line = font.getbbox("Ag")[3]
    pad = max(3, line // 3)
    total = len(tiles) * pw + (len(tiles) - 1) * PANEL_GAP
    # legend items: (x, row) of each swatch, wrapped at the picture's width
    items = legend or [("no object classes", None)]
    places, x, row = [], pad, 0
    for name, _ in items:
        iw = line + pad + font.getbbox(name)[2]
        if x > pad and x + iw > total - pad:
            x, row = pad, row + 1
        places.append((x, row))
        x += iw + 2 * pad
    top = line + 2 * pad
    canvas = Image.new("RGB", (total, top + ph + (row + 1) * (line + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, title) in enumerate(zip(tiles, titles)):
        x0 = i * (pw + PANEL_GAP)
        canvas.paste(tile, (x0, top))
        text = _fit(title, font, pw - 2)
        draw.text((x0 + (pw - font.getbbox(text)[2]) // 2, pad), text, fill=(20, 20, 20), font=font)
    for (name, color), (x, r) in zip(items, places):
        y = top + ph + pad + r * (line + pad)
        if color is not None:
            draw.rectangle([x, y, x + line - 1, y + line - 1], fill=color, outline=(20, 20, 20))
        draw.text((x + line + pad if color is not None else x, y), name, fill=(20, 20, 20),
                  font=font)
    canvas.save(path, optimize=True)


# ---------------------------------------------------------------- --predict inputs
def fit_long_side(h, w, max_size):
    """(height, width) of an h x w image scaled, aspect kept, so that its long side is at most
    `max_size` (never enlarged)."""
    scale = min(1.0, max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def read_rgb(path, max_size):
    """--predict image: any RGB-convertible picture, EXIF orientation applied (phone photos) ->
    (uint8 (3, h, w) for the model (normalize), long side at most `max_size` (antialiased bilinear),
    (h', w', 3) uint8 at the size save_panels shows it (at most PANEL_MAX high), (H, W) of the
    image). A JPEG is decoded at the smallest DCT scale (1/1 .. 1/8, PIL draft) that still covers
    both outputs, so a phone photo is never held at full size."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: image not found; check the path given to --predict")
    try:
        with Image.open(path) as im:
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: a quarter turn
            h, w = im.size if turned else im.size[::-1]
            model, shown = fit_long_side(h, w, max_size), shown_size(h, w)
            need = (max(model[0], shown[0]), max(model[1], shown[1]))
            im.draft("RGB", need if turned else need[::-1])  # PIL size: (width, height) as stored
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e}); re-download or replace the file") from e
    x = np.asarray(im.resize(model[::-1], Image.BILINEAR) if im.size != model[::-1] else im)
    img = torch.from_numpy(x.copy()).permute(2, 0, 1).contiguous()
    return img, np.array(im.resize(shown[::-1], Image.BOX) if im.size != shown[::-1]
                         else im), (h, w)


def upsample_labels(logits, size, points=1 << 19):
    """Model logits (K, h, w) -> label map (H, W) uint8 at `size`: the logits resized bilinearly as
    F.interpolate(align_corners=False) does (as DeepLabV3+ brings its logits to the input size),
    then argmax, or logit > 0 (sigmoid > 0.5) for K = 1. Where the four model pixels around an
    output pixel share one label, every bilinear mix of their logits keeps it (a convex combination
    of score vectors with one argmax), so only the output pixels between differing labels are
    interpolated, `points` at a time: a photo-sized map costs a few bytes per pixel, not K
    floats."""
    logits = logits.float()
    k, h, w = logits.shape
    low = (logits[0] > 0 if k == 1 else logits.argmax(0)).byte()
    if (h, w) == tuple(size):
        return low

    def source(n_out, n_in):  # F.interpolate's source coordinate and its two neighbours
        s = ((torch.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
        i0 = s.long().clamp_max(n_in - 1)
        return s, i0, (i0 + 1).clamp_max(n_in - 1)
    sy, y0, y1 = source(size[0], h)
    sx, x0, x1 = source(size[1], w)
    top, bottom = low[y0], low[y1]
    labels = top[:, x0]
    mixed = (labels != top[:, x1]) | (labels != bottom[:, x0]) | (labels != bottom[:, x1])
    flat, where = labels.view(-1), mixed.view(-1).nonzero()[:, 0]
    for i in range(0, len(where), points):
        y, x = where[i:i + points] // size[1], where[i:i + points] % size[1]
        # grid_sample's (x, y) in [-1, 1]
        grid = torch.stack([(2 * sx[x] + 1) / w - 1, (2 * sy[y] + 1) / h - 1], -1)
        v = torch.nn.functional.grid_sample(logits[None], grid[None, None], mode="bilinear",
                                            padding_mode="border", align_corners=False)[0, :, 0]
        flat[where[i:i + points]] = (v[0] > 0 if k == 1 else v.argmax(0)).byte()
    return labels


def shown_labels(labels, size):
    """Label map (H, W) -> (h, w) for display, nearest neighbour (every shown label is one
    predicted)."""
    return np.asarray(Image.fromarray(_array(labels)).resize(size[::-1], Image.NEAREST))


def load_predict_audio(path, stereo, audio_pos=None, seconds=3.0, centre=True):
    """--predict audio: any WAV (PCM / float, any rate, any channel count) resampled to SAMPLE_RATE,
    `seconds` crop (centred as VPODataset, or from the start as AVSBenchDataset with centre=False) /
    repeat-pad -> ((C, N) as the datasets' `wave`, a note or None). C = 2 for a stereo model: a
    stereo clip as is; a mono clip, or any clip when `audio_pos` is given, downmixed (mean of the
    channels) and panned at audio_pos, 0 = left .. 1 = right; a clip of more channels gives its
    first two as left and right (the WAV channel order: front left, front right, centre, ...; the
    rest are dropped). C = 1 (the mean of all channels) for a mono model. The note says which rule a
    clip of more than 2 channels met."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: audio file not found; check the path given to --audio")
    if audio_pos is not None and not 0.0 <= audio_pos <= 1.0:
        raise DataError(f"--audio-pos {audio_pos} for {path} is not in [0, 1] "
                        "(0 = left, 1 = right)")
    try:
        x = load_clip(path, seconds=seconds, centre=centre)
    except DataError as e:
        raise DataError(f"{e} (e.g. ffmpeg -i {os.path.basename(path)} -c:a pcm_s16le "
                        f"-ar {SAMPLE_RATE} out.wav)") from None
    c = x.shape[0]
    if stereo and audio_pos is None and c == 1:
        raise DataError(f"{path} is mono; a stereo model needs --audio-pos A "
                        "(0 = left, 1 = right) to pan it")
    if not stereo:
        wave_, rule = x.mean(0, keepdim=True), f"the mean of its {c} channels"
    elif audio_pos is not None:
        wave_, rule = (pan(x.mean(0, keepdim=True), audio_pos),
                       f"the mean of its {c} channels, panned at {audio_pos}")
    else:
        wave_, rule = x[:2], (f"channels 1 and 2 as left and right (WAV channel order), "
                              f"channels 3-{c} dropped; to keep them, downmix first "
                              f"(e.g. ffmpeg -i {os.path.basename(path)} -ac 2 stereo.wav)")
    note = (f"{path} has {c} channels; the {'stereo' if stereo else 'mono'} model gets {rule}"
            if c > 2 else None)
    return wave_, note
