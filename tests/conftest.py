import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model():
    from segcompass.build import build_model

    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture
def scene():
    """A small synthetic picture: a red disc and a blue square on grey (non-square on purpose)."""
    img = np.full((180, 240, 3), 128, np.uint8)
    yy, xx = np.mgrid[:180, :240]
    img[(yy - 60) ** 2 + (xx - 70) ** 2 < 30**2] = (220, 40, 40)
    img[110:160, 150:200] = (40, 80, 220)
    return img
