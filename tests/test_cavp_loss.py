"""The CAVP contrastive loss (paper Eq. 2-4) against a slow reference written from the equations.

The reference below loops over anchors and candidate pixels with Python sets and math.exp/math.log
in double precision. It is written from the paper (Sec. 4.2, Eq. 2-4) and the project's semantics
(README, departures table), not from the vectorised code in cavp.py:

- Eq. (2): E_fg = pixels with a non-background label that is in the audio class set t;
  E_unknown = background pixels of a mismatched re-pair; E_bg = every other non-ignore pixel.
- Eq. (3): a foreground anchor's positives are the other E_fg pixels with the same audio set and the
  same label; its negatives are every other pixel of E_fg u E_bg (N_hard u N_easy). A background
  anchor's positives are the other E_bg pixels, its negatives E_fg. E_unknown is never used.
- Eq. (4): mean over positives of -log(e^{s_p} / (e^{s_p} + sum_n e^{s_n})), s = z_a.z / tau on
  L2-normalised z; anchors without positives are dropped; the loss is the mean over anchors.
- supcon: label = y on matched pairs, 0 on mismatched ones (255 kept as ignore); positives = same
  label, negatives = other label.

The readings of Eq. (1)-(3) behind cavp.py flags are written into the same loops: `unknown` 'literal' puts every
background pixel in E_unknown (Eq. 2 as printed: t != y and y = bg), 'none' none of them; `off` (the
classes that --match side finds on the wrong side) makes their object pixels unknown; `positives`
'label' makes a foreground anchor's positives every other E_fg pixel of its label, whatever the audio.
"""
import math
import random
from collections import Counter

import pytest
import torch

import cavp

K = 5          # classes 0..4, 0 = background
IGNORE = 255
BIG_CAP = 10 ** 6


# ----------------------------------------------------------------------------- reference


def _pixels(z, y, t, match, wrong_side=None):
    """One dict per feature pixel: normalised feature (floats), audio set, label, match flag and the
    classes that the audio places on the wrong side."""
    n_pairs, d, h, w = z.shape
    big_h, big_w = y.shape[1:]
    zz = z.double().tolist()
    yy = y.tolist()
    tt = t.tolist()
    ws = wrong_side.tolist() if wrong_side is not None else [[False] * len(tt[0])] * n_pairs
    out = []
    for n in range(n_pairs):
        audio = frozenset(c for c in range(len(tt[n])) if tt[n][c] != 0)
        off = frozenset(c for c in range(len(ws[n])) if ws[n][c])
        for i in range(h):
            for j in range(w):
                # nearest downsampling: feature pixel (i, j) reads label pixel (floor(i*H/h), floor(j*W/w))
                label = yy[n][i * big_h // h][j * big_w // w]
                vec = [zz[n][c][i][j] for c in range(d)]
                norm = math.sqrt(sum(v * v for v in vec))
                out.append(dict(z=[v / norm for v in vec], t=audio, y=label, match=bool(match[n]), off=off))
    return out


def _anchor_loss(px, a, pos, neg, tau):
    def s(j):
        return sum(u * v for u, v in zip(px[a]["z"], px[j]["z"])) / tau
    neg_sum = sum(math.exp(s(j)) for j in neg)
    total = 0.0
    for p in pos:
        e = math.exp(s(p))
        total += -math.log(e / (e + neg_sum))
    return total / len(pos)


def reference_sets(px, unknown="mismatched"):
    """Eq. (2): index sets E_fg, E_unknown, E_bg over the pixel list."""
    fg, unk, bg = set(), set(), set()
    for i, p in enumerate(px):
        if p["y"] == IGNORE:
            continue
        if p["y"] != 0 and p["y"] in p["off"]:
            unk.add(i)
        elif p["y"] != 0 and p["y"] in p["t"]:
            fg.add(i)
        elif p["y"] == 0 and (unknown == "literal" or (unknown == "mismatched" and not p["match"])):
            unk.add(i)
        else:
            bg.add(i)
    return fg, unk, bg


def reference_loss(z, y, t, match, mode, tau, positives="set", unknown="mismatched", wrong_side=None):
    px = _pixels(z, y, t, match, wrong_side)
    losses = []
    if mode == "cavp":
        fg, _, bg = reference_sets(px, unknown)
        anchors = fg | bg
        for a in sorted(anchors):
            if a in fg:
                pos = {j for j in fg if j != a and px[j]["y"] == px[a]["y"]
                       and (positives == "label" or px[j]["t"] == px[a]["t"])}
                neg = {j for j in anchors if j != a and j not in pos}
            else:
                pos = bg - {a}
                neg = set(fg)
            if pos:
                losses.append(_anchor_loss(px, a, pos, neg, tau))
    elif mode == "supcon":
        label = {i: (p["y"] if p["match"] else 0) for i, p in enumerate(px) if p["y"] != IGNORE}
        for a in sorted(label):
            pos = {j for j in label if j != a and label[j] == label[a]}
            neg = {j for j in label if label[j] != label[a]}
            if pos:
                losses.append(_anchor_loss(px, a, pos, neg, tau))
    else:
        raise ValueError(mode)
    return sum(losses) / len(losses) if losses else 0.0


# ----------------------------------------------------------------------------- random inputs


def multi_hot(classes):
    v = [0] * K
    for c in classes:
        v[c] = 1
    return v


def random_case(seed, d=8):
    """N = 2B pairs (B images, B re-pairs) with multi-source sets, mismatches, ignore pixels and
    object pixels whose class is not in the audio set. Redrawn until all those cases occur."""
    rng = random.Random(seed)
    pool = [(1,), (2,), (3,), (4,), (1, 2), (2, 3), (1, 4)]
    for _ in range(1000):
        b = rng.choice([2, 3])
        h = w = rng.choice([4, 5])
        sets = [frozenset(rng.choice(pool)) for _ in range(b)]
        if rng.random() < 0.5:
            sets[-1] = sets[0]  # two images with the same set: a re-pair between them is a match
        labels = []
        for s in sets:
            extra = [c for c in range(1, K) if c not in s]
            img = []
            for _ in range(h):
                row = []
                for _ in range(w):
                    r = rng.random()
                    row.append(0 if r < 0.35 else rng.choice(sorted(s)) if r < 0.75 else
                               rng.choice(extra) if r < 0.88 else IGNORE)
                img.append(row)
            labels.append(img)
        perm = list(range(b))
        rng.shuffle(perm)
        t_sets = sets + [sets[perm[i]] for i in range(b)]
        match = [True] * b + [sets[perm[i]] == sets[i] for i in range(b)]
        y = torch.tensor(labels + labels, dtype=torch.long)
        t = torch.tensor([multi_hot(s) for s in t_sets], dtype=torch.long)
        m = torch.tensor(match)
        px = _pixels(torch.ones(2 * b, 1, h, w), y, t, m)
        fg, unknown, bg = reference_sets(px)
        ok = (unknown and any(len(s) == 2 for s in t_sets) and any(p["y"] == IGNORE for p in px)
              and any(p["y"] not in (0, IGNORE) and p["y"] not in p["t"] for p in px)
              and len(fg) > 2 and len(bg) > 2)
        if ok:
            g = torch.Generator().manual_seed(seed)
            z = torch.randn(2 * b, d, h, w, generator=g)
            return z, y, t, m
    raise AssertionError("could not draw a case")


def loss(z, y, t, m, mode, tau, cap=BIG_CAP, **reading):
    return float(cavp.contrastive_loss(z, y, t, m, mode, tau, cap, **reading))


def random_wrong_side(t, m, seed):
    """wrong_side for the re-pairs (second half): a random subset of the classes the audio shares with
    the image's own audio (first half), as --match side would mark them; re-pairs with one lose their match."""
    g = torch.Generator().manual_seed(seed)
    b = t.shape[0] // 2
    shared = torch.zeros_like(t, dtype=torch.bool)
    shared[b:] = (t[b:] > 0) & (t[:b] > 0)
    ws = shared & (torch.rand(t.shape, generator=g) < 0.5)
    ws = ws if ws.any() else shared
    return ws, m & ~ws.any(1)


# ----------------------------------------------------------------------------- (1), (2) vs reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_cavp_matches_reference(seed, tau):
    z, y, t, m = random_case(seed)
    torch.manual_seed(seed)
    got = loss(z, y, t, m, "cavp", tau)
    want = reference_loss(z, y, t, m, "cavp", tau)
    assert want > 0
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_matches_reference(seed, tau):
    z, y, t, m = random_case(seed)
    torch.manual_seed(seed)
    got = loss(z, y, t, m, "supcon", tau)
    want = reference_loss(z, y, t, m, "supcon", tau)
    assert want > 0
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


READINGS = [dict(positives="label"), dict(unknown="literal"), dict(unknown="none"), dict(bg_groups="one"),
            dict(positives="label", unknown="literal", bg_groups="one")]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reading", READINGS, ids=lambda r: "-".join(r.values()))
def test_readings_match_reference(seed, reading):
    """Every reading of Eq. (2)-(3) against the loop reference (bg_groups only changes the sampling)."""
    z, y, t, m = random_case(seed)
    torch.manual_seed(seed)
    got = loss(z, y, t, m, "cavp", 0.1, **reading)
    ref = {k: v for k, v in reading.items() if k != "bg_groups"}
    want = reference_loss(z, y, t, m, "cavp", 0.1, **ref)
    assert want > 0
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("reading", [r for r in READINGS if "bg_groups" not in r], ids=lambda r: "-".join(r.values()))
def test_the_inputs_tell_the_readings_apart(reading):
    """Guard against degenerate inputs: each reading changes the reference loss on some random case."""
    cases = [random_case(seed) for seed in range(4)]
    assert any(abs(reference_loss(*c, "cavp", 0.1, **reading) - reference_loss(*c, "cavp", 0.1)) > 1e-4
               for c in cases)


@pytest.mark.parametrize("seed", range(4))
def test_wrong_side_matches_reference(seed):
    """--match side: the object pixels of a class on the wrong side are E_unknown, and the re-pair is mismatched."""
    z, y, t, m = random_case(seed)
    ws, m2 = random_wrong_side(t, m, seed)
    assert ws.any()
    for reading in (dict(), dict(positives="label", unknown="literal")):
        torch.manual_seed(seed)
        got = loss(z, y, t, m2, "cavp", 0.1, wrong_side=ws, **reading)
        want = reference_loss(z, y, t, m2, "cavp", 0.1, wrong_side=ws, **reading)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert abs(want - reference_loss(z, y, t, m2, "cavp", 0.1, positives="label", unknown="literal")) > 1e-4


def _partition(keys):
    groups = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, set()).add(i)
    return sorted(map(sorted, groups.values()))


@pytest.mark.parametrize("bg_groups", ["label", "one"])
def test_sampling_groups_match_reference(monkeypatch, bg_groups):
    """The anchor groups that the cap applies to: foreground per (audio set, label); background per label
    or all in one group; E_unknown and ignore pixels in a group of their own that is then dropped."""
    seen = []
    real = cavp.sample_groups
    monkeypatch.setattr(cavp, "sample_groups", lambda keys, cap, gen: seen.append(keys.clone()) or real(keys, cap, gen))
    for seed in range(3):
        z, y, t, m = random_case(seed)
        seen.clear()
        loss(z, y, t, m, "cavp", 0.1, bg_groups=bg_groups)
        px = _pixels(z, y, t, m)
        fg, unknown, bg = reference_sets(px)
        want = [("fg", px[i]["t"], px[i]["y"]) if i in fg else
                ("bg", px[i]["y"] if bg_groups == "label" else None) if i in bg else "unused"
                for i in range(len(px))]
        assert _partition(seen[0].tolist()) == _partition(want)


def test_cap_equal_to_pixel_count_uses_every_pixel():
    z, y, t, m = random_case(11)
    cap = y.numel()  # no group can be larger than this
    for s in range(3):
        torch.manual_seed(s)
        assert loss(z, y, t, m, "cavp", 0.1, cap) == pytest.approx(
            reference_loss(z, y, t, m, "cavp", 0.1), rel=1e-5, abs=1e-5)


def test_the_inputs_tell_the_modes_apart():
    """Guard against degenerate inputs: on the random cases, cavp and supcon differ, and so do
    cavp and the variant that treats unknown pixels as background."""
    for seed in range(3):
        z, y, t, m = random_case(seed)
        cavp_ref = reference_loss(z, y, t, m, "cavp", 0.1)
        assert abs(cavp_ref - reference_loss(z, y, t, m, "supcon", 0.1)) > 1e-3
        assert abs(cavp_ref - reference_loss(z, y, t, torch.ones_like(m), "cavp", 0.1)) > 1e-3


def test_labels_nearest_downsampled():
    """y at twice the feature size: feature pixel (i, j) takes label (2i, 2j) (F.interpolate nearest)."""
    z, y, t, m = random_case(3)
    n, h, w = y.shape
    big = torch.randint(0, K, (n, 2 * h, 2 * w), generator=torch.Generator().manual_seed(0))
    big[:, ::2, ::2] = y
    want = reference_loss(z, big, t, m, "cavp", 0.1)
    assert want == pytest.approx(reference_loss(z, y, t, m, "cavp", 0.1), abs=1e-12)
    assert loss(z, big, t, m, "cavp", 0.1) == pytest.approx(want, rel=1e-5, abs=1e-5)
    # other phases of the 2x2 cells hold different labels, so a different sampling would be caught
    assert abs(reference_loss(z, big[:, 1::2, 1::2].contiguous(), t, m, "cavp", 0.1) - want) > 1e-3
    assert loss(z, big, t, m, "supcon", 0.1) == pytest.approx(
        reference_loss(z, y, t, m, "supcon", 0.1), rel=1e-5, abs=1e-5)


def test_no_positive_anywhere_gives_zero():
    # one fg pixel (class 1 heard), one bg pixel, one unknown pixel: no anchor has a positive
    y = torch.tensor([[[1, 0]], [[0, 255]]])
    t = torch.tensor([multi_hot([1]), multi_hot([2])])
    m = torch.tensor([True, False])
    z = torch.randn(2, 4, 1, 2)
    assert reference_loss(z, y, t, m, "cavp", 0.1) == 0.0
    assert loss(z, y, t, m, "cavp", 0.1) == 0.0


# ----------------------------------------------------------------------------- (3) anchor sets


def test_anchor_sets_hand_made():
    # pair 0: true pair, audio {1}: labels bg, 1 (heard), 2 (silent object), ignore, 1
    # pair 1: mismatched re-pair, audio {2, 3}: bg (unknown), 1 (silent), 2, 3 (both heard), ignore
    # pair 2: matched re-pair, audio {2, 3}: bg (true background), 3, 4 (silent), 2, ignore
    y = torch.tensor([[0, 1, 2, 255, 1],
                      [0, 1, 2, 3, 255],
                      [0, 3, 4, 2, 255]])
    t = torch.tensor([multi_hot([1]), multi_hot([2, 3]), multi_hot([2, 3])])
    match = torch.tensor([True, False, True])
    fg, unknown, bg = cavp.anchor_sets(y, t, match)
    T, F_ = True, False
    assert fg.tolist() == [[F_, T, F_, F_, T], [F_, F_, T, T, F_], [F_, T, F_, T, F_]]
    assert unknown.tolist() == [[F_, F_, F_, F_, F_], [T, F_, F_, F_, F_], [F_, F_, F_, F_, F_]]
    assert bg.tolist() == [[T, F_, T, F_, F_], [F_, T, F_, F_, F_], [T, F_, T, F_, F_]]
    # the reference agrees with the hand-made masks
    px = _pixels(torch.ones(3, 1, 1, 5), y[:, None], t, match)
    rfg, runk, rbg = reference_sets(px)
    flat = lambda mask: {i for i, v in enumerate(mask.flatten().tolist()) if v}
    assert (flat(fg), flat(unknown), flat(bg)) == (rfg, runk, rbg)


# ----------------------------------------------------------------------------- (4) unknown pixels unused


def test_unknown_pixels_do_not_influence_cavp_loss():
    for seed in range(3):
        z, y, t, m = random_case(seed)
        n, d, h, w = z.shape
        px = _pixels(z, y, t, m)
        fg, unknown, bg = reference_sets(px)
        base = loss(z, y, t, m, "cavp", 0.1)
        g = torch.Generator().manual_seed(100 + seed)
        z2 = z.clone().view(n, d, h * w)
        for i in unknown:
            z2[i // (h * w), :, i % (h * w)] = torch.randn(d, generator=g)
        z2 = z2.view(n, d, h, w)
        assert loss(z2, y, t, m, "cavp", 0.1) == pytest.approx(base, rel=1e-6, abs=1e-6)
        # a background pixel does count
        i = sorted(bg)[0]
        z3 = z.clone().view(n, d, h * w)
        z3[i // (h * w), :, i % (h * w)] = -z3[i // (h * w), :, i % (h * w)] + 0.5
        z3 = z3.view(n, d, h, w)
        changed = loss(z3, y, t, m, "cavp", 0.1)
        assert abs(changed - base) > 1e-4
        assert changed == pytest.approx(reference_loss(z3, y, t, m, "cavp", 0.1), rel=1e-5, abs=1e-5)


def test_unknown_pixels_get_no_gradient():
    z, y, t, m = random_case(4)
    n, d, h, w = z.shape
    z = z.clone().requires_grad_(True)
    cavp.contrastive_loss(z, y, t, m, "cavp", 0.1, BIG_CAP).backward()
    fg, unknown, bg = reference_sets(_pixels(z.detach(), y, t, m))
    grad = z.grad.view(n, d, h * w)
    norms = [float(grad[i // (h * w), :, i % (h * w)].norm()) for i in range(n * h * w)]
    assert all(norms[i] == 0 for i in unknown)
    assert all(norms[i] > 0 for i in fg | bg)


# ----------------------------------------------------------------------------- (5) sample_groups


def test_sample_groups_cap():
    sizes = {-9223372036854775808: 4, -3: 3, 0: 1, 5: 2, 7: 5, 12: 6}
    keys = [k for k, s in sizes.items() for _ in range(s)]
    random.Random(0).shuffle(keys)
    keys = torch.tensor(keys)
    seen = {k: set() for k in sizes}
    for s in range(60):
        torch.manual_seed(s)
        idx = cavp.sample_groups(keys, 2).tolist()
        assert len(idx) == len(set(idx))
        assert all(0 <= i < len(keys) for i in idx)
        per = Counter(int(keys[i]) for i in idx)
        assert per == {k: min(2, s) for k, s in sizes.items()}
        for i in idx:
            seen[int(keys[i])].add(i)
    # every member of every group is drawn sometimes (sampling is not a fixed prefix)
    assert all(len(seen[k]) == s for k, s in sizes.items())
    # a cap of at least the group size keeps every index
    torch.manual_seed(0)
    assert sorted(cavp.sample_groups(keys, 6).tolist()) == list(range(len(keys)))
    torch.manual_seed(0)
    assert Counter(int(keys[i]) for i in cavp.sample_groups(keys, 1).tolist()) == {k: 1 for k in sizes}


# ----------------------------------------------------------------------------- (6) re_pair / WaveBank

# six images: four single-source (two share class 1), two multi-source {1, 2} with the sources on
# opposite sides
IMAGE_SETS = [(1,), (1,), (2,), (3,), (1, 2), (1, 2)]
POS = [0.2, 0.7, 0.4, 0.9, -1.0, -1.0]
SOURCE_POS = [{1: 0.2}, {1: 0.7}, {2: 0.4}, {3: 0.9}, {1: 0.3, 2: 0.8}, {1: 0.6, 2: 0.1}]
L = 8


def make_batch(channels=2):
    g = torch.Generator().manual_seed(7)
    src = torch.full((len(IMAGE_SETS), K), -1.0)
    for i, d in enumerate(SOURCE_POS):
        for c, a in d.items():
            src[i, c] = a
    return dict(wave=torch.randn(len(IMAGE_SETS), channels, L, generator=g),
                audio_classes=torch.tensor([multi_hot(s) for s in IMAGE_SETS], dtype=torch.float),
                audio_pos=torch.tensor(POS), source_pos=src)


def labels_of(batch):
    return cavp.Labels(batch["audio_classes"], batch["audio_pos"], batch["source_pos"], None)


def audio_set(row):
    return frozenset(i for i, v in enumerate(row.tolist()) if v != 0)


def source_of(wave2_i, wave):
    hits = [j for j in range(wave.shape[0]) if torch.equal(wave2_i, wave[j])]
    assert len(hits) <= 1
    return hits[0] if hits else None


def repaired_waves(batch, bank, perm, choice):
    """The B re-paired waveforms that cavp.re_pair describes (as cavp.Criterion builds them): the batch
    permuted, bank clips where `choice` has a bank row."""
    clips = bank.clips(choice, batch["source_pos"], batch["wave"].shape[1] == 2)
    return torch.where((choice >= 0).any(1)[:, None, None], clips, batch["wave"][perm])


def filled_bank(channels=2):
    """A bank holding 3 clips each of classes 1, 2, 3, pushed as stereo single-source samples."""
    bank = cavp.WaveBank(K, 3, L, "cpu")
    g = torch.Generator().manual_seed(123)
    mono = {c: [torch.randn(L, generator=g) + 10 * c for _ in range(3)] for c in (1, 2, 3)}
    for c in (1, 2, 3):
        for clip in mono[c]:
            a = 0.3
            wave = torch.stack([(1 - a) * clip, a * clip])[None] if channels == 2 else clip[None, None]
            bank.push(wave, torch.tensor([multi_hot([c])], dtype=torch.float), torch.tensor([a]))
    return bank, mono


def test_wavebank_push_keeps_single_source_mono():
    batch = make_batch()
    bank = cavp.WaveBank(K, 4, L, "cpu")
    bank.push(batch["wave"], batch["audio_classes"], batch["audio_pos"])
    assert bank.count.tolist() == [0, 2, 1, 1, 0]  # the multi-source images (pos -1) are not stored
    torch.testing.assert_close(bank.waves[1 * 4 + 0], batch["wave"][0].sum(0))
    torch.testing.assert_close(bank.waves[1 * 4 + 1], batch["wave"][1].sum(0))
    torch.testing.assert_close(bank.waves[2 * 4 + 0], batch["wave"][2].sum(0))
    torch.testing.assert_close(bank.waves[3 * 4 + 0], batch["wave"][3].sum(0))
    assert bank.draw(4) is None
    bank, mono = filled_bank()
    for c in (1, 2, 3):  # L + R of a clip panned at a gives the mono clip back
        for s in range(3):
            torch.testing.assert_close(bank.waves[c * 3 + s], mono[c][s])


@pytest.mark.parametrize("use_bank,pos_share", [(False, 1.0), (True, 0.0)])
def test_re_pair_match_rule_without_replacement(use_bank, pos_share):
    batch = make_batch()
    bank, _ = filled_bank()
    n_mismatch = n_match_other = 0
    for seed in range(30):
        torch.manual_seed(seed)
        perm, choice, t2, match, wrong_side = cavp.re_pair(labels_of(batch), bank, pos_share,
                                                           use_bank=use_bank)
        assert not wrong_side.any()
        wave2 = repaired_waves(batch, bank, perm, choice)
        srcs = [source_of(wave2[i], batch["wave"]) for i in range(len(POS))]
        assert None not in srcs, "a waveform was replaced"
        assert sorted(srcs) == list(range(len(POS)))  # a permutation of the batch's audio
        assert all(j != i for i, j in enumerate(srcs))  # a derangement: no image keeps its own audio
        for i, j in enumerate(srcs):
            torch.testing.assert_close(t2[i], batch["audio_classes"][j])
            same = audio_set(batch["audio_classes"][j]) == audio_set(batch["audio_classes"][i])
            assert bool(match[i]) == same
            n_mismatch += not same
            n_match_other += same and j != i
    assert n_mismatch > 0 and n_match_other > 0


@pytest.mark.parametrize("channels", [2, 1])
def test_re_pair_bank_replacement(channels):
    batch = make_batch(channels)
    bank, mono = filled_bank(channels)
    replaced = 0
    for seed in range(30):
        torch.manual_seed(seed)
        perm, choice, t2, match, _ = cavp.re_pair(labels_of(batch), bank, 1.0, use_bank=True)
        wave2 = repaired_waves(batch, bank, perm, choice)
        for i, a in enumerate(POS):
            own = batch["audio_classes"][i]
            j = source_of(wave2[i], batch["wave"])
            if j is not None:  # kept: an original match, or a multi-source image
                orig_match = audio_set(batch["audio_classes"][j]) == audio_set(own)
                assert orig_match or a < 0
                assert bool(match[i]) == orig_match
                torch.testing.assert_close(t2[i], batch["audio_classes"][j])
                continue
            # replaced: only single-source images, now a match with the image's own class set
            assert a >= 0
            replaced += 1
            assert bool(match[i])
            assert audio_set(t2[i]) == audio_set(own)
            c = IMAGE_SETS[i][0]
            if channels == 2:
                want = [torch.stack([(1 - a) * w, a * w]) for w in mono[c]]
            else:
                want = [w[None] for w in mono[c]]
            assert any(torch.allclose(wave2[i], x, atol=1e-5) for x in want), (i, wave2[i])
        # every single-source image ends up matched
        assert all(bool(match[i]) for i, a in enumerate(POS) if a >= 0)
    assert replaced > 0


def test_re_pair_side_matching():
    """--match side: a shared class is on the wrong side when the audio's source and the image's object lie
    on different halves; the re-pair then is no match, even with equal class sets."""
    batch = make_batch()
    bank, _ = filled_bank()
    seen_wrong = seen_equal_sets_mismatch = 0
    for seed in range(30):
        torch.manual_seed(seed)
        perm, choice, t2, match, wrong_side = cavp.re_pair(labels_of(batch), bank, 0.0, use_bank=False,
                                                           match_side=True)
        for i, j in enumerate(perm.tolist()):
            for c in range(K):
                shared = c in SOURCE_POS[i] and c in SOURCE_POS[j]
                want = shared and (SOURCE_POS[i][c] >= 0.5) != (SOURCE_POS[j][c] >= 0.5)
                assert bool(wrong_side[i, c]) == want
                seen_wrong += want
            same_sets = set(IMAGE_SETS[i]) == set(IMAGE_SETS[j])
            assert bool(match[i]) == (same_sets and not wrong_side[i].any())
            seen_equal_sets_mismatch += same_sets and not match[i]
    assert seen_wrong and seen_equal_sets_mismatch


@pytest.mark.parametrize("match_side", [False, True])
def test_re_pair_bank_for_multi_source(match_side):
    """--bank-sources all: a mismatched multi-source re-pair gets one bank clip per class of the image,
    each panned at that source's position, summed; it then matches and has no wrong side."""
    batch = make_batch()
    bank, mono = filled_bank()
    multi = 0
    for seed in range(20):
        torch.manual_seed(seed)
        perm, choice, t2, match, wrong_side = cavp.re_pair(labels_of(batch), bank, 1.0, True, None, "all",
                                                           match_side)
        idx = torch.nonzero((choice >= 0).any(1)).flatten()
        wave2 = repaired_waves(batch, bank, perm, choice)
        assert all(bool(match[i]) for i in range(len(POS)))  # every class of every image is in the bank
        assert not wrong_side[idx].any()
        for i in idx.tolist():
            assert audio_set(t2[i]) == set(IMAGE_SETS[i])
            if len(IMAGE_SETS[i]) == 2:
                multi += 1
                (c1, a1), (c2, a2) = SOURCE_POS[i].items()
                want = [torch.stack([(1 - a1) * w1 + (1 - a2) * w2, a1 * w1 + a2 * w2])
                        for w1 in mono[c1] for w2 in mono[c2]]
                assert any(torch.allclose(wave2[i], x, atol=1e-5) for x in want)
    assert multi > 0


def test_derangement_is_uniform_without_fixed_points():
    """Eq. (1) re-pairs: every permutation without a fixed point, and only those, drawn about equally often."""
    g = torch.Generator().manual_seed(0)
    counts = Counter(tuple(cavp.derangement(4, g).tolist()) for _ in range(1800))
    assert len(counts) == 9  # the 9 derangements of 4 elements
    assert all(all(p[i] != i for i in range(4)) for p in counts)
    assert min(counts.values()) > 150 and max(counts.values()) < 250  # 200 expected each
    assert cavp.derangement(1, g).tolist() == [0]
