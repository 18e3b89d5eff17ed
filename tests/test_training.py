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

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "ptbxl"
TINY = ["--d-model", "8", "--n-layers", "1", "--d-state", "2", "--crop", "64", "--batch-size", "4",
        "--eval-batch-size", "16", "--n-boot", "20", "--device", "cpu", "--parity-windows", "2"]


@pytest.fixture(autouse=True)
def signal_cache_outside_the_fixture(tmp_path, monkeypatch):
    # Training caches decoded signals next to the data by default; tests keep tests/fixtures untouched.
    monkeypatch.setenv("MSSSM_CACHE_DIR", str(tmp_path / "cache"))


def fit(*args, env=None, check=True):
    cmd = [sys.executable, str(ROOT / "training" / "fit.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def ptbxl_args(out, *extra):
    return ["--task", "ptbxl", "--data-dir", str(FIXTURE), "--labels", str(FIXTURE / "labels" / "superdiagnostic.csv"),
            "--out", str(out), *TINY, *extra]


def test_two_step_run_writes_a_loadable_checkpoint_then_resume_continues(tmp_path):
    out = tmp_path / "run"
    fit(*ptbxl_args(out, "--epochs", "1", "--steps-per-epoch", "2"))
    model, meta, _ = load_checkpoint(out / "checkpoint.pt")
    assert meta["labels"] == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert meta["window"] == 1000 and meta["sample_rate"] == 100 and len(meta["leads"]) == 12
    assert meta["parity_windows"].shape == (2, 1000, 12)
    # normalisation fitted on the training folds and stored in the model
    assert not np.allclose(model.input_std.numpy(), 1.0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and 0 <= metrics["best"]["macro_auroc"] <= 1
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
    assert all(h["val_macro_auroc"] == h[f"val_macro_auroc_{h['weights']}"] for h in resumed["history"])
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
    # Distillation under torchrun: rank 0 scores the teachers and hands the targets (or its error) to rank 1.
    student = tmp_path / "student"
    proc = torchrun(*ptbxl_args(student, "--epochs", "1", "--steps-per-epoch", "2",
                                "--teacher", str(tmp_path / "checkpoint.pt")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("distillation: scoring") == 1
    assert load_checkpoint(student / "checkpoint.pt")[1]["data"]["distillation"]["weight"] == 0.5
    proc = torchrun(*ptbxl_args(tmp_path / "bad", "--epochs", "1", "--teacher", str(tmp_path / "none.pt")), timeout=300)
    assert proc.returncode != 0 and "not found" in proc.stderr, proc.stderr[-3000:]
    # Per-crop distillation: every rank scores its own crops; a missing teacher stops every rank, none waits.
    proc = torchrun(*ptbxl_args(tmp_path / "crop", "--epochs", "1", "--steps-per-epoch", "2", "--distill-on", "crop",
                                "--teacher", str(tmp_path / "checkpoint.pt")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "crop" / "checkpoint.pt")[1]["data"]["distillation"]["on"] == "crop"
    proc = torchrun(*ptbxl_args(tmp_path / "bad", "--epochs", "1", "--distill-on", "crop",
                                "--teacher", str(tmp_path / "none.pt")), timeout=300)
    assert proc.returncode != 0 and "not found" in proc.stderr, proc.stderr[-3000:]


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
        "--epochs", "3", "--batch-size", "8", "--n-boot", "20", "--device", "cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["test_macro_auroc"] <= 1
    assert load_checkpoint(out / "checkpoint.pt")[1]["multi_label"] is False


def test_ucr_defaults_learn_a_small_set_without_flags(tmp_path):
    """~100-series UCR sets must train with the defaults alone: small batches, enough steps, a short-run average."""
    sys.path.insert(0, str(ROOT))
    from training.fit import parse_args

    defaults = parse_args(["--task", "ucr", "--data-dir", "x"])
    assert (defaults.batch_size, defaults.epochs) == (16, 150)
    ptbxl = parse_args(["--task", "ptbxl", "--data-dir", "x"])
    assert (ptbxl.batch_size, ptbxl.epochs, ptbxl.supervise_from) == (48, 30, 100)  # the bundled recipe
    data = write_ucr(tmp_path, n_train=40, n_test=40)
    out = tmp_path / "run"
    fit("--task", "ucr", "--data-dir", str(data), "--out", str(out), "--device", "cpu", "--n-boot", "20")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9, metrics["test_accuracy"]
    assert metrics["ema_decay"] == pytest.approx(1 - 5 / (2 * 150))  # 32 training series: 2 steps per epoch


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
    for model, extra in ((model_dir, ["--readouts"]), (model_dir.parent / "checkpoint.pt", [])):
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
    readouts = onnx_result["readouts"]
    assert readouts["last step (served)"] == pytest.approx(onnx_result["macro_auroc"], abs=1e-9)
    assert len(readouts) == 6 and all(0 <= v <= 1 for v in readouts.values())
    assert "readouts" not in torch_result


def test_augment_scales_each_record_within_bounds_and_adds_noise():
    sys.path.insert(0, str(ROOT))
    from training.fit import augment

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
    sys.path.insert(0, str(ROOT))
    import torch

    from training.fit import supervised_steps

    logits = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    assert torch.equal(supervised_steps(logits, 0), logits[:, 9:])
    assert torch.equal(supervised_steps(logits, 4), logits[:, 3:])  # the 4th sample on: 7 steps
    assert torch.equal(supervised_steps(logits, 50), logits[:, 9:])  # crop shorter than N: its last step


def test_supervise_from_trains(tmp_path):
    fit(*ptbxl_args(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "2", "--supervise-from", "16"))
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_bootstrap_leaves_out_single_valued_classes_and_never_draws_for_ever():
    sys.path.insert(0, str(ROOT))
    from training.metrics import bootstrap_macro_auroc, macro_auroc

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


def test_auxiliary_targets_join_other_label_tables_on_ecg_id():
    sys.path.insert(0, str(ROOT))
    import pandas as pd

    from training.ptbxl import auxiliary_targets, load_labels

    records = load_labels(FIXTURE, labels_csv=FIXTURE / "labels" / "superdiagnostic.csv")
    sources = [str(FIXTURE / "labels" / f"{name}.csv") for name in ("subdiagnostic", "form")]
    classes, targets = auxiliary_targets(FIXTURE, sources, records.ids)
    assert targets.shape == (len(records.ids), len(classes))
    form = pd.read_csv(sources[1]).set_index("ecg_id")
    form_classes = [c for c in classes if c.startswith("form:")]
    assert form_classes and all(c.startswith("subdiagnostic:") for c in classes[: -len(form_classes)])
    for row, ecg_id in enumerate(records.ids):
        got = targets[row, -len(form_classes):]
        if ecg_id in form.index:  # the table's own 0/1 cells, in the prefixed class order
            assert np.array_equal(got, form.loc[ecg_id, [c[5:] for c in form_classes]].to_numpy(np.float32))
        else:  # not listed: none of the set's statements
            assert not got.any()
    sub = pd.read_csv(sources[0]).set_index("ecg_id")
    first = records.ids[0]
    assert {c for c, v in zip(classes, targets[0]) if v and c.startswith("subdiagnostic:")} == {
        f"subdiagnostic:{c}" for c in sub.columns[sub.columns.get_loc("sub_class") + 1:] if sub.loc[first, c] == 1}


def test_resize_head_keeps_the_main_outputs():
    sys.path.insert(0, str(ROOT))
    import torch

    from msssm_serve.config import ModelConfig
    from msssm_serve.model import MSSSMClassifier
    from training.fit import resize_head

    torch.manual_seed(0)
    wide = MSSSMClassifier(ModelConfig(n_channels=3, n_classes=9, d_model=8, n_layers=1, d_state=2)).eval()
    x = torch.randn(2, 40, 3)
    narrow = resize_head(wide, 4)
    assert narrow.cfg.n_classes == 4 and wide.cfg.n_classes == 9  # a copy; the trained model is untouched
    assert torch.allclose(narrow(x), wide(x)[..., :4])
    assert torch.allclose(resize_head(narrow, 6).eval()(x)[..., :4], narrow(x))


def test_auxiliary_labels_train_and_are_cut_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    aux = ["--aux-labels", *(str(FIXTURE / "labels" / f"{n}.csv") for n in ("subdiagnostic", "form", "rhythm"))]
    fit(*ptbxl_args(out, "--epochs", "1", "--steps-per-epoch", "2", *aux))
    model, meta, _ = load_checkpoint(out / "checkpoint.pt")
    assert model.cfg.n_classes == 5 and meta["labels"] == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert meta["data"]["auxiliary_targets"]["classes"] > 20
    trained, _, _ = load_checkpoint(out / "last.pt")  # the run itself keeps every output, to resume with
    assert trained.cfg.n_classes == 5 + meta["data"]["auxiliary_targets"]["classes"]
    fit(*ptbxl_args(out, "--epochs", "2", "--steps-per-epoch", "2", "--resume", *aux))
    assert load_checkpoint(out / "last.pt")[2]["epoch"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["n_classes"] == 5
    ucr = fit("--task", "ucr", "--data-dir", str(tmp_path / "X"), "--out", str(tmp_path / "u"), *aux, check=False)
    assert ucr.returncode == 2 and "--aux-labels needs --task ptbxl" in ucr.stderr and "Traceback" not in ucr.stderr


def test_distillation_from_teachers_and_clear_errors_for_unfit_ones(tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    fit(*ptbxl_args(teacher, "--epochs", "1", "--steps-per-epoch", "2"))
    fit(*ptbxl_args(student, "--epochs", "1", "--steps-per-epoch", "2", "--teacher", str(teacher / "checkpoint.pt"),
                    str(teacher / "checkpoint.pt"), "--distill-weight", "0.3"))
    meta = load_checkpoint(student / "checkpoint.pt")[1]
    assert meta["data"]["distillation"] == {"teachers": [str(teacher / "checkpoint.pt")] * 2, "weight": 0.3,
                                            "on": "window"}

    other_classes = tmp_path / "sub"
    fit("--task", "ptbxl", "--data-dir", str(FIXTURE), "--labels", str(FIXTURE / "labels" / "subdiagnostic.csv"),
        "--out", str(other_classes), *TINY, "--epochs", "1", "--steps-per-epoch", "1")
    for bad, expect in ((other_classes / "checkpoint.pt", "differ from the data's"), (tmp_path / "none.pt", "not found")):
        proc = fit(*ptbxl_args(tmp_path / "x", "--epochs", "1", "--teacher", str(bad)), check=False)
        assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = fit(*ptbxl_args(tmp_path / "x", "--teacher", str(bad), "--distill-weight", "1.5"), check=False)
    assert proc.returncode == 2 and "--distill-weight must be in 0..1" in proc.stderr


def test_teacher_targets_are_the_teachers_average_and_soft_cross_entropy_matches_hard(tmp_path):
    sys.path.insert(0, str(ROOT))
    import torch

    from msssm_serve.config import ModelConfig
    from msssm_serve.model import MSSSMClassifier
    from msssm_serve.checkpoint import save_checkpoint
    from training.fit import loss_fn, predict, teacher_targets

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((3, 50, 12)).astype(np.float32)
    # through the saved files, as the trainer reads them
    paths = []
    for i in range(2):
        model = MSSSMClassifier(ModelConfig(n_channels=12, n_classes=3, d_model=8, n_layers=1, d_state=2))
        paths.append(tmp_path / f"teacher{i}.pt")
        save_checkpoint(paths[-1], model, {"labels": ["a", "b", "c"], "multi_label": True, "sample_rate": 100,
                                           "leads": ["x"] * 12, "window": 50})
    expected = np.mean([predict(load_checkpoint(p)[0], x, "cpu", 2) for p in paths], axis=0)
    assert not np.allclose(expected, predict(load_checkpoint(paths[0])[0], x, "cpu", 2))  # two different teachers
    assert np.allclose(teacher_targets([str(p) for p in paths], x, ["a", "b", "c"], 100), expected, atol=1e-6)
    logits, hard = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    assert torch.allclose(loss_fn(logits, torch.eye(3)[hard], multi_label=False), torch.nn.functional.cross_entropy(logits, hard))


def test_crop_distillation_asks_each_step_what_the_teacher_says_on_the_same_crop(tmp_path):
    # A student started from its teacher and taught by it alone (w = 1) on every step of each crop is already at
    # its targets: the gradient is zero up to float rounding (the loss's backward recomputes the sigmoid), far
    # below Adam's eps, so the weights barely move. Whole-window targets move them by about the learning rate, and
    # so would any misalignment of the crop's steps (Adam's step does not shrink with the gradient).
    teacher = tmp_path / "teacher"
    fit(*ptbxl_args(teacher, "--epochs", "1", "--steps-per-epoch", "1", "--dropout", "0"))
    ckpt = str(teacher / "checkpoint.pt")
    same = ("--epochs", "1", "--steps-per-epoch", "2", "--init", ckpt, "--teacher", ckpt, "--distill-weight", "1",
            "--ema", "0", "--weight-decay", "0", "--supervise-from", "10")
    fit(*ptbxl_args(tmp_path / "crop", *same, "--distill-on", "crop"))
    fit(*ptbxl_args(tmp_path / "window", *same))
    start = load_checkpoint(teacher / "checkpoint.pt")[0].state_dict()
    moved = {}
    for mode in ("crop", "window"):
        payload = load_checkpoint(tmp_path / mode / "last.pt")[2]
        assert payload["scheduler"]["last_epoch"] == 2
        moved[mode] = max(float((payload["model"][k] - v).abs().max()) for k, v in start.items())
    assert moved["crop"] < 1e-4 and moved["window"] > 100 * moved["crop"], moved
    meta = load_checkpoint(tmp_path / "crop" / "checkpoint.pt")[1]
    assert meta["data"]["distillation"] == {"teachers": [ckpt], "weight": 1.0, "on": "crop"}


def test_crop_teachers_agree_as_checkpoints_and_exported_models_and_average(tmp_path):
    sys.path.insert(0, str(ROOT))
    import torch

    from training.fit import crop_teacher_probabilities, load_teachers

    fit(*ptbxl_args(tmp_path / "a", "--epochs", "1", "--steps-per-epoch", "1"))
    fit(*ptbxl_args(tmp_path / "b", "--epochs", "1", "--steps-per-epoch", "1", "--seed", "1"))
    exported = subprocess.run([sys.executable, str(ROOT / "export" / "export.py"), "--checkpoint",
                               str(tmp_path / "a" / "checkpoint.pt"), "--out", str(tmp_path / "a_onnx")],
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    classes = ["CD", "HYP", "MI", "NORM", "STTC"]
    crops = np.random.default_rng(0).standard_normal((3, 40, 12)).astype(np.float32)
    cpu = torch.device("cpu")
    a, b = load_teachers([str(tmp_path / "a" / "checkpoint.pt"), str(tmp_path / "b" / "checkpoint.pt")], classes, 100)
    (a_onnx,) = load_teachers([str(tmp_path / "a_onnx")], classes, 100)
    # the exported teacher runs on the trainer's threads, not on every core
    assert a_onnx.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    from_a = crop_teacher_probabilities([a], crops, cpu)
    assert from_a.shape == (3, 40, 5)
    assert torch.allclose(crop_teacher_probabilities([a_onnx], crops, cpu), from_a, atol=1e-4)
    from_b = crop_teacher_probabilities([b], crops, cpu)
    assert not torch.allclose(from_a, from_b, atol=1e-3)
    assert torch.allclose(crop_teacher_probabilities([a, b], crops, cpu), (from_a + from_b) / 2, atol=1e-6)


def lam_and_perm(mixed_names):
    """From mixup's mix of np.eye(n) (row i names record i): each row's own share lam and the record mixed into it."""
    n = len(mixed_names)
    others = np.where(np.eye(n, dtype=bool), 0, mixed_names)
    perm = np.where(others.max(1) > 0, others.argmax(1), np.arange(n))  # a row left unmixed has itself
    lam = float(np.diagonal(mixed_names)[perm != np.arange(n)].min()) if (perm != np.arange(n)).any() else 1.0
    return lam, perm


def test_mixup_mixes_inputs_and_targets_with_one_lam_and_permutation():
    sys.path.insert(0, str(ROOT))
    import torch

    from training.fit import loss_fn, mixup

    x = np.random.default_rng(1).standard_normal((8, 50, 12)).astype(np.float32)
    labels = (np.random.default_rng(2).random((8, 5)) < 0.4).astype(np.float32)  # multi-label 0/1 rows
    names = np.eye(8, dtype=np.float32)  # its mix tells lam and perm
    kept = [a.copy() for a in (x, labels, names)]
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    off_x, off_targets = mixup(x, [labels], rng, 0.0)
    assert off_x is x and off_targets[0] is labels  # off: the batch unchanged ...
    assert rng.bit_generator.state == state  # ... and nothing drawn, so the run's random stream is as before
    lams, perms = [], []
    for _ in range(20):
        mixed_x, (mixed_labels, mixed_names) = mixup(x, [labels, names], rng, 0.2)
        lam, perm = lam_and_perm(mixed_names)
        assert sorted(perm) == list(range(8)) and 0.5 <= lam <= 1.0  # the row's own record dominates
        assert np.allclose(mixed_names, lam * names + (1 - lam) * names[perm], atol=1e-6)
        assert mixed_x.dtype == np.float32 and mixed_labels.dtype == np.float32
        assert np.allclose(mixed_x, lam * x + (1 - lam) * x[perm], atol=1e-6)  # inputs: the same lam and perm
        assert np.allclose(mixed_labels, lam * labels + (1 - lam) * labels[perm], atol=1e-6)
        lams.append(lam)
        perms.append(perm)
    assert all(np.array_equal(a, b) for a, b in zip((x, labels, names), kept))  # never changed in place
    assert len(set(lams)) == 20 and min(lams) < 0.9  # lam is drawn per batch, not fixed at 1
    assert sum((p != np.arange(8)).any() for p in perms) >= 19  # and records are mixed with others

    # The trainer's targets are torch tensors: the same mix, and BCE / cross-entropy of a mixed target is the same
    # mix of the two records' losses (cross-entropy takes the soft one-hot rows as class probabilities).
    logits = torch.randn(8, 5)
    for multi_label, target in ((True, torch.from_numpy(labels)), (False, torch.eye(5)[torch.arange(8) % 5])):
        _, (mixed, mixed_names) = mixup(x, [target, torch.eye(8)], rng, 0.4)
        lam, perm = lam_and_perm(mixed_names.numpy())
        assert 0.5 <= lam < 1.0 and torch.allclose(mixed, lam * target + (1 - lam) * target[perm], atol=1e-6)
        expected = lam * loss_fn(logits, target, multi_label) + (1 - lam) * loss_fn(logits, target[perm], multi_label)
        assert torch.allclose(loss_fn(logits, mixed, multi_label), expected, atol=1e-6)


def test_mixup_trains_records_itself_and_refuses_a_negative_alpha(tmp_path):
    out = tmp_path / "run"
    aux = ["--aux-labels", str(FIXTURE / "labels" / "subdiagnostic.csv")]  # auxiliary targets are mixed alike
    fit(*ptbxl_args(out, "--epochs", "1", "--steps-per-epoch", "2", "--mixup", "0.2", *aux))
    model, meta, _ = load_checkpoint(out / "checkpoint.pt")
    assert model.cfg.n_classes == 5 and meta["data"]["mixup"] == {"alpha": 0.2}
    assert json.loads((out / "metrics.json").read_text())["data"]["mixup"] == {"alpha": 0.2}
    plain = tmp_path / "plain"
    fit(*ptbxl_args(plain, "--epochs", "1", "--steps-per-epoch", "2", *aux))
    assert "mixup" not in load_checkpoint(plain / "checkpoint.pt")[1]["data"]  # off: not recorded
    trained = [load_checkpoint(run / "last.pt")[2]["model"] for run in (out, plain)]
    assert any(not np.allclose(trained[0][k], trained[1][k]) for k in trained[0])  # the mix changed the training

    ucr = tmp_path / "ucr"  # single-label: cross-entropy against soft one-hot mixes
    fit("--task", "ucr", "--data-dir", str(write_ucr(tmp_path)), "--out", str(ucr), "--d-model", "8", "--n-layers",
        "1", "--epochs", "2", "--batch-size", "8", "--n-boot", "20", "--device", "cpu", "--mixup", "0.4")
    meta = load_checkpoint(ucr / "checkpoint.pt")[1]
    assert meta["multi_label"] is False and meta["data"]["mixup"] == {"alpha": 0.4}

    for bad in ("-0.2", "nan"):
        proc = fit(*ptbxl_args(tmp_path / "bad", "--epochs", "1", "--mixup", bad), check=False)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert errors == [f"fit.py: error: --mixup must be a finite number >= 0 (0: off), got {float(bad)}"], errors
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_crop_teachers_score_the_mixed_crops_the_student_sees(tmp_path):
    # As in the crop distillation test above: a student started from its teacher and taught by it alone on every
    # step is at its targets, and barely moves, only if the teacher scores exactly what the student sees; with mixup
    # that is the mixed crops (a mix of the teacher's scores of the two unmixed crops would move it).
    teacher = tmp_path / "teacher"
    fit(*ptbxl_args(teacher, "--epochs", "1", "--steps-per-epoch", "1", "--dropout", "0"))
    ckpt = str(teacher / "checkpoint.pt")
    fit(*ptbxl_args(tmp_path / "student", "--epochs", "1", "--steps-per-epoch", "2", "--init", ckpt, "--teacher", ckpt,
                    "--distill-weight", "1", "--distill-on", "crop", "--ema", "0", "--weight-decay", "0",
                    "--supervise-from", "10", "--mixup", "0.4"))
    start = load_checkpoint(teacher / "checkpoint.pt")[0].state_dict()
    payload = load_checkpoint(tmp_path / "student" / "last.pt")[2]
    assert payload["scheduler"]["last_epoch"] == 2
    assert max(float((payload["model"][k] - v).abs().max()) for k, v in start.items()) < 1e-4
    assert load_checkpoint(tmp_path / "student" / "checkpoint.pt")[1]["data"]["mixup"] == {"alpha": 0.4}
