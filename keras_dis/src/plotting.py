"""`plot_monitor`: the curves of a `DistillationMonitor`, with matplotlib."""

from keras_dis.src.monitor import MONITOR_METRICS

# The monitor's quantities that are fractions in [0, 1], drawn on one panel
# (all but the loss).
FRACTIONS = tuple(name for name in MONITOR_METRICS if name != "full_kd_loss")


def plot_monitor(monitor, path=None, title=None):
    """Draws a `DistillationMonitor`'s measurements against training steps.

    Two panels share the step axis: the exact full-KD loss, and the
    fractions (teacher agreement, accuracy, gradient cosine, effective
    sample size). The proposal's right Laplace scale `b2` (which
    `ProposalScheduler` anneals) is drawn on a second axis of each, dashed,
    so a change of the estimator lines up with the proposal that caused it.

    Args:
        monitor: a `keras_dis.DistillationMonitor` after training, or its
            `history` (a list of dicts).
        path: optional file to save the figure to (its extension picks the
            format).
        title: optional figure title.

    Returns:
        The matplotlib `Figure`.

    Example:

    >>> history = [
    ...     {"step": s, "epoch": 0, "right_scale": 5.0 + s,
    ...      "full_kd_loss": 3.0 - 0.1 * s, "teacher_agreement": 0.1 * s,
    ...      "accuracy": 0.1 * s}
    ...     for s in (1, 2, 3)]
    >>> figure = plot_monitor(history)
    >>> len(figure.axes)
    4
    """
    try:
        # A bare Figure: no pyplot state, and the user's backend untouched.
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "plot_monitor needs matplotlib: pip install matplotlib"
        ) from error
    history = getattr(monitor, "history", monitor)
    if not history:
        raise ValueError(
            "The monitor has no measurements yet: pass it to fit() first. "
            f"Received: history={history!r}"
        )
    steps = [entry["step"] for entry in history]
    figure = Figure(figsize=(7, 6))
    loss_axes, fraction_axes = figure.subplots(2, 1, sharex=True)
    loss_axes.plot(steps, [e["full_kd_loss"] for e in history], marker="o",
                   label="full_kd_loss")
    loss_axes.set_ylabel("exact full-KD loss")
    for name in FRACTIONS:
        if name in history[0]:
            fraction_axes.plot(steps, [e[name] for e in history], marker="o",
                               label=name)
    fraction_axes.set_ylim(0, 1.02)
    fraction_axes.set_xlabel("training step")
    fraction_axes.set_ylabel("fraction")
    for axes in (loss_axes, fraction_axes):
        scale_axes = axes.twinx()
        scale_axes.plot(steps, [e["right_scale"] for e in history], "k--",
                        alpha=0.4, label="proposal b2")
        scale_axes.set_ylabel("proposal b2", color="0.4")
        lines, labels = axes.get_legend_handles_labels()
        scale_lines, scale_labels = scale_axes.get_legend_handles_labels()
        axes.legend(lines + scale_lines, labels + scale_labels, fontsize=8,
                    loc="best")
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure

