"""scripts/offline_gpu/rest.sh end to end on the tiny checkpoint with smoke sizes: what it hands back must fit the
device's return limit (8 files) and put together (unpack.sh) into a calibrated checkpoint that loads."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "checkpoints" / "tiny"


@pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="no tiny checkpoint shipped")
def test_rest_sh_returns_a_calibrated_checkpoint_in_at_most_eight_files(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(TINY, run / "sft" / "model")
    ret = tmp_path / "ret"
    env = dict(os.environ, RUN=str(run), EV=str(tmp_path / "ev"), FRESH=str(tmp_path / "fresh"), SITE="",
               PRESET="smoke", STAGES="refit", N_VAL="4", N_TEST="4", N_FRESH="4", JOBS="1", WALL="600",
               REFIT_SET="--threads 1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "scripts/offline_gpu/rest.sh", str(ret)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    files = sorted(p.name for p in ret.iterdir())
    assert len(files) <= 8, files
    assert {"meta.tar", "logs.tar", "calibration.json", "eval_test.json", "w00"} <= set(files), files
    with tarfile.open(ret / "logs.tar") as logs:
        assert {"./refit.log", "./calibrate.log", "./eval.log"} <= set(logs.getnames())
    assert json.loads((ret / "eval_test.json").read_text())["count"] == 4
    threshold = json.loads((ret / "calibration.json").read_text())["threshold"]

    target = tmp_path / "final"
    subprocess.run(["bash", "scripts/offline_gpu/unpack.sh", str(ret), str(target)], cwd=ROOT, check=True,
                   capture_output=True)
    from segcompass.model import SegCompass

    model = SegCompass.from_pretrained(target)
    assert model.config.mask.confidence_threshold == pytest.approx(threshold)
