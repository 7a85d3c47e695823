"""``autoseg_train``: train one fold of a planned dataset (see ``autoseg.api.train``)."""

from __future__ import annotations

import argparse
import sys

import torch

from autoseg import distributed
from autoseg.api.train import TrainingOptions, cross_validate, prepare_run, train
from autoseg.commands.common import device, non_negative_int, positive_int, run, seed
from autoseg.machine import PRECISIONS
from trainers import Trainer, get_trainer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_train",
        description="Train one cross-validation fold. Outputs (log.txt, progress.png, checkpoints, validation/) go "
        "to AUTOSEG_RESULTS/<dataset>/<configuration>/<trainer>/fold_<k>/.",
    )
    p.add_argument(
        "-d", "--dataset", required=True, help="dataset name (ATLAS), number (1) or folder (Dataset001_ATLAS)"
    )
    p.add_argument("-c", "--configuration", help="configuration of the plans (default: the plans' default)")
    p.add_argument(
        "-f",
        "--fold",
        default="0",
        help="fold 0-4 of splits_final.json; 'all': every fold in turn "
        "(5-fold cross-validation); 'full': one model on every case "
        "(default 0)",
    )
    p.add_argument("-tr", "--trainer", help="trainer class in trainers/ (default: the plans' schedule.trainer)")
    p.add_argument(
        "--continue",
        dest="continue_training",
        action="store_true",
        help="resume from checkpoint_latest.pth of this fold",
    )
    p.add_argument(
        "--epochs", type=positive_int, help="train this many epochs instead of the plans' (stages scale along)"
    )
    p.add_argument("--iters-per-epoch", type=positive_int, help="training iterations per epoch instead of the plans'")
    p.add_argument(
        "--val-iters",
        type=non_negative_int,
        help="validation batches per epoch (default: a fifth of the training iterations; 0: none)",
    )
    p.add_argument(
        "--pretrained",
        metavar="PATH",
        help="PSPNet only: a torchvision ResNet state dict file (e.g. "
        "resnet50's weights saved on a machine with internet) or an "
        "autoseg PSPNet checkpoint; nothing is downloaded",
    )
    p.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start from the weights of MODEL: a model file from autoseg_export or a trained dataset's name (plan "
        "with autoseg_plan --like MODEL first, so they fit). Channels are matched by name; a new channel starts from "
        "zero weights. Fold k starts from MODEL's fold k, else its fold_full, else its first fold",
    )
    p.add_argument(
        "--init-fold", metavar="K", help="with --init-from: start every fold from MODEL's fold K (0, 1, ..., full)"
    )
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 on CUDA if supported else fp16; on the CPU bf16 only with AVX512-BF16/AMX",
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of initialization and batches (default 0)")
    p.add_argument(
        "-np",
        "--num-processes",
        type=non_negative_int,
        help="data augmentation processes (default: the plans' compute budget's choice, else 2)",
    )
    p.add_argument("--no-validation", action="store_true", help="skip predicting the validation cases at the end")
    p.add_argument("--compile", action="store_true", help="run the network through torch.compile")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="use deterministic algorithms only (slower on GPU) and keep the CPU thread count fixed",
    )
    p.add_argument(
        "--num-gpus",
        type=positive_int,
        default=1,
        metavar="N",
        help="train the fold data-parallel in N processes on this machine, one per GPU (torchrun + "
        "DistributedDataParallel; the plans' batch is split over them); with --device cpu, N CPU "
        "processes (gloo). Several machines: start torchrun yourself (documentation/overview.md)",
    )
    return p


def _trainer(args: argparse.Namespace) -> type[Trainer] | None:
    """The trainer class ``-tr`` names (resolved here, on the command line; the library takes the class), or None
    for the plans' own.

    Raises:
        UnknownNameError: no registered trainer has that name (the message lists them).
    """
    return get_trainer(args.trainer) if args.trainer else None


def _options(args: argparse.Namespace) -> TrainingOptions:
    """The run flags of the command line."""
    return TrainingOptions(
        epochs=args.epochs,
        iterations_per_epoch=args.iters_per_epoch,
        val_iterations=args.val_iters,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
        num_processes=args.num_processes,
        continue_training=args.continue_training,
        validation=not args.no_validation,
        compile=args.compile,
        deterministic=args.deterministic,
        pretrained=args.pretrained,
        init_from=args.init_from,
        init_fold=args.init_fold,
    )


def _without_num_gpus(argv: list[str]) -> list[str]:
    """``argv`` without ``--num-gpus N`` / ``--num-gpus=N`` (what each torchrun process gets)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--num-gpus":
            skip = True
        elif not token.startswith("--num-gpus="):
            kept.append(token)
    return kept


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``--num-gpus N``: check what needs no training here (its errors come once, not from every process), then run
    this command in N processes under torchrun."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device != "cpu" and (args.device.startswith("cuda") or gpus) and gpus < args.num_gpus:
        print(f"error: --num-gpus {args.num_gpus}: this machine has {gpus} CUDA device(s)", file=sys.stderr)
        return 1
    if args.device == "cpu" or (args.device == "auto" and gpus == 0):
        print(
            f"note: {'--device cpu' if args.device == 'cpu' else 'no CUDA device here'}: --num-gpus "
            f"{args.num_gpus} starts {args.num_gpus} CPU processes (gloo) that share this machine's cores",
            file=sys.stderr,
        )

    def check() -> None:
        if args.fold != "all":
            prepare_run(args.dataset, args.configuration, args.fold, _trainer(args), _options(args))

    status = run(check)
    return status if status != 0 else distributed.launch(_without_num_gpus(argv), args.num_gpus)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.num_gpus < 1:
        print(f"error: --num-gpus must be at least 1, got {args.num_gpus}", file=sys.stderr)
        return 2
    context = distributed.current()
    if args.num_gpus > 1 and not context.enabled:  # start torchrun, which runs this command in every process
        return _launch(args, argv)

    def action() -> int:
        options = _options(args)
        try:
            if args.fold == "all":
                for result in cross_validate(args.dataset, args.configuration, _trainer(args), options):
                    if context.is_main:
                        print(f"results: {result.output_folder}")
                return 0
            result = train(args.dataset, args.configuration, args.fold, _trainer(args), options)
        except KeyboardInterrupt:
            print(
                "interrupted; add --continue to the same command to resume from checkpoint_latest.pth", file=sys.stderr
            )
            return 130
        if context.is_main:
            print(f"results: {result.output_folder}")
        return 0

    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
