"""``autoseg_pretrain``: pre-train a PSPNet backbone on the slices of a planned dataset (``autoseg.api.pretrain``)."""

from __future__ import annotations

import argparse
import sys

from autoseg.api.pretrain import pretrain_backbone
from autoseg.api.train import TrainingOptions
from autoseg.commands.common import device, non_negative_int, positive_int, run, seed
from autoseg.networks.pspnet import RESNET_LAYOUTS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_pretrain",
        description="Train a 2-D PSPNet on whole slices of a planned 3-D dataset (e.g. the axial slices of T1w MRI) "
        "and write its ResNet backbone in torchvision's layout, for autoseg_train --pretrained FILE. "
        "The run (log, progress plot, checkpoints) goes to "
        "AUTOSEG_RESULTS/<dataset>/2d_pspnet_pretraining/PSPNetTrainer/fold_full/.",
    )
    p.add_argument(
        "-d", "--dataset", required=True, help="a dataset planned with autoseg_plan (name, number or folder)"
    )
    p.add_argument("-o", "--output", required=True, help="weights file to write, e.g. resnet18_atlas_axial.pth")
    p.add_argument(
        "--backbone",
        default="resnet18",
        choices=sorted(RESNET_LAYOUTS),
        help="must match the backbone of the PSPNet it will initialise (default resnet18)",
    )
    p.add_argument("-c", "--configuration", help="3-D configuration whose data is sliced (default: the plans' default)")
    p.add_argument(
        "--slice-axis",
        type=int,
        default=2,
        choices=(0, 1, 2),
        help="axis of the (x, y, z) arrays the slices cross; 2 = axial for RAS/LPS scans (default)",
    )
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs (default 10)")
    p.add_argument("--iters-per-epoch", type=positive_int, default=50, help="iterations per epoch (default 50)")
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed, default=0, help="seed of initialization and batches (default 0)")
    p.add_argument(
        "-np", "--num-processes", type=non_negative_int, default=2, help="data augmentation processes (default 2)"
    )
    p.add_argument(
        "--continue",
        dest="continue_training",
        action="store_true",
        help="resume an interrupted pre-training from its checkpoint_latest.pth",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def action() -> int:
        options = TrainingOptions(
            device=args.device,
            seed=args.seed,
            num_processes=args.num_processes,
            continue_training=args.continue_training,
        )
        try:
            result = pretrain_backbone(
                args.dataset,
                args.output,
                backbone=args.backbone,
                configuration=args.configuration,
                slice_axis=args.slice_axis,
                epochs=args.epochs,
                iterations_per_epoch=args.iters_per_epoch,
                options=options,
            )
        except KeyboardInterrupt:
            print("interrupted; add --continue to the same command to resume", file=sys.stderr)
            return 130
        print(
            f"wrote {result.weights} ({result.tensors} tensors, {args.backbone}, torchvision layout) after "
            f"{result.epochs} epochs; run: {result.run_folder}"
        )
        print(f"next: autoseg_train -d DATASET -c 2d_pspnet --pretrained {result.weights}")
        return 0

    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
