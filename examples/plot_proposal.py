"""Plots the DIS proposal over teacher ranks as `ProposalScheduler` anneals it.

    python examples/plot_proposal.py --num-classes 100 --epochs 30 \
        --output docs/dis_proposal.png

One curve per epoch of the default schedule (the right Laplace scale grows
linearly from 5 ranks to `C` ranks), as in Fig. 3 and 5 of the paper.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_dis.src.proposals import LaplaceMixtureProposal  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--output", default="docs/dis_proposal.png")
    args = parser.parse_args(argv)

    proposal = LaplaceMixtureProposal()
    start, end = proposal.right_scale, float(args.num_classes)
    figure, axis = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 1, args.epochs))
    for epoch in range(args.epochs):
        right_scale = start + (end - start) * epoch / max(args.epochs - 1, 1)
        probabilities = proposal.rank_probabilities(args.num_classes, right_scale)
        label = (
            f"epoch {epoch + 1}: b2 = {right_scale:.0f}"
            if epoch in (0, args.epochs // 2, args.epochs - 1)
            else None
        )
        axis.plot(probabilities, color=colors[epoch], label=label)
    axis.set_xlabel("teacher rank (0 = teacher's top class)")
    axis.set_ylabel("proposal probability")
    axis.set_title(
        f"DIS proposal over {args.num_classes} ranks, b1 = 3 ranks, "
        f"b2 annealed {start:.0f} -> {end:.0f}"
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=100)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
