"""`lora resume`: a run killed anywhere (SIGKILL mid-step, mid-save) or stopped any number of
times ends bit-identical to the same run left alone (CPU, fp32); broken checkpoints are skipped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest
from train_fixtures import (adapter_tensors, env, lora_cmd, make_dataset, metrics_steps, wait_for,
                            write_profile)

from loracli import profiles
from loracli.errors import LoraError
from loracli.training import loop as training
from loracli.training import runs

pytestmark = pytest.mark.slow

STEPS = 8
# Every source of randomness on: LoRA dropout, caption shuffle and dropout, random crops and
# flips (latents encoded each step), noise offset, min-SNR, gradient accumulation across epochs.
RANDOM = {
    "data": {"shuffle_captions": True, "keep_tokens": 1, "caption_dropout": 0.3, "flip": True,
             "crop": "random"},
    "lora": {"dropout": 0.1},
    "train": {"max_steps": STEPS, "save_steps": 2, "keep_checkpoints": 3, "batch_size": 2,
              "gradient_accumulation": 2, "cache_latents": False, "noise_offset": 0.05,
              "min_snr_gamma": 5.0, "warmup_steps": 2, "scheduler": "cosine"},
}


def _profile(root, base, data, out):
    sections = {k: dict(v) for k, v in RANDOM.items()}
    return write_profile(root / f"{out.name}.toml", base, data, out, **sections)


@pytest.fixture(scope="module")
def setup(tiny_sd, tmp_path_factory):
    """The uninterrupted reference run (in-process) and what a second run needs."""
    root = tmp_path_factory.mktemp("resume")
    data = make_dataset(root / "data", n=5)
    (data / "img0.png").with_suffix(".txt").write_text("sks, red, square, blue, bg", "utf-8")
    path = _profile(root, tiny_sd, data, root / "reference")
    run_dir, _ = runs.start(profiles.load(str(path)))
    result = training.run(run_dir)
    assert result.status == "finished" and result.step == STEPS
    return {"root": root, "data": data, "base": tiny_sd, "reference": run_dir}


def _final(run_dir):
    ckpt = runs.latest(run_dir)
    assert ckpt.step == STEPS
    return ckpt.path


def _assert_identical(run_dir, reference):
    a, b = _final(run_dir), _final(reference)
    rel = "unet/adapter_model.safetensors"  # bit for bit: the same file bytes
    assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    import torch
    from safetensors.torch import load_file

    oa, ob = load_file(a / "optimizer.safetensors"), load_file(b / "optimizer.safetensors")
    assert sorted(oa) == sorted(ob) and all(torch.equal(oa[k], ob[k]) for k in oa)
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert any(v.abs().sum() > 0 for k, v in ta.items() if "lora_B" in k)  # it did train
    assert all(torch.equal(ta[k], tb[k]) for k in tb)


def test_sigkill_mid_step_and_mid_save_then_resume_is_bit_identical(setup):
    root = setup["root"]
    out = root / "killed"
    path = _profile(root, setup["base"], setup["data"], out)

    # 1. killed mid-step, between the checkpoints at steps 2 and 4
    proc = subprocess.Popen(lora_cmd("train", "--config", path), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_for(lambda: 3 in metrics_steps(out), 180, proc), proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    first = runs.latest(out).step
    assert 2 <= first < STEPS

    # 2. the resume is killed while writing its next checkpoint (kept open by the test hook)
    proc = subprocess.Popen(lora_cmd("resume", out), env=env(LORA_TEST_SAVE_PAUSE=60),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / "checkpoints" / f".step-{first + 2:06d}.partial"
    assert wait_for(lambda: (partial / "unet" / "adapter_model.safetensors").is_file(), 180, proc), \
        proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (partial / runs.MARKER).exists()
    assert runs.latest(out).step == first  # the half checkpoint is not trusted

    # 3. resumed again (in-process), to the end
    result = training.run(out)
    assert result.status == "finished" and result.resumed_from == first
    assert metrics_steps(out) == list(range(1, STEPS + 1))  # redone steps logged once
    assert not list((out / "checkpoints").glob(".step-*"))  # the partial folder was removed
    _assert_identical(out, setup["reference"])


def test_three_resumes_in_a_row_give_the_same_adapter(setup):
    root = setup["root"]
    out = root / "stopped"
    run_dir, _ = runs.start(profiles.load(str(_profile(root, setup["base"], setup["data"], out))))
    seen, starts, statuses = [], [], []
    for stop_at in (3, 5, 7, None):  # odd steps: off the save_steps grid, saved because stopped
        stop = training.StopFlag()

        def on_step(m, stop=stop, stop_at=stop_at):
            seen.append(m["step"])
            if stop_at and m["step"] == stop_at - 1:  # as a Ctrl+C during step `stop_at` would
                stop.requested = True

        result = training.run(run_dir, on_step=on_step, stop=stop, on_start=starts.append,
                              on_status=statuses.append)
        assert result.status == ("finished" if stop_at is None else "interrupted")
        assert result.step == (stop_at or STEPS)
    assert seen == list(range(1, STEPS + 1))
    # the run says where it continues, and its metrics read as one uninterrupted run
    assert [(i["start_step"], i["resumed"]) for i in starts] == \
        [(0, False), (3, True), (5, True), (7, True)]
    assert set(starts[0]) == {"run", "profile", "family", "base", "images", "resolution",
                              "batch_size", "max_steps", "start_step", "resumed", "processes"}
    assert (starts[0]["images"], starts[0]["max_steps"], starts[0]["family"]) == (5, STEPS, "sd1")
    assert [s for s in statuses if s.startswith("resuming")] == \
        ["resuming from step 3", "resuming from step 5", "resuming from step 7"]
    assert "loading the model" in statuses
    rows = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in
           (setup["reference"] / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_smooth"] for r in rows] == [r["loss_smooth"] for r in ref]
    elapsed = [r["elapsed"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[3] > elapsed[2]  # no reset at a resume
    state = json.loads((_final(run_dir) / "state.json").read_text())
    assert state["step"] == STEPS and state["micro_batches"] == 2 * STEPS
    assert state["epoch"] == 2 * STEPS // 3  # 5 images, batch 2: 3 batches per epoch
    _assert_identical(run_dir, setup["reference"])


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(setup):
    copy = setup["root"] / "truncated"
    shutil.copytree(setup["reference"], copy)
    newest = copy / "checkpoints" / f"step-{STEPS:06d}" / "unet" / "adapter_model.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    assert runs.latest(copy).step == STEPS - 2
    warnings = []
    result = training.run(copy, on_warning=warnings.append)
    assert result.resumed_from == STEPS - 2 and result.status == "finished"
    assert any(f"step-{STEPS:06d}" in w and "sha256" in w for w in warnings), warnings
    assert not any("changed since" in w for w in warnings)
    _assert_identical(copy, setup["reference"])


def test_finished_run_says_so_and_can_be_extended(setup, cli):
    copy = setup["root"] / "finished"
    shutil.copytree(setup["reference"], copy)
    done = cli("resume", copy)
    assert done.exit_code == 0
    assert "is finished (step 8/8)" in done.stderr and "--steps" in done.stderr
    longer = cli("resume", copy, "--steps", "1", "--json")
    assert longer.exit_code == 0, longer.stderr
    assert json.loads(longer.stdout)["step"] == STEPS + 1
    assert runs.latest(copy).step == STEPS + 1


def test_no_complete_checkpoint_is_a_clear_error(setup):
    copy = setup["root"] / "broken"
    shutil.copytree(setup["reference"], copy)
    for marker in (copy / "checkpoints").glob(f"*/{runs.MARKER}"):
        marker.unlink()
    with pytest.raises(LoraError, match="no complete checkpoint") as e:
        training.run(copy)
    assert "--restart" in e.value.hint


def test_ctrl_c_finishes_the_step_saves_and_exits_130(setup):
    root = setup["root"]
    out = root / "ctrl-c"
    sections = {k: dict(v) for k, v in RANDOM.items()}
    sections["train"]["save_steps"] = 100  # no scheduled checkpoint before the end
    path = write_profile(root / "ctrl-c.toml", setup["base"], setup["data"], out, **sections)
    proc = subprocess.Popen(lora_cmd("train", "--config", path), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: 2 in metrics_steps(out), 180, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopping after this step" in stderr and "lora resume" in stderr
    stopped = runs.latest(out).step
    assert metrics_steps(out)[-1] == stopped and 2 <= stopped < STEPS
    assert training.run(out).status == "finished"
    _assert_identical(out, setup["reference"])  # checkpoints at other steps change nothing
