"""Shared pytest fixtures. `tiny_vpo`: a very small built-in VPO for the training-script tests."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vpo_make  # noqa: E402

TINY_ARGS = ["--size", "64", "--n-train", "8", "--n-test", "4", "--seed", "0", "--workers", "1"]


@pytest.fixture(scope="session")
def tiny_vpo(tmp_path_factory):
    """DATA_ROOT of a built-in VPO (64x64 images, 8 train / 4 test samples per subset, seed 0):
    VPO-SS/, VPO-MS/, VPO-MSMI/, audio/, sources/ and vpo_summary.json. Built once per session."""
    root = str(tmp_path_factory.mktemp("tiny_vpo"))
    assert vpo_make.main(["--synthetic", "--out", root] + TINY_ARGS) == 0
    return root
