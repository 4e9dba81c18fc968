"""cavp.py around the method: a silent frame under --bank-sources all, --eval-only under torchrun,
the metrics of the saved weights under CPU DDP, the loader workers' draws after a resume, the overlay
set under DDP, DeepLabV3+ against torchvision's reference and the per-rank anchor cap."""
import os
import sys
from argparse import Namespace

import pytest
import torch

import cavp
import data

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures_layouts as fl  # noqa: E402


@pytest.fixture(scope="module")
def ms3_root(tmp_path_factory):
    """AVSBench MS3 in the released layout whose test frame mt_3 shows no sounding object."""
    import numpy as np
    from PIL import Image
    d = str(tmp_path_factory.mktemp("ms3"))
    fl.write_ms3(d, [("m1", "train"), ("mv", "val"), ("mt", "test")], h=24, w=36)
    Image.fromarray(np.zeros((24, 36), np.uint8)).save(
        os.path.join(d, "Multi-sources", "ms3_data", "gt_masks", "test", "mt", "mt_3.png"))
    return d


def test_bank_sources_all_leaves_a_silent_frame_mismatched(ms3_root):
    """--bank-sources all on an MS3 batch with an empty frame: no crash; the empty frame gets no bank
    audio (it has no class of its own), so its re-pair keeps the other frame's sounding clip and is
    labelled with that clip's classes and mismatched; the sounding frames get their own class."""
    frames = data.AVSBenchFrames(ms3_root, "ms3", "test", size=16)
    batch = data.pad_collate([frames[i] for i in range(5)])
    labels = cavp.gather_labels(batch)
    empty = [s["name"] for s in (frames[i] for i in range(5))].index("mt_3")
    assert labels.audio_classes[empty].sum() == 0
    bank = cavp.WaveBank(2, 1, 8, torch.device("cpu"))
    bank.push(torch.ones(1, 1, 8), torch.tensor([[0.0, 1.0]]), torch.tensor([0.5]))
    for seed in range(8):
        re = cavp.re_pair(labels, bank, 1.0, True, torch.Generator().manual_seed(seed), "all")
        t = labels.audio_classes
        assert (re.choice[empty] == -1).all()
        assert torch.equal(re.audio_classes[empty], t[re.perm[empty]])  # the other frame's clip
        assert not re.match[empty] and t[re.perm[empty]].sum() > 0
        for i in range(5):
            if i != empty:  # a sounding frame: matched, with its own clip or a bank clip of class 1
                assert re.match[i] and torch.equal(re.audio_classes[i], t[i])
                assert (re.choice[i, 1] == 1) == (t[re.perm[i]].sum() == 0)
