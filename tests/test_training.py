"""The trainer end to end on the real fixture records: a short run, resume, DDP on CPU, UCR, clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msssm_serve.checkpoint import load_checkpoint
from msssm_serve.model import EnsembleClassifier, MSSSMClassifier
from msssm_serve.training.recipe import MEMBERS

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "ptbxl"
TINY = ["--d-model", "8", "--n-layers", "1", "--d-state", "2", "--crop", "64", "--batch-size", "4",
        "--eval-batch-size", "16", "--n-boot", "20", "--device", "cpu", "--parity-windows", "2"]


@pytest.fixture(autouse=True)
def signal_cache_outside_the_fixture(tmp_path, monkeypatch):
    # Training caches decoded signals next to the data by default; tests keep tests/fixtures untouched.
    monkeypatch.setenv("MSSSM_CACHE_DIR", str(tmp_path / "cache"))


def fit(*args, env=None, check=True, cli=False):
    """fit.py's main in this process (no interpreter and torch start-up per run); `cli`: the real command, a child
    process (kept for what only a process shows: exit codes, tracebacks, torchrun)."""
    if cli:
        cmd = [sys.executable, str(ROOT / "training" / "fit.py"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    else:
        proc = in_process(list(args), env or {})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def in_process(argv: list[str], env: dict):
    import contextlib
    import io
    import types

    from msssm_serve.training import fit as fit_cli

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv = dict(os.environ), sys.argv
    os.environ.update(env)
    sys.argv = ["training/fit.py", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = fit_cli.main(argv)
            except SystemExit as exit_:  # argparse
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def ptbxl_args(out, *extra):
    return ["--task", "ptbxl", "--data-dir", str(FIXTURE), "--labels", str(FIXTURE / "labels" / "superdiagnostic.csv"),
            "--out", str(out), *TINY, *extra]


def test_two_step_run_writes_a_loadable_checkpoint_then_resume_continues(tmp_path):
    out = tmp_path / "run"
    fit(*ptbxl_args(out, "--epochs", "1", "--steps-per-epoch", "2"), cli=True)  # the real command, once
    model, meta, _ = load_checkpoint(out / "checkpoint.pt")
    assert meta["labels"] == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert meta["window"] == 1000 and meta["sample_rate"] == 100 and len(meta["leads"]) == 12
    assert meta["parity_windows"].shape == (2, 1000, 12)
    # normalisation fitted on the training folds and stored in the model
    assert not np.allclose(model.input_std.numpy(), 1.0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and metrics["best"]["macro_auroc"] == meta["validation"]["macro_auroc"]
    assert (out / "learning_curves.png").stat().st_size > 0 and (out / "roc_curves.png").stat().st_size > 0

    first = load_checkpoint(out / "last.pt")[2]
    fit(*ptbxl_args(out, "--epochs", "2", "--steps-per-epoch", "2", "--resume"))
    resumed = load_checkpoint(out / "last.pt")[2]
    assert resumed["epoch"] == 2
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == first["history"][0]  # epoch 1 kept, not retrained
    assert resumed["scheduler"]["last_epoch"] == 4  # the schedule continued from step 2
    # the moving average of the weights is scored beside them, and resumes with the run
    assert all({"val_macro_auroc_raw", "val_macro_auroc_ema"} <= set(h) for h in resumed["history"])
    # the better of the two on validation is what the epoch reports
    assert all(h["val_macro_auroc"] == max(h["val_macro_auroc_raw"], h["val_macro_auroc_ema"])
               for h in resumed["history"])
    assert resumed["ema"]["n_averaged"].item() == 4 and first["ema"]["n_averaged"].item() == 2


def test_resume_refuses_a_run_it_cannot_continue(tmp_path):
    out = tmp_path / "run"
    fit(*ptbxl_args(out, "--epochs", "1", "--steps-per-epoch", "2"))
    other_batch = fit(*ptbxl_args(out, "--epochs", "2", "--steps-per-epoch", "2", "--resume", "--batch-size", "2"),
                      check=False)
    other_model = fit(*ptbxl_args(out, "--epochs", "2", "--steps-per-epoch", "2", "--resume", "--d-model", "12"),
                      check=False)
    for proc, expect in ((other_batch, "--batch-size"), (other_model, "architecture")):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert expect in proc.stderr, proc.stderr[-2000:]
    assert load_checkpoint(out / "last.pt")[2]["epoch"] == 1  # nothing was overwritten


def test_init_warm_starts_from_a_checkpoint(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    fit(*ptbxl_args(first, "--epochs", "1", "--steps-per-epoch", "1"))
    # model flags that disagree with the checkpoint are ignored: its architecture and weights are the start
    fit(*ptbxl_args(second, "--epochs", "1", "--steps-per-epoch", "1", "--init", str(first / "checkpoint.pt"),
                    "--d-model", "16"))
    start, _, _ = load_checkpoint(first / "checkpoint.pt")
    warm, _, payload = load_checkpoint(second / "last.pt")
    assert warm.cfg == start.cfg
    assert payload["epoch"] == 1 and payload["scheduler"]["last_epoch"] == 1
    # --pool mean_std widens a mean-pooled start (the spread's head columns at zero); the reverse is refused
    wide = tmp_path / "wide"
    fit(*ptbxl_args(wide, "--epochs", "1", "--steps-per-epoch", "1", "--init", str(first / "checkpoint.pt"),
                    "--pool", "mean_std"))
    assert load_checkpoint(wide / "last.pt")[0].cfg.pool == "mean_std"
    proc = fit(*ptbxl_args(tmp_path / "narrow", "--epochs", "1", "--init", str(wide / "last.pt"), "--pool", "mean"),
               check=False)
    assert proc.returncode == 2 and "would drop" in proc.stderr and "Traceback" not in proc.stderr

    other_classes = tmp_path / "sub"
    fit("--task", "ptbxl", "--data-dir", str(FIXTURE), "--labels", str(FIXTURE / "labels" / "subdiagnostic.csv"),
        "--out", str(other_classes), *TINY, "--epochs", "1", "--steps-per-epoch", "1")
    for bad, expect in ((other_classes / "checkpoint.pt", "differ from the data's"), (tmp_path / "none.pt", "not found"),
                        (first, "holds no trainable weights")):
        proc = fit(*ptbxl_args(tmp_path / "x", "--epochs", "1", "--init", str(bad)), check=False)
        assert proc.returncode == 2 and expect in proc.stderr and "--init" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_official_metadata_path_trains(tmp_path):
    fit("--task", "ptbxl", "--data-dir", str(FIXTURE), "--label-set", "superdiagnostic", "--out", str(tmp_path),
        *TINY, "--epochs", "1", "--steps-per-epoch", "1")
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1]["labels"] == ["CD", "HYP", "MI", "NORM", "STTC"]


def test_ddp_with_two_cpu_processes(tmp_path):
    def torchrun(*args, timeout=600):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               str(ROOT / "training" / "fit.py"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    proc = torchrun(*ptbxl_args(tmp_path, "--epochs", "1", "--steps-per-epoch", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    load_checkpoint(tmp_path / "checkpoint.pt")
    # An error on every rank (no CUDA here) ends the run with its reason, no rank left waiting for another.
    proc = torchrun(*ptbxl_args(tmp_path / "bad", "--epochs", "1", "--steps-per-epoch", "2", "--device", "cuda"),
                    timeout=300)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr, proc.stderr[-3000:]


def write_ucr(root: Path, name="TinyECG", n_train=24, n_test=12, length=40):
    rng = np.random.default_rng(0)
    folder = root / name
    folder.mkdir(parents=True)
    for split, n in (("TRAIN", n_train), ("TEST", n_test)):
        labels = np.array([-1, 1] * (n // 2))
        t = np.linspace(0, 1, length)
        rows = [np.sin(2 * np.pi * (3 if y > 0 else 1) * t) + 0.1 * rng.standard_normal(length) for y in labels]
        np.savetxt(folder / f"{name}_{split}.tsv", np.column_stack([labels, rows]), delimiter="\t", fmt="%.5f")
    return folder


def test_ucr_task_writes_test_metrics(tmp_path):
    data = write_ucr(tmp_path)
    out = tmp_path / "run"
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(out), "--d-model", "8", "--n-layers", "1",
        "--epochs", "3", "--batch-size", "8", "--n-boot", "20", "--device", "cpu", "--template", "on", "--folds", "1")
    metrics = json.loads((out / "metrics.json").read_text())
    model, meta, _ = load_checkpoint(out / "checkpoint.pt")
    assert meta["multi_label"] is False and meta["labels"] == ["-1.00000", "1.00000"]  # the file's text
    # TEST accuracy as recorded is the checkpoint's, recomputed here from the file: the last step's argmax
    import torch

    table = np.loadtxt(data / "TinyECG_TEST.tsv", delimiter="\t")
    with torch.no_grad():
        probs = model.advance(torch.tensor(table[:, 1:, None], dtype=torch.float32), model.zero_state(len(table)))[0]
    truth = [[float(label) for label in meta["labels"]].index(y) for y in table[:, 0]]
    assert metrics["test_accuracy"] == pytest.approx(float((probs[:, -1].argmax(-1).numpy() == truth).mean()))
    assert "test_macro_auroc" in metrics
    # one held-out split (--folds 1): the refit is an ensemble of five seeds (recipe.MEMBERS), each a run of its own,
    # and the model
    # is their mean probabilities
    assert isinstance(model, EnsembleClassifier) and len(model.members) == MEMBERS == meta["ensemble"]["members"]
    assert [m["seed"] for m in metrics["members"]] == list(range(MEMBERS)) == meta["ensemble"]["seeds"]
    x = torch.tensor(table[:, 1:, None], dtype=torch.float32)
    with torch.no_grad():
        alone = [load_checkpoint(out / m["dir"] / "checkpoint.pt")[0].advance(x, member.zero_state(len(x)))[0]
                 for m, member in zip(metrics["members"], model.members)]
    torch.testing.assert_close(probs, torch.stack(alone).mean(0))
    for m, p in zip(metrics["members"], alone):  # each member's own TEST accuracy, recorded beside the ensemble's
        assert m["test_accuracy"] == pytest.approx(float((p[:, -1].argmax(-1).numpy() == truth).mean()))
    assert len({float(p[:, -1, 0].sum()) for p in alone}) == MEMBERS  # different seeds, different functions
    # the template: the mean of the TRAIN series the refit saw (all of them), and the std of their deviations from it
    train = np.loadtxt(data / "TinyECG_TRAIN.tsv", delimiter="\t")[:, 1:]
    for member in model.members:
        assert member.cfg.template_length == train.shape[1]
        np.testing.assert_allclose(member.template[:, 0].numpy(), train.mean(0), atol=1e-5)
        np.testing.assert_allclose(member.template_std.numpy(), [(train - train.mean(0)).std()], rtol=1e-4)
    # refit (ucr's, on a held-out split): the selection run kept beside it; the model trained on all 24 TRAIN series
    selection = json.loads((out / "selection" / "metrics.json").read_text())
    assert metrics["best"] == selection["best"] and "test_accuracy" in metrics["selection"]
    assert len(metrics["epochs"]) == max(selection["best"]["epoch"], 0) and "refit" in meta["validation"]
    # --members 1: the one refit is the model, in RUN_DIR itself
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(tmp_path / "one"), "--d-model", "8", "--n-layers",
        "1", "--epochs", "3", "--batch-size", "8", "--n-boot", "20", "--device", "cpu", "--template", "on",
        "--members", "1", "--folds", "1")
    assert isinstance(load_checkpoint(tmp_path / "one" / "checkpoint.pt")[0], MSSSMClassifier)
    assert not (tmp_path / "one" / "members").exists()
    # an ensemble is no warm start: one member is
    refused = fit("--task", "ucr", "--data-dir", str(data), "--out", str(tmp_path / "warm"), "--init",
                  str(out / "checkpoint.pt"), "--epochs", "1", "--device", "cpu", check=False)
    assert refused.returncode == 2 and "members/K/checkpoint.pt" in refused.stderr
    # members are refits: without one they are refused, before anything is trained
    refused = fit("--task", "ucr", "--data-dir", str(data), "--out", str(tmp_path / "no"), "--refit", "off",
                  "--members", "3", "--folds", "1", check=False)
    assert refused.returncode == 2 and "need the refit" in refused.stderr


def test_template_needs_whole_series_and_is_off_for_ptbxl(tmp_path):
    data = write_ucr(tmp_path)
    cropped = fit("--task", "ucr", "--data-dir", str(data), "--out", str(tmp_path / "run"), "--crop", "0.9",
                  "--template", "on", "--epochs", "1", "--device", "cpu", check=False)
    assert cropped.returncode == 2 and "--template off" in cropped.stderr
    from msssm_serve.training.fit import parse_args
    from msssm_serve.training.loop import template_wanted

    assert not template_wanted(parse_args(["--task", "ptbxl", "--data-dir", "x"]))
    assert not template_wanted(parse_args(["--task", "ucr", "--data-dir", "x", "--template", "off"]))
    # auto with crops: the template cannot be tried, the run is the plain model's
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(tmp_path / "crops"), "--crop", "0.9", "--epochs", "1",
        "--d-model", "8", "--n-layers", "1", "--n-boot", "10", "--device", "cpu")
    assert not (tmp_path / "crops" / "selection" / "template_on").exists()
    assert load_checkpoint(tmp_path / "crops" / "checkpoint.pt")[0].cfg.template_length == 0


def test_a_held_out_split_selects_without_and_with_the_template_and_refits_the_better_on_validation(tmp_path):
    data = write_ucr(tmp_path)
    out = tmp_path / "run"
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(out), "--d-model", "8", "--n-layers", "1",
        "--epochs", "4", "--n-boot", "10", "--device", "cpu", "--folds", "1")
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = {}
    for choice in ("off", "on"):
        run = json.loads((out / "selection" / f"template_{choice}" / "metrics.json").read_text())
        assert (run["config"]["template_length"] > 0) == (choice == "on") and run["ucr_recipe"]["template"] == choice
        loss = next(e["val_loss"] for e in run["epochs"] if e["epoch"] == run["best"]["epoch"])
        ranks[choice] = (-loss, run["best"]["macro_auroc"])  # UCR: the lower validation loss, ties to the AUROC
        assert metrics["selection"]["template"][choice]["val_loss"] == pytest.approx(loss)
    chosen = max(ranks, key=ranks.get)
    assert metrics["selection"]["template"][chosen]["chosen"] and metrics["selection"]["dir"].endswith(chosen)
    # the refit is the chosen variant, and its validation figures are that selection run's
    model, _, _ = load_checkpoint(out / "checkpoint.pt")
    assert (model.cfg.template_length > 0) == (chosen == "on")
    assert metrics["best"]["macro_auroc"] == ranks[chosen][1]
    # and each run kept the epoch of lowest validation loss
    for choice in ("off", "on"):
        run = json.loads((out / "selection" / f"template_{choice}" / "metrics.json").read_text())
        assert min(e["val_loss"] for e in run["epochs"]) == pytest.approx(-ranks[choice][0])


# Twenty trainings of 223 epochs (ten folds, with and without the template): 18-20 min on 2026-12-07's slower
# 2-core machine, where the suite's 1,200 s per test cut it off once; the suite as a whole stays near 30 min.
@pytest.mark.timeout(2700)
def test_ucr_defaults_learn_a_small_set_without_flags(tmp_path):
    """Small UCR sets must train with the defaults alone: batch size and epochs follow the training size."""
    from msssm_serve.training.fit import parse_args
    from msssm_serve.training.recipe import ucr_recipe

    defaults = parse_args(["--task", "ucr", "--data-dir", "x"])
    assert (defaults.batch_size, defaults.epochs, defaults.refit) == (None, None, "auto")  # set from the data
    ptbxl = parse_args(["--task", "ptbxl", "--data-dir", "x"])
    assert (ptbxl.batch_size, ptbxl.epochs, ptbxl.supervise_from) == (48, 30, 100)  # the bundled recipe
    # 16 series: batches of 4, 4 steps per epoch, 500 epochs; 400: batches of 32, 12 steps, 167 epochs
    assert ucr_recipe(16) == {"batch_size": 4, "epochs": 500}
    assert ucr_recipe(400) == {"batch_size": 32, "epochs": 167}
    assert ucr_recipe(5000) == {"batch_size": 32, "epochs": 100}
    data = write_ucr(tmp_path, n_train=40, n_test=40)
    out = tmp_path / "run"
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(out), "--device", "cpu", "--n-boot", "20")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9, metrics["test_accuracy"]
    recipe = metrics["ucr_recipe"]
    assert (recipe["batch_size"], recipe["epochs"]) == (4, 223)  # a fold trains on 36 series: 9 steps per epoch
    assert recipe["template_share"] < 0.5  # two shapes: little of the variance is a shared one
    # ten folds (recipe.FOLDS) without and with the template; the better out of fold is the served ensemble
    chosen = next(c for c, v in metrics["selection"]["template"].items() if v["chosen"])
    assert metrics["selection"]["cross_validation"]["folds"] == 10 and recipe["template"] == chosen
    model = load_checkpoint(out / "checkpoint.pt")[0]
    assert len(model.members) == 10 and (model.cfg.template_length > 0) == (chosen == "on")
    assert metrics["ema_decay"] == pytest.approx(1 - 5 / (9 * 223))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_dir", "not found"),
        ("no_records100", "records100"),
        ("unknown_label_set", "label set"),
        ("labels_missing_columns", "strat_fold"),
        ("corrupt_dat", "00001_lr"),
    ],
)
def test_clear_errors_not_tracebacks(tmp_path, case, expect):
    data = tmp_path / "ptbxl"
    shutil.copytree(FIXTURE, data)
    labels = data / "labels" / "superdiagnostic.csv"
    args = ["--labels", str(labels)]
    if case == "missing_dir":
        data = tmp_path / "nowhere"
    elif case == "no_records100":
        shutil.rmtree(data / "records100")
    elif case == "unknown_label_set":
        args = ["--label-set", "bogus"]
    elif case == "labels_missing_columns":
        text = labels.read_text().splitlines()
        labels.write_text("\n".join(line.replace("strat_fold", "fold") for line in text))
    elif case == "corrupt_dat":
        (data / "records100" / "00000" / "00001_lr.dat").write_bytes(b"\x00\x01garbage")
    proc = fit("--task", "ptbxl", "--data-dir", str(data), *args, "--out", str(tmp_path / "run"), *TINY,
               "--epochs", "1", "--steps-per-epoch", "1", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert expect.lower() in proc.stderr.lower(), proc.stderr


def test_evaluate_model_dir_and_checkpoint_agree(tmp_path, model_dir):
    """evaluate.py on fold 9 of the fixture: the ONNX model directory and its checkpoint give the same AUROC."""
    results = []
    for model, extra in ((model_dir, []), (model_dir.parent / "checkpoint.pt", ["--leads", "I,II,III,AVR,AVL,AVF,V1,"
                                                                                   "V2,V3,V4,V5,V6"])):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", str(model), "--task", "ptbxl",
             "--data-dir", str(FIXTURE), "--labels", str(FIXTURE / "labels" / "superdiagnostic.csv"), "--fold", "9",
             "--n-boot", "50", *extra],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout))
    ensemble = subprocess.run(
        [sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", str(model_dir),
         str(model_dir.parent / "checkpoint.pt"), "--data-dir", str(FIXTURE), "--labels",
         str(FIXTURE / "labels" / "superdiagnostic.csv"), "--n-boot", "50"], capture_output=True, text=True, timeout=600)
    assert ensemble.returncode == 0, ensemble.stderr[-2000:]
    # the same model twice: its average is itself
    assert json.loads(ensemble.stdout)["macro_auroc"] == pytest.approx(results[0]["macro_auroc"], abs=1e-3)
    onnx_result, torch_result = results
    assert onnx_result["records"] == torch_result["records"] > 0
    assert abs(onnx_result["macro_auroc"] - torch_result["macro_auroc"]) < 1e-3
    assert onnx_result["ci_low"] <= onnx_result["macro_auroc"] <= onnx_result["ci_high"]
    assert torch_result["leads"].startswith("I,II")  # all twelve kept: the same figure, and the run says so


def test_augment_scales_each_record_within_bounds_and_adds_noise():
    from msssm_serve.training.augment import augment

    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).standard_normal((64, 50, 12)).astype(np.float32)
    assert augment(x, rng, 0.0, 0.0) is x  # off by default: the recipe is unchanged
    scaled = augment(x, rng, 0.25, 0.0)
    ratio = scaled / x
    per_record = ratio[:, :1, :1]
    assert np.allclose(ratio, per_record, rtol=1e-5)  # one gain per record, the same on every lead and sample
    assert per_record.min() >= 1 / 1.25 - 1e-6 and per_record.max() <= 1.25 + 1e-6
    assert per_record.std() > 0.05  # and it does vary between records
    noisy = augment(x, rng, 0.0, 0.05)
    assert noisy.dtype == np.float32 and abs(float((noisy - x).std()) - 0.05) < 0.005


def test_supervised_steps_picks_the_last_step_or_every_step_from_n():
    import torch

    from msssm_serve.training.loop import supervised_steps

    logits = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    assert torch.equal(supervised_steps(logits, 0), logits[:, 9:])
    assert torch.equal(supervised_steps(logits, 4), logits[:, 3:])  # the 4th sample on: 7 steps
    assert torch.equal(supervised_steps(logits, 50), logits[:, 9:])  # crop shorter than N: its last step


def test_supervise_from_reaches_the_loss(tmp_path):
    """Same seed and data, only the supervised steps differ: the trained weights must differ (an ignored flag would
    train the same model twice)."""
    import torch

    for name, first in (("from16", "16"), ("last", "0")):
        fit(*ptbxl_args(tmp_path / name, "--epochs", "1", "--steps-per-epoch", "2", "--supervise-from", first))
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt")[0].state_dict() for name in ("from16", "last"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bootstrap_leaves_out_single_valued_classes_and_never_draws_for_ever():
    from msssm_serve.training.metrics import bootstrap_macro_auroc, macro_auroc

    rng = np.random.default_rng(0)
    labels = (rng.random((300, 3)) < 0.3).astype(np.float32)
    scores = labels + rng.normal(0, 0.8, labels.shape)
    whole = bootstrap_macro_auroc(labels, scores, n_boot=50)
    labels[:, 2] = 0  # a class absent from the set: no resample could have a positive of it
    absent = bootstrap_macro_auroc(labels, scores, n_boot=50)
    assert absent["macro_auroc"] == pytest.approx(macro_auroc(labels[:, :2], scores[:, :2]))
    assert absent["ci_low"] <= absent["macro_auroc"] <= absent["ci_high"] and whole["ci_low"] is not None
    # twenty classes with one positive each: a valid resample is a ~1e-4 event -> no interval, with the reason
    rare = np.zeros((200, 20), np.float32)
    rare[np.arange(20), np.arange(20)] = 1
    result = bootstrap_macro_auroc(rare, rng.random(rare.shape), n_boot=20)
    assert result["ci_low"] is None and "rare class" in result["ci_note"]


def test_ablation_trains_both_variants_at_equal_state_and_prints_the_table(tmp_path):
    cmd = [sys.executable, str(ROOT / "training" / "ablation.py"), "--out", str(tmp_path), "--data-dir", str(FIXTURE),
           "--labels", str(FIXTURE / "labels" / "superdiagnostic.csv"), *TINY, "--epochs", "1",
           "--steps-per-epoch", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "model" not in line]
    assert len(rows) == 2 and "MS-SSM (S=3, N=2)" in rows[0] and "single-scale (S=0, N=10)" in rows[1]
    assert rows[0].split("|")[2].strip() == rows[1].split("|")[2].strip() == "10"  # equal state per channel
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["model"] for r in saved] == ["MS-SSM (S=3, N=2)", "single-scale (S=0, N=10)"]


def test_evaluate_refuses_a_model_of_another_sample_rate(model_dir, tmp_path):
    data = tmp_path / "ptbxl"
    shutil.copytree(FIXTURE, data)
    (data / "records500").mkdir()  # the check must come before any 500 Hz record is read
    proc = subprocess.run(
        [sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", str(model_dir), "--data-dir", str(data),
         "--labels", str(data / "labels" / "superdiagnostic.csv"), "--sampling-rate", "500"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "runs at 100 Hz" in proc.stderr, proc.stderr[-2000:]




def test_table3_trains_each_label_set_and_prints_it_beside_the_paper(tmp_path, monkeypatch):
    import contextlib
    import io

    from benchmarks.table3 import main as table3

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert table3(["--data-dir", str(FIXTURE), "--out", str(tmp_path), "--label-sets", "superdiagnostic,rhythm",
                       "--results", str(tmp_path / "table3.md"),
                       "--", *TINY, "--epochs", "1", "--steps-per-epoch", "1"]) == 0
    rows = [line for line in printed.getvalue().splitlines() if line.startswith("| superdiagnostic") or
            line.startswith("| rhythm")]
    assert len(rows) == 2 and "0.935" in rows[0] and "0.979" in rows[1]
    assert (tmp_path / "rhythm" / "metrics.json").is_file()
    written = (tmp_path / "table3.md").read_text()
    assert rows[0] in written and "python benchmarks/table3.py --data-dir" in written
    # a second call reads the finished runs instead of training again; a subset with no --results writes nowhere,
    # so that it cannot replace the whole table with its own rows
    import benchmarks.table3

    default_results = tmp_path / "default_table3.md"
    monkeypatch.setattr(benchmarks.table3, "DEFAULT_RESULTS", default_results)
    again, said = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(again), contextlib.redirect_stderr(said):
        table3(["--data-dir", str(FIXTURE), "--out", str(tmp_path), "--label-sets", "rhythm"])
    assert rows[1] in again.getvalue()
    assert not default_results.exists() and "not written" in said.getvalue()


def test_table3_scores_a_bundled_model_for_a_label_set_instead_of_training(tmp_path):
    """`--model superdiagnostic=models/default`: the row is the model directory scored on fold 9, as served (the
    same figures `training/evaluate.py` gives it), and nothing is trained."""
    import contextlib
    import io

    from benchmarks.table3 import main as table3
    from msssm_serve.training.evaluate import score

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert table3(["--data-dir", str(FIXTURE), "--out", str(tmp_path), "--label-sets", "superdiagnostic",
                       "--model", f"superdiagnostic={ROOT / 'models' / 'default'}", "--results", "-"]) == 0
        expected = score([str(ROOT / "models" / "default")], str(FIXTURE), label_set="superdiagnostic",
                         labels=str(FIXTURE / "labels" / "superdiagnostic.csv"))
    row = next(line for line in printed.getvalue().splitlines() if line.startswith("| superdiagnostic"))
    assert f"{expected['macro_auroc']:.4f}" in row and "models/default" in row
    assert not (tmp_path / "superdiagnostic").exists()


def test_fit_correction_learns_what_the_head_missed_and_a_strong_penalty_keeps_the_head():
    from msssm_serve.training.fit_head import fit_correction

    rng = np.random.default_rng(0)
    features = rng.normal(size=(2000, 4)) * [1.0, 1.0, 0.05, 3.0] + [0, 0, 0.3, 1.0]
    labels = (features[:, [2]] > 0.3).astype(np.float64)  # class 0 hangs on a small-scale feature the head ignores
    head_w, head_b = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32), np.zeros(1, np.float32)
    w, b = fit_correction(features, labels, head_w, head_b, l2=1e-4, multi_label=True)
    logits = features @ w.T.astype(np.float64) + b
    assert ((logits[:, 0] > 0) == labels[:, 0].astype(bool)).mean() > 0.95
    w, b = fit_correction(features, labels, head_w, head_b, l2=1e6, multi_label=True)
    assert np.abs(w - head_w).max() < 1e-3 and np.abs(b - head_b).max() < 1e-3


@pytest.mark.parametrize("pool", ["mean_std", "mean_std_extrema"])
def test_fit_head_widens_a_trained_model_to_std_pooling_and_the_result_exports(tmp_path, pool):
    from msssm_serve.export import export as exporter
    from msssm_serve.training import fit_head

    run = tmp_path / "run"
    fit(*ptbxl_args(run, "--epochs", "1", "--steps-per-epoch", "1", "--lead-subsets"))
    out = tmp_path / "head"
    assert fit_head.main(["--init", str(run / "checkpoint.pt"), "--data-dir", str(FIXTURE), "--labels",
                          str(FIXTURE / "labels" / "superdiagnostic.csv"), "--pool", pool, "--l2", "1e-2,1e-3",
                          "--n-boot", "20", "--out", str(out)]) == 0
    model, meta, _ = load_checkpoint(out / "checkpoint.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    assert model.cfg.pool == pool and [t["l2"] for t in metrics["trials"]] == [None, 1e-2, 1e-3]
    # the kept head is the best of the trials on validation, and that is the checkpoint's validation figure
    assert meta["validation"]["macro_auroc"] == max(t["val_macro_auroc"] for t in metrics["trials"])
    assert set(meta["validation"]["lead_subsets"]) == {"all", "I+II", "II"}  # a lead-subset model's card table
    assert exporter.export_model(out / "checkpoint.pt", tmp_path / "model")["config"]["pool"] == pool
    assert fit_head.main(["--init", str(out / "checkpoint.pt"), "--data-dir", str(FIXTURE), "--labels",
                          str(FIXTURE / "labels" / "superdiagnostic.csv"), "--pool", "mean", "--out",
                          str(tmp_path / "x")]) == 2


def test_cv_folds_deal_every_series_to_one_fold_stratified():
    from msssm_serve.training.data import cv_fold_mask

    y = np.array([0] * 7 + [1] * 5 + [2] * 3)
    masks = [cv_fold_mask(y, 3, 5, fold, seed=0) for fold in range(5)]
    assert (np.sum(masks, axis=0) == 1).all()  # every series validates exactly once
    assert {int(m.sum()) for m in masks} == {3}  # sizes within one of each other (15 / 5)
    for c, n in enumerate((7, 5, 3)):  # each class spread over the folds as evenly as it divides
        per_fold = [int((y[m] == c).sum()) for m in masks]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n
    assert not all((a == b).all() for a, b in zip(masks, [cv_fold_mask(y, 3, 5, f, seed=1) for f in range(5)]))


def test_mixup_blends_records_and_labels_alike_and_keeps_each_record_the_larger_share():
    from msssm_serve.training.augment import mixup

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 20, 2)).astype(np.float32)
    y = np.eye(8, dtype=np.float32)  # a class per record: the label says who was blended with whom, and how much
    mixed_x, mixed_y = mixup(x, y, np.random.default_rng(1), 0.4)
    np.testing.assert_allclose(mixed_y.sum(1), 1, rtol=1e-6)
    assert (mixed_y.argmax(1) == np.arange(8)).all() and (mixed_y.max(1) >= 0.5).all()  # its own share the larger
    for i in range(8):  # lam * its own record + (1 - lam) * its partner's, the weights its label shows
        np.testing.assert_allclose(mixed_x[i], np.einsum("j,jlc->lc", mixed_y[i], x), atol=1e-5)
    assert (mixed_y.max(1) < 1).sum() >= 4  # blended, not passed through
    assert mixup(x, y, rng, 0.0)[0] is x  # off: unchanged


def test_ucr_cross_validated_selection_serves_the_folds_as_one_ensemble(tmp_path):
    import torch

    data = write_ucr(tmp_path)
    out = tmp_path / "run"
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(out), "--d-model", "8", "--n-layers", "1",
        "--epochs", "3", "--batch-size", "8", "--n-boot", "20", "--device", "cpu", "--folds", "3")
    metrics = json.loads((out / "metrics.json").read_text())
    model, meta, _ = load_checkpoint(out / "checkpoint.pt")
    assert isinstance(model, EnsembleClassifier) and len(model.members) == 3 == meta["ensemble"]["folds"]
    assert meta["ensemble"]["seeds"] == [0, 1, 2] and metrics["ucr_recipe"]["members"] == 3
    train = np.loadtxt(data / "TinyECG_TRAIN.tsv", delimiter="\t")
    # both template choices ran on every fold; each fold validated on its third of TRAIN, together all 24
    cv = metrics["selection"]["template"]
    x_train = torch.tensor(train[:, 1:, None], dtype=torch.float32)
    for choice in ("off", "on"):
        seen = []
        for k in range(3):
            fold = json.loads((out / "selection" / f"template_{choice}" / f"fold_{k}" / "metrics.json").read_text())
            assert (fold["config"]["template_length"] > 0) == (choice == "on")
            seen.append(fold["best"]["epoch"])
        assert len(seen) == 3
    chosen = max(cv, key=lambda c: (-cv[c]["oof_loss"], cv[c]["oof_macro_auroc"]))  # UCR: loss first
    assert cv[chosen]["chosen"] and (model.cfg.template_length > 0) == (chosen == "on")
    # the recorded out-of-fold figures are the chosen fold models' predictions on their own folds, all of TRAIN
    from msssm_serve.training.data import cv_fold_mask

    labels = [float(v) for v in meta["labels"]]
    y = np.array([labels.index(v) for v in train[:, 0]])
    oof = np.zeros((len(y), 2))
    for k, member in enumerate(model.members):
        mask = cv_fold_mask(y, 2, 3, k, seed=0)
        with torch.no_grad():
            oof[mask] = member.advance(x_train[mask], member.zero_state(int(mask.sum())))[0][:, -1].numpy()
    assert cv[chosen]["oof_accuracy"] == pytest.approx(float((oof.argmax(1) == y).mean()))
    assert cv[chosen]["oof_loss"] == pytest.approx(float(-np.log(oof[np.arange(len(y)), y]).mean()), rel=1e-4)
    assert metrics["best"]["loss"] == pytest.approx(cv[chosen]["oof_loss"])
    # each member's template is the mean of the series it trained on: TRAIN less its fold
    if chosen == "on":
        for k, member in enumerate(model.members):
            rest = train[~cv_fold_mask(y, 2, 3, k, seed=0), 1:]
            np.testing.assert_allclose(member.template[:, 0].numpy(), rest.mean(0), atol=1e-5)
    # TEST once, by the ensemble
    table = np.loadtxt(data / "TinyECG_TEST.tsv", delimiter="\t")
    with torch.no_grad():
        probs = model.advance(torch.tensor(table[:, 1:, None], dtype=torch.float32), model.zero_state(len(table)))[0]
    truth = [labels.index(v) for v in table[:, 0]]
    assert metrics["test_accuracy"] == pytest.approx(float((probs[:, -1].argmax(-1).numpy() == truth).mean()))
    assert [m["fold"] for m in metrics["members"]] == [0, 1, 2] and not (out / "members").exists()
    # the folds' models are the members: a refit or a member count beside them is refused before training
    for extra, expect in ((["--members", "2"], "--folds 1"), (["--refit", "on"], "--folds 1")):
        refused = fit("--task", "ucr", "--data-dir", str(data), "--out", str(tmp_path / "no"), "--folds", "3", *extra,
                      check=False)
        assert refused.returncode == 2 and expect in refused.stderr
    refused = fit(*ptbxl_args(tmp_path / "p"), "--folds", "3", check=False)
    assert refused.returncode == 2 and "PTB-XL selects on fold 9" in refused.stderr


def test_a_selection_run_stops_after_patience_epochs_without_a_better_validation_figure(tmp_path):
    data = write_ucr(tmp_path)
    out = tmp_path / "run"
    # no learning (lr 0): the first epoch's figures are never beaten, so the run stops after 1 + patience epochs
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(out), "--d-model", "8", "--n-layers", "1",
        "--epochs", "30", "--batch-size", "8", "--n-boot", "10", "--device", "cpu", "--template", "off",
        "--refit", "off", "--folds", "1", "--lr", "0", "--patience", "3", "--dropout", "0")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 4 and metrics["early_stop"] == {"patience": 3, "after_epoch": 4}
    assert metrics["best"]["epoch"] == 1
    # resumed, it stays stopped
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(out), "--d-model", "8", "--n-layers", "1",
        "--epochs", "30", "--batch-size", "8", "--n-boot", "10", "--device", "cpu", "--template", "off",
        "--refit", "off", "--folds", "1", "--lr", "0", "--patience", "3", "--dropout", "0", "--resume")
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 4
    from msssm_serve.training.fit import parse_args
    from msssm_serve.training.recipe import patience_for

    assert patience_for(parse_args(["--task", "ptbxl", "--data-dir", "x"])) == 0  # PTB-XL: never
    ucr = parse_args(["--task", "ucr", "--data-dir", "x"])
    ucr.epochs = 300
    assert patience_for(ucr) == 100


def test_folds_by_default_for_small_ucr_sets_only():
    from msssm_serve.training.fit import parse_args
    from msssm_serve.training.recipe import CV_BELOW, FOLDS, folds_wanted, refit_wanted

    ucr = parse_args(["--task", "ucr", "--data-dir", "x"])
    assert folds_wanted(ucr, 60) == FOLDS and folds_wanted(ucr, CV_BELOW) == 1  # a fifth of 250 is enough to select on
    assert not refit_wanted(argparse_with(ucr, folds=FOLDS)) and refit_wanted(argparse_with(ucr, folds=1))
    for flags in (["--members", "3"], ["--refit", "on"]):  # a refit or members asked for: one held-out split
        assert folds_wanted(parse_args(["--task", "ucr", "--data-dir", "x", *flags]), 60) == 1
    assert folds_wanted(parse_args(["--task", "ucr", "--data-dir", "x", "--folds", "3"]), 1000) == 3
    assert folds_wanted(parse_args(["--task", "ptbxl", "--data-dir", "x"]), None) == 1


def argparse_with(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def test_mixup_by_default_for_ucr_whatever_the_selection_and_never_for_ptbxl():
    from msssm_serve.training.fit import parse_args
    from msssm_serve.training.recipe import MIXUP, mixup_for

    ucr = parse_args(["--task", "ucr", "--data-dir", "x"])
    assert mixup_for(argparse_with(ucr, folds=5)) == MIXUP and mixup_for(argparse_with(ucr, folds=1)) == MIXUP
    assert mixup_for(parse_args(["--task", "ptbxl", "--data-dir", "x"])) == 0
    assert mixup_for(argparse_with(parse_args(["--task", "ucr", "--data-dir", "x", "--mixup", "0"]), folds=5)) == 0
