"""The run's plots: learning curves and the best checkpoint's validation ROC curves."""

from __future__ import annotations

from pathlib import Path


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
