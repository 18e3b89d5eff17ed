#!/usr/bin/env python
"""Train MS-SSM: `python training/fit.py --task ptbxl --data-dir DIR [...]` (see ../shared/docs/contract.md).

Writes RUN_DIR/checkpoint.pt (best on validation macro AUROC), RUN_DIR/last.pt (for --resume),
RUN_DIR/metrics.json and PNG plots. Multi-GPU / multi-process: `torchrun --nproc_per_node N training/fit.py ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from msssm_serve.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from msssm_serve.config import ModelConfig  # noqa: E402
from msssm_serve.model import MSSSMClassifier  # noqa: E402
from training.augment import augment, keep_leads, mask_leads, random_crops  # noqa: E402
from training.metrics import bootstrap_macro_auroc, macro_auroc, one_hot, per_class_auroc_by_name  # noqa: E402
from training.ptbxl import LEADS, DataError, auxiliary_targets, load_labels, load_signals, split_folds  # noqa: E402
from training.ucr import load_ucr  # noqa: E402

PTBXL_DATA = {"name": "PTB-XL", "licence": "CC BY 4.0", "citation": "Wagner et al., Scientific Data 7, 154 (2020)"}


@dataclass
class TaskData:
    x_train: np.ndarray  # [n, L, C] float32 (may be a memmap)
    y_train: np.ndarray  # [n, K] 0/1 float32 (one-hot when single-label)
    x_val: np.ndarray
    y_val: np.ndarray
    classes: list[str]
    multi_label: bool
    sample_rate: int
    leads: list[str]
    info: dict = field(default_factory=dict)
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    # Multi-task training: extra targets of the training records, trained as more outputs of the head and cut off
    # before a checkpoint is written (the served model has `classes` only).
    aux_classes: list[str] = field(default_factory=list)
    y_train_aux: np.ndarray | None = None


def load_task(args) -> TaskData:
    if args.task == "ptbxl":
        records = load_labels(args.data_dir, args.label_set, args.labels, args.sampling_rate)
        split = split_folds(records)
        if len(split["train"]) == 0 or len(split["val"]) == 0:
            raise DataError(f"{args.data_dir}: need records in folds 1-8 (train) and fold 9 (validation)")
        train, val = records.subset(split["train"]), records.subset(split["val"])
        info = {
            **PTBXL_DATA,
            "data_dir": str(args.data_dir),
            "labels_csv": str(args.labels) if args.labels else None,
            "label_set": args.label_set,
            "train_records": len(train.ids),
            "val_records": len(val.ids),
            "folds": {"train": "1-8", "validation": 9, "test": "10 (never used by training)"},
        }
        aux_classes, y_train_aux = auxiliary_targets(args.data_dir, args.aux_labels, train.ids, args.sampling_rate)
        if aux_classes:
            info["auxiliary_targets"] = {"sources": [str(a) for a in args.aux_labels], "classes": len(aux_classes),
                                         "weight": args.aux_weight}
        return TaskData(
            x_train=load_signals(args.data_dir, train, cache_dir=args.cache_dir, sampling_rate=args.sampling_rate),
            y_train=train.labels,
            x_val=load_signals(args.data_dir, val, cache_dir=args.cache_dir, sampling_rate=args.sampling_rate),
            y_val=val.labels,
            classes=records.classes,
            multi_label=True,
            sample_rate=args.sampling_rate,
            leads=list(LEADS),
            info=info,
            aux_classes=aux_classes,
            y_train_aux=y_train_aux,
        )
    if args.aux_labels:
        raise DataError("--aux-labels needs --task ptbxl (the extra label tables are joined on ecg_id)")
    data = load_ucr(args.data_dir)
    k = len(data.classes)
    # Validation carved from TRAIN, stratified, so model selection never sees TEST.
    rng = np.random.default_rng(args.seed)
    val_idx = []
    for c in range(k):
        members = rng.permutation(np.flatnonzero(data.y_train == c))
        val_idx.extend(members[: max(1, round(len(members) * args.val_fraction))] if len(members) > 1 else [])
    val_mask = np.zeros(len(data.y_train), bool)
    val_mask[val_idx] = True
    return TaskData(
        x_train=data.x_train[~val_mask],
        y_train=one_hot(data.y_train[~val_mask], k),
        x_val=data.x_train[val_mask],
        y_val=one_hot(data.y_train[val_mask], k),
        classes=data.classes,
        multi_label=False,
        sample_rate=args.sampling_rate,
        leads=["signal"],
        info={"name": Path(args.data_dir).name, "format": "UCR", "data_dir": str(args.data_dir)},
        x_test=data.x_test,
        y_test=one_hot(data.y_test, k),
    )


def fit_normalisation(x: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead mean / std over every training sample, in chunks (x may be a memmap larger than memory)."""
    total = np.zeros(x.shape[-1])
    total_sq = np.zeros(x.shape[-1])
    count = 0
    for i in range(0, len(x), chunk):
        part = np.asarray(x[i : i + chunk], dtype=np.float64).reshape(-1, x.shape[-1])
        total += part.sum(0)
        total_sq += (part**2).sum(0)
        count += len(part)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def mixup(x, targets, rng: np.random.Generator, alpha: float):
    """Mixup (Zhang et al., 2018) of one training batch: with lam ~ Beta(alpha, alpha), folded to max(lam, 1 - lam)
    so that each row's own record dominates, and one permutation `perm` of the batch, returns
    (lam * x + (1 - lam) * x[perm], [lam * t + (1 - lam) * t[perm] for t in targets]) as new arrays; the inputs are
    not changed. x and each target are numpy arrays or torch tensors with the batch on the first axis (0/1 labels
    become soft ones: BCE and cross-entropy both take them). alpha <= 0: x and targets unchanged, and no random
    numbers drawn, so a run without mixup keeps its random stream."""
    if alpha <= 0:
        return x, list(targets)
    lam = float(rng.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = rng.permutation(len(x))
    return lam * x + (1.0 - lam) * x[perm], [lam * t + (1.0 - lam) * t[perm] for t in targets]


@torch.no_grad()
def predict(model: MSSSMClassifier, x: np.ndarray, device, batch_size: int) -> np.ndarray:
    """Class probabilities after each whole window (the last step of causal mean pooling)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.array(x[i : i + batch_size], dtype=np.float32)).to(device)
        out.append(model.probabilities(model(xb)[:, -1]).float().cpu().numpy())
    return np.concatenate(out)


def resize_head(model: MSSSMClassifier, n_classes: int) -> MSSSMClassifier:
    """A copy of `model` whose head has `n_classes` outputs: the first ones keep their weights (new ones start as a
    fresh layer's). Cuts the auxiliary outputs of multi-task training off before a checkpoint is written, and widens
    a warm-start checkpoint's head for them; the same model otherwise, so its main outputs are unchanged."""
    if n_classes == model.cfg.n_classes:
        return model
    resized = MSSSMClassifier(dataclasses.replace(model.cfg, n_classes=n_classes)).to(model.input_mean.device)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    keep = min(n_classes, model.cfg.n_classes)
    with torch.no_grad():
        resized.head.weight[:keep] = model.head.weight[:keep]
        resized.head.bias[:keep] = model.head.bias[:keep]
    resized.load_state_dict({**resized.state_dict(), **state})
    return resized.train(model.training)


def supervised_steps(logits: torch.Tensor, supervise_from: int) -> torch.Tensor:
    """[B, L, C] per-step logits -> the steps the loss sees, [B, L', C]: the last one (supervise_from <= 0), or every
    step from the `supervise_from`-th sample on. A stream is served a prediction every hop, each one the pooled
    features so far, so each can be trained as one; a crop shorter than `supervise_from` gives its last step."""
    if supervise_from <= 0:
        return logits[:, -1:]
    return logits[:, min(supervise_from, logits.shape[1]) - 1 :]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """BCE or cross-entropy against 0/1 targets, or soft ones (a mix with a teacher's probabilities, or of two
    records' labels by mixup). Cross-entropy is given the targets as class probabilities, so a soft row t gives
    -sum_k t_k log softmax(logits)_k: the same mix of the two records' losses."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


def load_teachers(paths: list[str], classes: list[str], sample_rate: int) -> list:
    """The teacher models (checkpoints or exported model directories), each checked for the data's classes and rate."""
    from training.evaluate import load_model

    teachers = []
    for path in paths:
        try:
            # An exported teacher runs on as many threads as the trainer, not on every core beside it.
            teachers.append(load_model(Path(path), classes, sample_rate, threads=torch.get_num_threads()))
        except (CheckpointError, DataError) as err:
            raise DataError(f"--teacher: {err}") from err
    return teachers


def teacher_targets(paths: list[str], x: np.ndarray, classes: list[str], sample_rate: int) -> np.ndarray:
    """[n, K]: the average probabilities of the teacher models after each whole training window, for distillation."""
    from training.evaluate import last_step_probabilities

    probs = [last_step_probabilities(model, x) for model in load_teachers(paths, classes, sample_rate)]
    return np.mean(probs, axis=0).astype(np.float32)


@torch.no_grad()
def crop_teacher_probabilities(teachers: list, crops: np.ndarray, device) -> torch.Tensor:
    """[B, L, K]: the teachers' average probabilities at every step of exactly the crops the student sees, each
    from the zero state. A causal student is asked at step t what the teachers say from the same t samples, not
    what they say after a whole window the crop may hold only a quarter of. Checkpoint teachers must already be on
    `device` (and in eval mode, as loaded)."""
    from training.evaluate import step_probabilities

    total = None
    for teacher in teachers:
        if isinstance(teacher, torch.nn.Module):
            probs = teacher.probabilities(teacher(torch.from_numpy(crops).to(device))).float()
        else:  # an exported model through onnxruntime
            probs = torch.from_numpy(step_probabilities(teacher, crops)).to(device)
        total = probs if total is None else total + probs
    return total / len(teachers)


def computed_on_rank0(compute, world: int, is_main: bool):
    """compute() on rank 0 only, its result handed to every rank (under torchrun, work such as scoring the teachers
    is done once, not once per process). Rank 0's DataError is handed on too, so that no rank waits forever."""
    if world == 1:
        return compute()
    box = [None]
    if is_main:
        try:
            box[0] = (True, compute())
        except (DataError, CheckpointError) as err:
            box[0] = (False, str(err))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise DataError(value)
    return value


def validation_loss(probs: np.ndarray, targets: np.ndarray, multi_label: bool) -> float:
    """The training loss of predicted probabilities (BCE or cross-entropy), from probabilities clamped off 0 and 1."""
    p = torch.from_numpy(probs)
    if multi_label:
        return float(loss_fn(torch.logit(p.clamp(1e-6, 1 - 1e-6)), torch.from_numpy(targets), True))
    return float(F.nll_loss(torch.log(p.clamp_min(1e-9)), torch.from_numpy(targets.argmax(-1))))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def plot_curves(out: Path, history: list[dict], classes: list[str], y_val, p_val) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_macro_auroc"] for h in history])
    ax2.set(xlabel="epoch", ylabel="macro AUROC", title="validation macro AUROC")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for k, name in enumerate(classes):
        if 0 < y_val[:, k].sum() < len(y_val):
            fpr, tpr, _ = roc_curve(y_val[:, k], p_val[:, k])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="validation ROC (best checkpoint)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc_curves.png", dpi=100)
    plt.close(fig)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def train(args) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    if world > 1 and not is_main:
        dist.barrier()  # rank 0 decodes the records into the cache first; the others then map it
    data = load_task(args)
    if world > 1 and is_main:
        dist.barrier()
    window = data.x_val.shape[1]
    crop = args.crop if args.crop is not None else (250 if args.task == "ptbxl" else 0)
    n_main = len(data.classes)
    cfg = ModelConfig(
        n_channels=data.x_train.shape[-1],
        n_classes=n_main + len(data.aux_classes),
        multi_label=data.multi_label,
        d_model=args.d_model,
        n_layers=args.n_layers,
        d_state=args.d_state,
        n_scales=args.n_scales,
        ssm=args.ssm,
        a_init=args.a_init,
        mixer=args.mixer,
        dropout=args.dropout,
        lead_mask=args.lead_subsets,
    )
    if args.init:
        # Warm start (e.g. a second cosine cycle): weights and architecture from a checkpoint, a fresh optimiser and
        # schedule. The model flags are ignored; the data must have the checkpoint's classes and sample rate.
        from training.evaluate import load_model

        try:
            model = load_model(Path(args.init), data.classes, data.sample_rate, weights=True)
        except (CheckpointError, DataError) as err:
            raise DataError(f"--init: {err}") from err
        model = resize_head(model, n_main + len(data.aux_classes))
        cfg = model.cfg
        model.train()
    else:
        model = MSSSMClassifier(cfg)
    # Distillation: the loss's targets are (1 - w) * labels + w * the teachers' probabilities (for BCE and
    # cross-entropy alike this is the same as mixing the two losses with these weights).
    soft, crop_teachers = None, []
    if args.teacher and args.distill_on == "crop":
        # Moved to the training device once here, not on every step.
        crop_teachers = [t.to(device) if isinstance(t, torch.nn.Module) else t
                         for t in load_teachers(args.teacher, data.classes, data.sample_rate)]
    elif args.teacher:
        if is_main:
            print(f"distillation: scoring {len(data.x_train)} training windows with {len(args.teacher)} teacher(s)",
                  file=sys.stderr)
        soft = computed_on_rank0(lambda: teacher_targets(args.teacher, data.x_train, data.classes, data.sample_rate),
                                 world, is_main)
    if args.teacher:
        data.info["distillation"] = {"teachers": [str(t) for t in args.teacher], "weight": args.distill_weight,
                                     "on": args.distill_on}
    if args.mixup > 0:
        data.info["mixup"] = {"alpha": args.mixup}
    mean, std = fit_normalisation(data.x_train)
    model.input_mean.copy_(torch.from_numpy(mean))
    model.input_std.copy_(torch.from_numpy(std))
    model.to(device)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Norm gains, biases, SSM dynamics (A_log, D, dt) and wavelet taps are not weight-decayed, as in Mamba.
        (no_decay if p.dim() < 2 or "A_log" in name or ".D" in name or "dt_" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps_per_epoch = max(1, len(data.x_train) // (args.batch_size * world))
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    total_steps = steps_per_epoch * args.epochs
    warmup = min(total_steps // 2, round(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    use_amp = device.type == "cuda" and not args.no_amp
    # An exponential moving average of the weights, scored beside the raw weights once the run is a quarter
    # through; the better of the two on validation is the epoch's candidate for the best checkpoint.
    # Its horizon, 1 / (1 - decay) steps, is capped at a fifth of the run (and at least 2 steps): a short run's
    # average would otherwise still be mostly its first, untrained weights (0.998 is kept from 2,500 steps on).
    ema_decay = min(args.ema, max(0.5, 1 - 5 / total_steps)) if args.ema else 0.0
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True) if ema_decay > 0 else None

    history: list[dict] = []
    start_epoch, best, seconds_before = 0, (-math.inf, -math.inf), 0.0  # (AUROC, -loss) of the best epoch
    last_path = out / "last.pt"
    # What a step means: a resumed run must have the same (a different --epochs only moves the end of the cosine).
    schedule = {"steps_per_epoch": steps_per_epoch, "batch_size": args.batch_size, "world_size": world}
    if args.resume and last_path.exists():
        saved, _, payload = load_checkpoint(last_path)
        if saved.cfg != cfg:
            raise DataError(f"--resume: {last_path} holds a model of another architecture ({saved.cfg}); resume "
                            "with the flags it was started with, or start a new --out")
        if payload.get("schedule", schedule) != schedule:
            raise DataError(f"--resume: {last_path} was trained with {payload['schedule']}, this run would use "
                            f"{schedule}; resume with the same --batch-size, --steps-per-epoch and number of "
                            "processes (or warm-start a new run with --init)")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        start_epoch, best, history = payload["epoch"], payload["best"], payload["history"]
        best = tuple(best) if isinstance(best, (list, tuple)) else (best, -math.inf)  # runs saved before the tie rule
        seconds_before = payload.get("train_seconds", 0.0)
        if ema is not None and payload.get("ema") is not None:
            ema.load_state_dict(payload["ema"])
        if payload.get("torch_rng") is not None:  # dropout masks continue as if never interrupted
            torch.set_rng_state(payload["torch_rng"])
        if is_main:
            print(f"resumed from {last_path} after epoch {start_epoch}", file=sys.stderr)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    y_val = data.y_val.astype(np.float32)
    parity_windows = torch.from_numpy(np.array(data.x_val[: args.parity_windows], dtype=np.float32))
    meta = {
        "labels": data.classes,
        "multi_label": data.multi_label,
        "sample_rate": data.sample_rate,
        "leads": data.leads,
        "window": int(window),
        "default_hop": 25,
        "task": args.task,
        "label_set": args.label_set if args.task == "ptbxl" else None,
        "data": data.info,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "train_crop": crop,
        "parity_windows": parity_windows,
    }
    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        net.train()
        epoch_start = time.time()
        rng = np.random.default_rng(args.seed * 1000 + epoch)  # same permutation on every rank
        order = rng.permutation(len(data.x_train))[rank::world]
        # Crops and augmentation: rank 0 goes on with the epoch's stream (a single process is unchanged by DDP's
        # existence), every other rank draws from its own.
        rng = rng if rank == 0 else np.random.default_rng([args.seed, epoch, rank])
        losses, seen = [], 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main, file=sys.stderr)
        for step in bar:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            crops = augment(random_crops(data.x_train, idx, crop, rng), rng, args.amp_jitter, args.noise_std)
            if cfg.lead_mask:
                crops = mask_leads(crops, rng, data.leads)
            yb = torch.from_numpy(data.y_train[idx].astype(np.float32)).to(device)
            if soft is not None:
                yb = (1 - args.distill_weight) * yb + args.distill_weight * torch.from_numpy(soft[idx]).to(device)
            per_record = [yb]
            if data.aux_classes:
                per_record.append(torch.from_numpy(data.y_train_aux[idx]).to(device))
            # Mixup (--mixup 0: unchanged, nothing drawn): the crops, then the per-record targets with the same mix;
            # per-step crop teachers below score the mixed crops, as the student sees them.
            crops, per_record = mixup(crops, per_record, rng, args.mixup)
            yb = per_record[0]
            xb = torch.from_numpy(crops).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = supervised_steps(net(xb), args.supervise_from).float()
            targets = yb[:, None].expand(-1, logits.shape[1], -1)
            if crop_teachers:
                taught = supervised_steps(crop_teacher_probabilities(crop_teachers, crops, device), args.supervise_from)
                targets = (1 - args.distill_weight) * targets + args.distill_weight * taught
            loss = loss_fn(logits[..., :n_main].flatten(0, 1), targets.flatten(0, 1), data.multi_label)
            if data.aux_classes:
                # Each task's BCE is a mean over its own classes, so many auxiliary classes do not drown the main ones.
                aux = per_record[1][:, None].expand(-1, logits.shape[1], -1)
                loss = loss + args.aux_weight * F.binary_cross_entropy_with_logits(logits[..., n_main:], aux)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(loss.item())
            seen += len(idx) * world
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", rec_s=f"{seen / (time.time() - epoch_start):.0f}")
        if not is_main:
            continue
        # What would be served: the main outputs only.
        candidates = {"raw": resize_head(model, n_main)}
        if ema is not None and epoch + 1 > args.epochs // 4:
            candidates["ema"] = resize_head(ema.module, n_main)
        scored = {name: predict(m, data.x_val, device, args.eval_batch_size) for name, m in candidates.items()}
        aurocs = {name: macro_auroc(y_val, p) for name, p in scored.items()}
        val_losses = {name: validation_loss(p, y_val, data.multi_label) for name, p in scored.items()}
        # Ties in AUROC (a small set separated perfectly from the first epoch on) go to the lower loss: otherwise an
        # untrained model that merely ranks right would be kept.
        rank_of = {name: (float(np.nan_to_num(aurocs[name], nan=-1.0)), -val_losses[name]) for name in scored}
        chosen = max(rank_of, key=rank_of.get)
        p_val, auroc, val_loss = scored[chosen], aurocs[chosen], val_losses[chosen]
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_macro_auroc": auroc,
            "weights": chosen,
            **{f"val_macro_auroc_{name}": value for name, value in aurocs.items()},
            "val_per_class_auroc": per_class_auroc_by_name(data.classes, y_val, p_val),
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.time() - epoch_start,
            "train_records_per_s": seen / (time.time() - epoch_start),
        }
        history.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "val_per_class_auroc"}), file=sys.stderr)
        if rank_of[chosen] > best:
            best = rank_of[chosen]
            meta["validation"] = {"macro_auroc": auroc, "epoch": epoch + 1, "weights": chosen,
                                  "per_class_auroc": record["val_per_class_auroc"]}
            save_checkpoint(out / "checkpoint.pt", candidates[chosen], meta)
        save_checkpoint(
            last_path, model, meta, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            epoch=epoch + 1, best=best, history=history, ema=ema.state_dict() if ema is not None else None,
            schedule=schedule, torch_rng=torch.get_rng_state(), train_seconds=seconds_before + time.time() - t_start,
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not is_main:
        return {}

    best_model, best_meta, _ = load_checkpoint(out / "checkpoint.pt")
    best_model.to(device)
    p_val = predict(best_model, data.x_val, device, args.eval_batch_size)
    metrics = {
        "task": args.task,
        "classes": data.classes,
        "config": best_model.cfg.to_dict(),
        "data": data.info,
        "command": meta["command"],
        "device": str(device),
        "world_size": world,
        "ema_decay": ema_decay,
        "epochs": history,
        "best": {**best_meta["validation"], **{f"bootstrap_{k}": v for k, v in
                 bootstrap_macro_auroc(y_val, p_val, n_boot=args.n_boot).items()}},
        "train_wall_seconds": seconds_before + time.time() - t_start,
    }
    if best_model.cfg.lead_mask:
        # A lead-subset model is scored on the subsets devices record; the table goes into the model card.
        subsets = {}
        for keep in (data.leads, ["I", "II"], ["II"]):
            if not set(keep) <= set(data.leads):
                continue
            p_sub = predict(best_model, keep_leads(data.x_val, data.leads, keep), device, args.eval_batch_size)
            subsets["+".join(keep) if len(keep) < len(data.leads) else "all"] = {
                "leads": list(keep), "macro_auroc": macro_auroc(y_val, p_sub),
                **{f"bootstrap_{k}": v for k, v in bootstrap_macro_auroc(y_val, p_sub, n_boot=args.n_boot).items()}}
        metrics["lead_subsets"] = subsets
        best_meta["validation"]["lead_subsets"] = subsets
        save_checkpoint(out / "checkpoint.pt", best_model.cpu(), best_meta)
    if data.x_test is not None:  # UCR: TEST is scored once, with the checkpoint chosen on validation
        p_test = predict(best_model, data.x_test, device, args.eval_batch_size)
        metrics["test_accuracy"] = float((p_test.argmax(-1) == data.y_test.argmax(-1)).mean())
        metrics["test_macro_auroc"] = macro_auroc(data.y_test, p_test)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(out, history, data.classes, y_val, p_val)
    return metrics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["ptbxl", "ucr"], required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--cache-dir", default=None,
                   help="where decoded signals are cached (default: $MSSSM_CACHE_DIR, else ~/.cache/msssm)")
    p.add_argument("--label-set", default="superdiagnostic")
    p.add_argument("--labels", help="label table CSV: ecg_id, strat_fold, filename_lr, then one 0/1 column per class")
    p.add_argument("--sampling-rate", type=int, default=100, choices=[100, 500])
    p.add_argument("--ssm", choices=["s6", "s4"], default="s6")
    p.add_argument("--n-scales", type=int, default=3)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-layers", type=int, default=3)
    p.add_argument("--d-state", type=int, default=4)
    p.add_argument("--a-init", choices=["scale", "mamba"], default="scale")
    p.add_argument("--mixer", choices=["input", "static", "softmax"], default="input")
    p.add_argument("--lead-subsets", action="store_true",
                   help="train on random lead subsets (missing leads as NaN) so the model serves any subset")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=None, help="default: 30 for ptbxl, 150 for ucr")
    p.add_argument("--batch-size", type=int, default=None, help="default: 48 for ptbxl, 16 for ucr")
    # Small evaluation batches keep a whole 10 s window's activations in cache: on this 2-core CPU, 1,000-sample
    # windows score ~40 % faster in batches of 16 than of 128 (the training step itself works on 2.5 s crops).
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.998,
                   help="decay of the moving average of the weights scored beside them (0: off); short runs use "
                        "less, so that the average spans at most a fifth of the run")
    p.add_argument("--crop", type=int, default=None, help="training crop in samples (default: 250 for ptbxl, whole series for ucr)")
    p.add_argument("--supervise-from", type=int, default=None,
                   help="loss on every step from this many samples on (0: the last step of the crop only; "
                        "default: 100 for ptbxl, 0 for ucr)")
    p.add_argument("--amp-jitter", type=float, default=0.0, help="training: per-record gain in [1/(1+a), 1+a]")
    p.add_argument("--noise-std", type=float, default=0.0, help="training: white noise std, in the signal's units")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="training: mixup of each batch, lam * x + (1 - lam) * x[perm] and the same for the targets, "
                        "lam = max(l, 1 - l), l ~ Beta(ALPHA, ALPHA) (0: off)")
    p.add_argument("--aux-labels", nargs="+", default=[], metavar="SOURCE",
                   help="ptbxl: multi-task training on more label sets of the same records (label table CSVs, e.g. "
                        "labels/subdiagnostic.csv, or set names for the official metadata); their outputs are cut "
                        "off the head before a checkpoint is written")
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary targets' loss")
    p.add_argument("--teacher", nargs="+", default=[], metavar="MODEL",
                   help="distil from these models (checkpoints or model directories, same classes and rate): their "
                        "averaged probabilities after each training window are mixed into the targets")
    p.add_argument("--distill-on", choices=["window", "crop"], default="window",
                   help="window: the teachers' probabilities after each whole training window, scored once before "
                        "training; crop: their probabilities at every step of each training crop, scored every step")
    p.add_argument("--distill-weight", type=float, default=0.5, help="share of the teachers in the targets (0-1)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="ucr: share of TRAIN held out for validation")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap on optimiser steps per epoch (0: a full pass)")
    p.add_argument("--parity-windows", type=int, default=8, help="validation windows stored for export's parity check")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--init", help="start from this checkpoint's weights and config (new optimiser and schedule)")
    args = p.parse_args(argv)
    if not 0.0 <= args.distill_weight <= 1.0:
        p.error(f"--distill-weight must be in 0..1, got {args.distill_weight}")
    if not 0.0 <= args.mixup < math.inf:  # also refuses nan
        p.error(f"--mixup must be a finite number >= 0 (0: off), got {args.mixup}")
    # A UCR ECG set has ~100 short training series: batches of 64 would give one optimiser step per epoch, so small
    # sets get small batches and more epochs (ECG200: 5 steps per epoch, 750 in all).
    small = args.task == "ucr"
    if args.epochs is None:
        args.epochs = 150 if small else 30
    # PTB-XL: the bundled recipe (models/default/README.md): batches of 48, the loss on every step from the 100th
    # sample (1 s), since a stream is served a prediction at every hop.
    if args.batch_size is None:
        args.batch_size = 16 if small else 48
    if args.supervise_from is None:
        args.supervise_from = 0 if small else 100
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        metrics = train(args)
    except (DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if metrics:
        best = metrics["best"]
        print(json.dumps({"out": args.out, "val_macro_auroc": best["macro_auroc"], "ci95": [best["bootstrap_ci_low"],
              best["bootstrap_ci_high"]], "epoch": best["epoch"], **{k: metrics[k] for k in ("test_accuracy",
              "test_macro_auroc") if k in metrics}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
