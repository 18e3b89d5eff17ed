"""The training loop: model and optimiser from the flags, epochs of random crops, selection on validation, resume.

`train(args)` is the whole run (fit.py is its CLI): `Run.start` builds or resumes, `Run.epoch` trains one pass and
scores the raw and averaged weights on validation, `Run.finish` scores the best checkpoint with a bootstrap interval
(and, for a lead-subset model, on the lead subsets devices record) and writes metrics.json and the plots.
Under torchrun each process trains its share of every batch (DDP); rank 0 alone validates and writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from msssm_serve.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from msssm_serve.config import ModelConfig
from msssm_serve.model import EnsembleClassifier, MSSSMClassifier, with_pool
from msssm_serve.training.augment import augment, keep_leads, mask_leads, mixup, random_crops
from msssm_serve.training.data import TaskData, fit_normalisation, fit_template, load_task
from msssm_serve.training.inference import load_model, window_probabilities
from msssm_serve.training.metrics import bootstrap_macro_auroc, macro_auroc, per_class_auroc_by_name
from msssm_serve.training.plots import plot_curves
from msssm_serve.training.recipe import apply_ucr_recipe, folds_wanted, mixup_for, patience_for, refit_wanted
from msssm_serve.training.ptbxl import DataError
from msssm_serve.training.ucr import load_ucr

# Lead subsets a lead-subset model is scored on after training (the model card's table).
SCORED_SUBSETS = (None, ["I", "II"], ["II"])  # None: all leads


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def supervised_steps(logits: torch.Tensor, supervise_from: int) -> torch.Tensor:
    """[B, L, C] per-step logits -> the steps the loss sees, [B, L', C]: the last one (supervise_from <= 0), or every
    step from the `supervise_from`-th sample on. A stream is served a prediction every hop, each one the pooled
    features so far, so each can be trained as one; a crop shorter than `supervise_from` gives its last step."""
    if supervise_from <= 0:
        return logits[:, -1:]
    return logits[:, min(supervise_from, logits.shape[1]) - 1 :]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """BCE (multi-label) or cross-entropy (single-label, targets one-hot)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


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


def build_model(args, data: TaskData) -> MSSSMClassifier:
    """A new model from the flags, or (--init) a checkpoint's weights and architecture for a warm start (a fresh
    optimiser and schedule; the data must have its classes and sample rate)."""
    if args.init:
        try:
            model = load_model(Path(args.init), data.classes, data.sample_rate, weights=True)
            model = with_pool(model, args.pool, extrema_from(data.x_train.shape[1], args.extrema_from))
        except (CheckpointError, DataError, ValueError) as err:
            raise DataError(f"--init: {err}") from err
        return model.train()
    return MSSSMClassifier(ModelConfig(
        n_channels=data.x_train.shape[-1], n_classes=len(data.classes), multi_label=data.multi_label,
        d_model=args.d_model, n_layers=args.n_layers, d_state=args.d_state, n_scales=args.n_scales, ssm=args.ssm,
        a_init=args.a_init, mixer=args.mixer, dropout=args.dropout, lead_mask=args.lead_subsets,
        pool=args.pool or "mean", extrema_from=extrema_from(data.x_train.shape[1], args.extrema_from),
        template_length=data.x_train.shape[1] if template_wanted(args) else 0))


def extrema_from(window: int, requested: int | None = None) -> int:
    """Where the running extremes start (mean_std_extrema): `requested` (--extrema-from), else a tenth of the window
    (PTB-XL's 10 s: the first second, while the SSMs settle from the zero state)."""
    return requested if requested is not None else window // 10


def template_wanted(args) -> bool:
    """--template on; `auto` is off for ptbxl, and for ucr decided on validation by `train` before a run starts."""
    return args.template == "on"


def selection_rank(task: str, auroc: float, loss: float) -> tuple[float, float]:
    """What choosing on validation maximises (epochs, raw or averaged weights, the template): macro AUROC, ties to
    the lower loss; for UCR the lower loss first, ties to the AUROC. A UCR validation split holds 5-100 series, where
    AUROC takes few values and jumps by chance (Herring's 13: 0.875 at an epoch whose model still predicted about the
    class prior, loss 0.660, against 0.521 later; docs/experiments.md), and saturates at 1.0 on most sets, where only
    its tie-break, the loss, decides anyway. PTB-XL's fold 9 (~2,000 records) is scored by AUROC, and selects on it."""
    auroc = float(np.nan_to_num(auroc, nan=-1.0))
    return (-loss, auroc) if task == "ucr" else (auroc, -loss)


def make_optimizer(model: MSSSMClassifier, args) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Norm gains, biases, SSM dynamics (A_log, D, dt) and wavelet taps are not weight-decayed, as in Mamba.
        (no_decay if p.dim() < 2 or "A_log" in name or ".D" in name or "dt_" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)


class Run:
    def __init__(self, args, refit: dict | None = None):
        """`refit`: this run trains on the whole of TRAIN (validation included) for `refit["epochs"]` epochs and
        keeps its last `refit["weights"]` (raw or averaged), as chosen on validation by an earlier run whose
        validation figures are `refit["best"]`."""
        self.args = args
        self.refit = refit
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.device = resolve_device(args.device)
        self.out = Path(args.out)

    # --- set-up ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        args, world = self.args, self.world
        if world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        if world > 1 and not self.is_main:
            dist.barrier()  # rank 0 decodes the records into the cache first; the others then map it
        self.data = data = load_task(args)
        if world > 1 and self.is_main:
            dist.barrier()
        self.recipe = apply_ucr_recipe(args, data.x_train) if args.task == "ucr" else None
        self.patience = patience_for(args) if self.refit is None else 0
        if self.refit is not None:
            data.x_train = np.concatenate([data.x_train, data.x_val])
            data.y_train = np.concatenate([data.y_train, data.y_val])
            args.epochs = self.refit["epochs"]
        crop = args.crop if args.crop is not None else (250 if args.task == "ptbxl" else 0)
        # below 1: a fraction of the series (window slicing, for sets of series of one length)
        self.crop = max(1, round(crop * data.x_train.shape[1])) if 0 < crop < 1 else int(crop)
        self.model = model = build_model(args, data)
        if model.cfg.template_length and model.cfg.template_length != data.x_train.shape[1]:
            raise DataError(f"the model's template holds {model.cfg.template_length} samples, these series "
                            f"{data.x_train.shape[1]}")
        if model.cfg.template_length and 0 < self.crop < data.x_train.shape[1]:
            raise DataError("--template compares each sample with the mean series at its position: it needs whole "
                            "series (no --crop), or --template off")
        mean, std = fit_normalisation(data.x_train)
        model.input_mean.copy_(torch.from_numpy(mean))
        model.input_std.copy_(torch.from_numpy(std))
        if model.cfg.template_length:
            template, template_std = fit_template(data.x_train, model.cfg.template_length)
            model.template.copy_(torch.from_numpy(template))
            model.template_std.copy_(torch.from_numpy(template_std))
        model.to(self.device)
        if self.is_main:
            cfg = model.cfg
            print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters (d_model {cfg.d_model}, "
                  f"{cfg.n_layers} layers, {cfg.n_scales} scales, lead subsets {cfg.lead_mask}); device {self.device}; "
                  f"{len(data.x_train)} training, {len(data.x_val)} validation records", file=sys.stderr)
        self.optimizer = make_optimizer(model, args)
        steps = max(1, len(data.x_train) // (args.batch_size * world))
        self.steps_per_epoch = min(steps, args.steps_per_epoch) if args.steps_per_epoch else steps
        total = self.steps_per_epoch * args.epochs
        warmup = min(total // 2, round(args.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, warmup))
        self.use_amp = self.device.type == "cuda" and not args.no_amp
        # An exponential moving average of the weights, scored beside the raw weights once the run is a quarter
        # through; the better of the two on validation is the epoch's candidate for the best checkpoint. Its horizon,
        # 1 / (1 - decay) steps, is capped at a fifth of the run (and at least 2 steps): a short run's average would
        # otherwise still be mostly its first, untrained weights (0.998 is kept from 2,500 steps on).
        self.ema_decay = min(args.ema, max(0.5, 1 - 5 / total)) if args.ema else 0.0
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.ema_decay), use_buffers=True) \
            if self.ema_decay > 0 else None
        self.history, self.start_epoch, self.seconds_before = [], 0, 0.0
        self.best = (-math.inf, -math.inf)  # selection_rank of the best epoch
        # What a step means: a resumed run must have the same (a different --epochs only moves the end of the cosine).
        self.schedule = {"steps_per_epoch": self.steps_per_epoch, "batch_size": args.batch_size, "world_size": world}
        if args.resume and (self.out / "last.pt").exists():
            self._resume(self.out / "last.pt")
        self.net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        self.meta = {
            "labels": data.classes, "multi_label": data.multi_label, "sample_rate": data.sample_rate,
            "leads": data.leads, "window": int(data.x_val.shape[1]),
            "default_hop": min(25, int(data.x_val.shape[1])), "task": args.task,
            "label_set": args.label_set if args.task == "ptbxl" else None, "data": data.info,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "train_crop": self.crop,
            "parity_windows": torch.from_numpy(np.array(data.x_val[: args.parity_windows], dtype=np.float32)),
        }

    def _resume(self, last_path: Path) -> None:
        saved, _, payload = load_checkpoint(last_path)
        if saved.cfg != self.model.cfg:
            raise DataError(f"--resume: {last_path} holds a model of another architecture ({saved.cfg}); resume "
                            "with the flags it was started with, or start a new --out")
        if payload.get("schedule", self.schedule) != self.schedule:
            raise DataError(f"--resume: {last_path} was trained with {payload['schedule']}, this run would use "
                            f"{self.schedule}; resume with the same --batch-size, --steps-per-epoch and number of "
                            "processes (or warm-start a new run with --init)")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.start_epoch, self.history = payload["epoch"], payload["history"]
        best = payload["best"]
        self.best = tuple(best) if isinstance(best, (list, tuple)) else (best, -math.inf)  # runs before the tie rule
        self.seconds_before = payload.get("train_seconds", 0.0)
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.load_state_dict(payload["ema"])
        if payload.get("torch_rng") is not None:  # dropout masks continue as if never interrupted
            torch.set_rng_state(payload["torch_rng"])
        if self.is_main:
            print(f"resumed from {last_path} after epoch {self.start_epoch}", file=sys.stderr)

    # --- one epoch --------------------------------------------------------------------------------------------------
    def epoch(self, epoch: int) -> None:
        args, data = self.args, self.data
        self.net.train()
        started = time.time()
        rng = np.random.default_rng(args.seed * 1000 + epoch)  # same permutation on every rank
        order = rng.permutation(len(data.x_train))[self.rank :: self.world]
        # Crops and augmentation: rank 0 goes on with the epoch's stream (a single process is unchanged by DDP's
        # existence), every other rank draws from its own.
        rng = rng if self.rank == 0 else np.random.default_rng([args.seed, epoch, self.rank])
        losses, seen = [], 0
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not self.is_main,
                   file=sys.stderr)
        for step in bar:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            crops = augment(random_crops(data.x_train, idx, self.crop, rng), rng, args.amp_jitter, args.noise_std)
            if self.model.cfg.lead_mask:
                crops = mask_leads(crops, rng, data.leads)
            labels = data.y_train[idx].astype(np.float32)
            crops, labels = mixup(crops, labels, rng, args.mixup)
            xb = torch.from_numpy(crops).to(self.device)
            yb = torch.from_numpy(labels).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                logits = supervised_steps(self.net(xb), args.supervise_from).float()
            targets = yb[:, None].expand(-1, logits.shape[1], -1)
            loss = loss_fn(logits.flatten(0, 1), targets.flatten(0, 1), data.multi_label)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            losses.append(loss.item())
            seen += len(idx) * self.world
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", rec_s=f"{seen / (time.time() - started):.0f}")
        if self.is_main and self.refit is not None:
            self._keep_last(epoch, float(np.mean(losses)), started)
        elif self.is_main:
            self._select(epoch, float(np.mean(losses)), started, seen)

    def _keep_last(self, epoch: int, train_loss: float, started: float) -> None:
        """A refit has nothing held out to select on: its weights after the chosen number of epochs are the model."""
        kept = self.ema.module if self.refit["weights"] == "ema" and self.ema is not None else self.model
        self.history.append({"epoch": epoch + 1, "train_loss": train_loss, "lr": self.scheduler.get_last_lr()[0],
                             "seconds": time.time() - started})
        if epoch + 1 == self.args.epochs:
            self.meta["validation"] = {**self.refit["best"], "refit": "retrained on all of TRAIN for the "
                                       "epochs chosen on validation; these figures are the selection run's"}
            save_checkpoint(self.out / "checkpoint.pt", kept, self.meta)
        self._save_resume_state(epoch)

    def _save_resume_state(self, epoch: int) -> None:
        """last.pt: everything `--resume` needs to continue after `epoch`."""
        save_checkpoint(
            self.out / "last.pt", self.model, self.meta, optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), epoch=epoch + 1, best=self.best, history=self.history,
            ema=self.ema.state_dict() if self.ema is not None else None, schedule=self.schedule,
            torch_rng=torch.get_rng_state(), train_seconds=self.train_seconds())

    def _select(self, epoch: int, train_loss: float, started: float, seen: int) -> None:
        """Score the raw and averaged weights on validation; keep the better as checkpoint.pt if it beats the best;
        write last.pt (the resume state)."""
        args, data = self.args, self.data
        y_val = data.y_val.astype(np.float32)
        candidates = {"raw": self.model}
        if self.ema is not None and epoch + 1 > args.epochs // 4:
            candidates["ema"] = self.ema.module
        scored = {name: window_probabilities(m, data.x_val, args.eval_batch_size, self.device,
                                             progress=f"validation ({name} weights)")
                  for name, m in candidates.items()}
        aurocs = {name: macro_auroc(y_val, p) for name, p in scored.items()}
        accuracy = None if data.multi_label else {
            name: float((p.argmax(-1) == y_val.argmax(-1)).mean()) for name, p in scored.items()}
        losses = {name: validation_loss(p, y_val, data.multi_label) for name, p in scored.items()}
        # Never AUROC alone: a small set separated perfectly from the first epoch on would keep an untrained model
        # that merely ranks right (see selection_rank).
        rank_of = {name: selection_rank(args.task, aurocs[name], losses[name]) for name in scored}
        chosen = max(rank_of, key=rank_of.get)
        record = {
            "epoch": epoch + 1, "train_loss": train_loss, "val_loss": losses[chosen],
            "val_macro_auroc": aurocs[chosen], "weights": chosen,
            **({"val_accuracy": accuracy[chosen]} if accuracy else {}),
            **{f"val_macro_auroc_{name}": value for name, value in aurocs.items()},
            "val_per_class_auroc": per_class_auroc_by_name(data.classes, y_val, scored[chosen]),
            "lr": self.scheduler.get_last_lr()[0], "seconds": time.time() - started,
            "train_records_per_s": seen / (time.time() - started),
        }
        self.history.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "val_per_class_auroc"}), file=sys.stderr)
        if rank_of[chosen] > self.best:
            self.best = rank_of[chosen]
            self.meta["validation"] = {"macro_auroc": aurocs[chosen], "epoch": epoch + 1, "weights": chosen,
                                       **({"accuracy": accuracy[chosen]} if accuracy else {}),
                                       "per_class_auroc": record["val_per_class_auroc"]}
            save_checkpoint(self.out / "checkpoint.pt", candidates[chosen], self.meta)
        self._save_resume_state(epoch)

    def stalled(self) -> bool:
        """Whether `patience` epochs have passed since the best one on validation (early stopping; the same answer on
        every rank)."""
        stop = False
        if self.patience and self.is_main and self.history:
            ranks = [selection_rank(self.args.task, e["val_macro_auroc"], e["val_loss"]) for e in self.history]
            best_epoch = self.history[ranks.index(max(ranks))]["epoch"]
            stop = self.history[-1]["epoch"] - best_epoch >= self.patience
        if self.patience and self.world > 1:
            flag = torch.tensor([int(stop)], device=self.device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    def train_seconds(self) -> float:
        return self.seconds_before + time.time() - self.t_start

    # --- the end ----------------------------------------------------------------------------------------------------
    def finish(self) -> dict:
        args, data = self.args, self.data
        y_val = data.y_val.astype(np.float32)
        best_model, best_meta, _ = load_checkpoint(self.out / "checkpoint.pt")
        best_model.to(self.device)
        metrics = {
            "task": args.task, "classes": data.classes, "config": best_model.cfg.to_dict(), "data": data.info,
            "command": self.meta["command"], "device": str(self.device), "world_size": self.world,
            "ema_decay": self.ema_decay, "epochs": self.history, "train_wall_seconds": self.train_seconds(),
            **({"early_stop": {"patience": self.patience, "after_epoch": len(self.history)}}
               if self.refit is None and len(self.history) < args.epochs else {}),
            **({"ucr_recipe": self.recipe} if self.recipe else {}),
        }
        if self.refit is not None:  # validation is in its training data: the selection run's figures stand
            metrics["best"] = self.refit["best"]
        else:
            print("scoring the best checkpoint on validation (bootstrap interval)", file=sys.stderr)
            p_val = window_probabilities(best_model, data.x_val, args.eval_batch_size, self.device)
            interval = bootstrap_macro_auroc(y_val, p_val, n_boot=args.n_boot)
            metrics["best"] = {**best_meta["validation"], **{f"bootstrap_{k}": v for k, v in interval.items()}}
        if best_model.cfg.lead_mask:
            subsets = score_lead_subsets(best_model, data, args.eval_batch_size, args.n_boot,
                                         (p_val, interval) if self.refit is None else None)
            metrics["lead_subsets"] = best_meta["validation"]["lead_subsets"] = subsets
            save_checkpoint(self.out / "checkpoint.pt", best_model.cpu(), best_meta)
        if data.x_test is not None:  # UCR: TEST is scored once, with the checkpoint chosen on validation
            metrics.update(scores_on_test(best_model, data, args.eval_batch_size))
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if self.refit is None:
            plot_curves(self.out, self.history, data.classes, y_val, p_val)
        return metrics


def score_lead_subsets(model: MSSSMClassifier, data: TaskData, batch: int, n_boot: int,
                       all_leads: tuple[np.ndarray, dict] | None = None) -> dict:
    """A lead-subset model on the subsets devices record, on the validation windows: the table of its model card.
    `all_leads`: the validation probabilities with every lead and their `bootstrap_macro_auroc`, where the caller
    has them already (a pass over the fold and ~15 s of resampling fewer)."""
    subsets = {}
    for keep in SCORED_SUBSETS:
        if keep is not None and not set(keep) <= set(data.leads):
            continue
        if keep is None and all_leads is not None:
            p, interval = all_leads
        else:
            x = data.x_val if keep is None else keep_leads(data.x_val, data.leads, keep)
            p = window_probabilities(model, x, batch)
            interval = bootstrap_macro_auroc(data.y_val, p, n_boot=n_boot)
        subsets["all" if keep is None else "+".join(keep)] = {
            "leads": list(data.leads if keep is None else keep), "macro_auroc": macro_auroc(data.y_val, p),
            **{f"bootstrap_{k}": v for k, v in interval.items()}}
    return subsets


def train(args) -> dict:
    """The whole run; -> metrics (rank 0; {} on the other ranks). With a refit (see recipe.py): the selection run
    in RUN_DIR/selection, then the model trained on all of TRAIN in RUN_DIR, its metrics holding both. A ucr run with
    `--template auto` selects twice, without and with the template (RUN_DIR/selection/template_off, template_on), and
    keeps the one that scores better on validation (`selection_rank`, as epochs are chosen): refitted,
    or with `--refit off` its checkpoint and metrics copied into RUN_DIR."""
    # (crops cannot be compared with the mean series at their position: auto is then off)
    choices = ["off", "on"] if args.template == "auto" and args.task == "ucr" and not args.crop else \
        ["on" if args.template == "on" else "off"]
    final_out = Path(args.out)
    # the folds are resolved once, from the size of TRAIN, for every run below
    n_train = len(load_ucr(args.data_dir).y_train) if args.task == "ucr" and args.folds is None else None
    args = argparse.Namespace(**{**vars(args), "folds": folds_wanted(args, n_train)})
    args.mixup = mixup_for(args)
    if args.folds > 1:
        return _train_cross_validated(args, choices, args.folds)
    if len(choices) == 1 and not refit_wanted(args):
        return _train_once(Run(argparse.Namespace(**{**vars(args), "template": choices[0]})))
    selections = {}
    for choice in choices:
        out = final_out / "selection" / f"template_{choice}" if len(choices) > 1 else final_out / "selection"
        selection_args = argparse.Namespace(**{**vars(args), "out": str(out), "template": choice})
        selections[choice] = (selection_args, _train_once(Run(selection_args)))
    if not all(metrics for _, metrics in selections.values()):
        return {}

    figures = {}  # validation macro AUROC and loss at each selection's chosen epoch
    for choice, (_, metrics) in selections.items():
        best = metrics["best"]
        figures[choice] = {"val_macro_auroc": best["macro_auroc"],
                           "val_loss": next(e["val_loss"] for e in metrics["epochs"] if e["epoch"] == best["epoch"])}
    chosen = max(choices, key=lambda c: selection_rank(args.task, figures[c]["val_macro_auroc"],
                                                       figures[c]["val_loss"]))
    selection_args, selection = selections[chosen]
    summary = {"dir": os.path.relpath(selection_args.out, final_out), "epochs_run": len(selection["epochs"]),
               "template": {c: {**f, "chosen": c == chosen} for c, f in figures.items()}}
    if not refit_wanted(args):  # the chosen selection run is the model
        for name in ("checkpoint.pt", *(p.name for p in Path(selection_args.out).glob("*.png"))):
            shutil.copyfile(Path(selection_args.out) / name, final_out / name)
        metrics = {**selection, "selection": {**summary, "promoted": True},
                   "train_wall_seconds": sum(m["train_wall_seconds"] for _, m in selections.values())}
    else:
        best = selection["best"]
        refit_args = argparse.Namespace(**{**vars(selection_args), "out": str(final_out)})
        # At least a quarter of the selection run: on a validation split of a few series, an early epoch can tie the
        # best.
        epochs = max(int(best["epoch"]), selection_args.epochs // 4)
        refit = {"epochs": epochs, "weights": best.get("weights", "raw"), "best": best}
        # a ucr run's recipe has resolved `auto` on the chosen selection's flags; elsewhere auto is one model
        members = 1 if selection_args.members == "auto" else int(selection_args.members)
        if members == 1:
            metrics = _train_once(Run(refit_args, refit=refit))
        else:
            metrics = _train_ensemble(refit_args, refit, members)
        metrics["selection"] = {**{k: selection[k] for k in ("test_accuracy", "test_macro_auroc") if k in selection},
                                **summary}
    (final_out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _train_cross_validated(args, choices: list[str], folds: int) -> dict:
    """Selection by cross-validation (`--folds`): for each template choice, a run per stratified fold of TRAIN
    (RUN_DIR/selection/template_X/fold_K, from seed --seed + K, each stopped on its fold); the choice whose folds' out-of-fold predictions,
    all of TRAIN, score better (`selection_rank`) is kept, and its fold models are served as one ensemble in
    RUN_DIR/checkpoint.pt, scored on TEST once. A validation fold of a small set holds 5-20 series, too few to tell
    two recipes apart, but the folds together score every training series once; each model is trained on all but a
    fold, and the folds' models differ in their data as well as their seed, which is what an ensemble needs.
    -> the first fold's metrics with the ensemble's TEST figures, the choices' out-of-fold figures, each fold's."""
    final_out = Path(args.out)
    figures, fold_runs, oof = {}, {}, {}
    for choice in choices:
        base = final_out / "selection" / (f"template_{choice}" if len(choices) > 1 else "cv")
        runs, fold_metrics, oof_p, oof_y, loaded = [], [], [], [], []
        for k in range(folds):
            run = Run(argparse.Namespace(**{**vars(args), "out": str(base / f"fold_{k}"), "template": choice,
                                            "seed": args.seed + k, "cv_fold": k, "cv_folds": folds,
                                            "cv_seed": args.seed}))
            fold_metrics.append(_train_once(run))
            runs.append(run)
            if run.is_main:
                loaded.append(load_checkpoint(run.out / "checkpoint.pt"))  # kept: the ensemble, if this choice wins
                oof_p.append(window_probabilities(loaded[-1][0], run.data.x_val, args.eval_batch_size))
                oof_y.append(run.data.y_val)
        if not runs[0].is_main:
            return {}
        p, y = np.concatenate(oof_p), np.concatenate(oof_y).astype(np.float32)
        figures[choice] = {"oof_macro_auroc": macro_auroc(y, p), "oof_loss": validation_loss(p, y, False),
                           "oof_accuracy": float((p.argmax(-1) == y.argmax(-1)).mean()),
                           "dir": os.path.relpath(base, final_out)}
        fold_runs[choice], oof[choice] = (runs, fold_metrics, loaded), (y, p)
    chosen = max(choices, key=lambda c: selection_rank(args.task, figures[c]["oof_macro_auroc"], figures[c]["oof_loss"]))
    runs, fold_metrics, loaded = fold_runs[chosen]
    metrics = _keep_ensemble(runs, fold_metrics, final_out, {"folds": folds},
                             {"validation": {"cross_validated": figures[chosen], "folds": folds}},
                             lambda k, run, m: {"fold": k, "epoch": m["best"]["epoch"]}, loaded)
    best = {"macro_auroc": figures[chosen]["oof_macro_auroc"], "accuracy": figures[chosen]["oof_accuracy"],
            "loss": figures[chosen]["oof_loss"], "epoch": round(np.mean([m["best"]["epoch"] for m in fold_metrics])),
            "cross_validated": f"out-of-fold predictions of {folds} folds, all of TRAIN",
            **{f"bootstrap_{k}": v for k, v in bootstrap_macro_auroc(*oof[chosen], n_boot=args.n_boot).items()}}
    metrics.update(best=best,
                   train_wall_seconds=sum(m["train_wall_seconds"] for _, ms, _ in fold_runs.values() for m in ms),
                   selection={"cross_validation": {"folds": folds, "seed": args.seed},
                              "template": {c: {**f, "chosen": c == chosen} for c, f in figures.items()}})
    metrics.pop("early_stop", None)
    (final_out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _train_ensemble(args, refit: dict, members: int) -> dict:
    """`members` refits from seeds args.seed, args.seed + 1, ... (each a run of its own in RUN_DIR/members/K, resumable),
    saved together as one EnsembleClassifier in RUN_DIR/checkpoint.pt and scored on TEST as one model; -> the
    metrics of the first member with the ensemble's TEST figures, and each member's beside them."""
    out = Path(args.out)
    runs, member_metrics = [], []
    for k in range(members):
        run = Run(argparse.Namespace(**{**vars(args), "out": str(out / "members" / str(k)), "seed": args.seed + k}),
                  refit=refit)
        member_metrics.append(_train_once(run))
        runs.append(run)
    if not runs[0].is_main:
        return {}
    metrics = _keep_ensemble(runs, member_metrics, out, {}, {}, lambda k, run, m: {"seed": run.args.seed})
    metrics["train_wall_seconds"] = sum(m["train_wall_seconds"] for m in member_metrics)
    return metrics


def _keep_ensemble(runs: list, run_metrics: list[dict], out: Path, describe: dict, meta_extra: dict,
                   member_fields, loaded: list | None = None) -> dict:
    """The finished runs' checkpoints (`loaded`, as load_checkpoint gives them, where the caller has them already)
    saved as one EnsembleClassifier in out/checkpoint.pt (the first run's meta, `meta_extra`, and an `ensemble` block
    with `describe` in it) and scored on TEST once; -> the first run's metrics with the ensemble's config and TEST
    figures, and per member its dir, `member_fields(k, run, metrics)` and TEST figures. The refits
    (`_train_ensemble`) and the cross-validation folds (`_train_cross_validated`) both end here."""
    loaded = loaded or [load_checkpoint(run.out / "checkpoint.pt") for run in runs]
    ensemble = EnsembleClassifier([model for model, _, _ in loaded])
    meta = {**loaded[0][1], "ensemble": {"members": len(runs), **describe, "seeds": [run.args.seed for run in runs],
                                         "combined": "the mean of the members' probabilities at every step"},
            **meta_extra}
    save_checkpoint(out / "checkpoint.pt", ensemble, meta)
    metrics = {**run_metrics[0], "config": ensemble.cfg.to_dict(),
               "members": [{"dir": os.path.relpath(run.out, out), **member_fields(k, run, m),
                            **{key: m[key] for key in ("test_accuracy", "test_macro_auroc") if key in m}}
                           for k, (run, m) in enumerate(zip(runs, run_metrics))]}
    if runs[0].data.x_test is not None:  # as Run.finish scores one model: TEST once, by the model that is kept
        metrics.update(scores_on_test(ensemble, runs[0].data, runs[0].args.eval_batch_size))
    return metrics


def scores_on_test(model, data: TaskData, batch: int) -> dict:
    """TEST accuracy and macro AUROC of a model's last-step probabilities (a UCR set's TEST split)."""
    p_test = window_probabilities(model, data.x_test, batch)
    return {"test_accuracy": float((p_test.argmax(-1) == data.y_test.argmax(-1)).mean()),
            "test_macro_auroc": macro_auroc(data.y_test, p_test)}


def _train_once(run: Run) -> dict:
    run.start()
    run.t_start = time.time()
    for epoch in range(run.start_epoch, run.args.epochs):
        if run.stalled():  # (before the epoch: a resumed run that had stopped stays stopped)
            break
        run.epoch(epoch)
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run.finish() if run.is_main else {}
