"""Resuming is safe: a diverged stage leaves only checkpoints a resume can continue from, and
--resume with a smaller learning rate continues from the last good one; nothing in a run folder
is ever unpickled with code execution (checkpoint.load_ckpt)."""
import io
import json
import os
import pickle
import re
from types import SimpleNamespace

import pytest
import torch

from checkpoint import _WeightsOnlyPlanner, read_dcp_metadata
from errors import InputError
from test_train import records, run


class Payload:
    """Unpickling this creates the file `path`: a stand-in for code planted in a run folder."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _assert_payload_is_live(tmp_path):
    """The payload does run under a plain unpickler, so a test that sees no file means refusal."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe))).close()
    assert probe.exists()


def all_finite(ckpt_dir, tmp_path):
    """Every tensor of a DCP checkpoint the test itself wrote, through torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    flat = tmp_path / "flat.pt"
    dcp_to_torch_save(str(ckpt_dir), str(flat))

    def walk(x):
        if isinstance(x, torch.Tensor):
            return not x.is_floating_point() or bool(torch.isfinite(x).all())
        if isinstance(x, dict):
            return all(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return all(walk(v) for v in x)
        return True

    return walk(torch.load(flat, weights_only=False))


def test_nan_mid_stage_never_saved_and_resume_with_smaller_lr_finishes(tmp_path):
    """A NaN left in the optimiser state by the update of SFT step 4 (tests/faults.py --nan-at):
    the checkpoint of step 4 is due before step 5's update and is refused; step-2 is named as
    the last good one. --resume with a smaller --sft-lr continues from it, at the new rate."""
    out = tmp_path / "run"
    flags = ["--baseline", "0", "--iterations", "1", "--ckpt-every", "2"]
    p = run(out, *flags, faults=["--nan-at", "sft:4"], check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"step 4: 'optim\.state\.\S+' holds NaN or inf after the update, so this checkpoint was not "
                     r"saved\. The last good checkpoint is \S+/sft/ckpt/step-2", p.stderr), p.stderr
    ckpts = os.listdir(out / "sft" / "ckpt")
    assert ckpts == ["step-2"], ckpts
    assert all_finite(out / "sft" / "ckpt" / "step-2", tmp_path)

    p = run(out, *flags, "--resume", "--sft-lr", "1e-3")
    assert f"resumed from {out}/sft/ckpt/step-2" in p.stdout
    assert os.path.exists(out / "iter0" / "model" / "model.safetensors")  # the run finished
    sft = {r["step"]: r for r in records(out) if r["type"] == "step" and r["stage"] == "sft"}
    # 6 steps, warmup 1: lr(s) = base * (6 - s) / 5 from s = 1; the record of step s+1 shows lr(s).
    assert sft[2]["lr"] == pytest.approx(3e-3 * (6 - 1) / 5)  # before the resume
    for step in range(3, 7):
        assert sft[step]["lr"] == pytest.approx(1e-3 * (6 - (step - 1)) / 5), (step, sft[step])
    cfg = json.load(open(out / "config.json"))
    assert cfg["sft_lr"] == 1e-3 and cfg["resumes"][-1]["changed"] == {"sft_lr": [3e-3, 1e-3]}
    assert {"type": "resume", "world_size": 1, "changed": {"sft_lr": [3e-3, 1e-3]}} in records(out)


def test_planted_metadata_pickle_is_never_run(tmp_path):
    _assert_payload_is_live(tmp_path)
    out = tmp_path / "run"
    flags = ["--baseline", "0", "--iterations", "1", "--ckpt-every", "2"]
    p = run(out, *flags, faults=["--kill-at", "sft:3"], check=False)
    assert p.returncode != 0
    ckpt = out / "sft" / "ckpt" / "step-2"
    read_dcp_metadata(str(ckpt))  # the genuine file passes the allow-list
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(InputError, match=r"\.metadata: refused, it names (io|builtins)\.open, which DCP metadata"):
        read_dcp_metadata(str(ckpt))
    assert not marker.exists()
    p = run(out, *flags, "--resume", check=False)
    assert p.returncode == 1 and not marker.exists()
    assert re.search(r"train\.py: error: \S+step-2/\.metadata: refused, .*nothing in it was run", p.stderr), p.stderr
    assert "Traceback" not in p.stderr


def test_planted_entry_pickle_is_never_run(tmp_path):
    """A non-tensor entry of a checkpoint (an optimiser hyper-parameter, stored with torch.save)
    goes through torch.load(weights_only=True): plain data loads, a payload is refused."""
    _assert_payload_is_live(tmp_path)
    planner = _WeightsOnlyPlanner()
    planner.flatten_state_dict = True
    planner.original_state_dict = {"optim": {"param_groups": [{"lr": 0.0}]}}
    planner.mappings = {"optim.param_groups.0.lr": ("optim", "param_groups", 0, "lr")}
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups.0.lr"))

    def saved(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return buf

    planner.load_bytes(item, saved(3e-4))
    assert planner.original_state_dict["optim"]["param_groups"][0]["lr"] == 3e-4
    marker = tmp_path / "pwned"
    with pytest.raises(InputError, match="checkpoint entry 'optim.param_groups.0.lr': refused"):
        planner.load_bytes(item, saved(Payload(marker)))
    assert not marker.exists()


def test_nan_after_the_last_update_is_never_exported(tmp_path):
    """A NaN in a weight no batch uses (row 0 of the embedding) after the last update: no loss
    shows it, so the end of the stage checks the weights before they become the next opponent."""
    out = tmp_path / "run"
    p = run(out, "--baseline", "0", "--iterations", "1", "--ckpt-every", "2", faults=["--nan-at", "sft:6:weights"],
            check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"sft step 6: 'model\.embed_tokens\.weight' holds NaN or inf after the update, so its model "
                     r"was not exported\. The last good checkpoint is \S+/sft/ckpt/step-4", p.stderr), p.stderr
    assert not os.path.exists(out / "sft" / "model")


def test_check_finite_names_the_tensor(tmp_path):
    from checkpoint import check_finite
    from errors import Diverged
    state = {"model": {"w": torch.ones(3)}, "optim": {"state": {"w": {"exp_avg_sq": torch.tensor([1.0, float("inf")])}}}}
    with pytest.raises(Diverged, match=r"step 7: 'optim\.state\.w\.exp_avg_sq' holds NaN or inf .* has no checkpoint yet"):
        check_finite(state, str(tmp_path), "step 7", "this checkpoint was not saved")
    state["optim"]["state"]["w"]["exp_avg_sq"][1] = 2.0
    check_finite(state, str(tmp_path), "step 7", "this checkpoint was not saved")
