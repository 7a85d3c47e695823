"""A few training steps of one fold on a fixed global batch, in one process or under torchrun (for
``tests/test_distributed.py``): every rank makes the same global batch, trains on its share of it, and rank 0
saves the weights, so a 2-process run can be compared with a 1-process run step for step.

    python tests/distributed_steps.py DATASET STEPS OUTPUT.pt            # one process
    torchrun --nproc_per_node 2 tests/distributed_steps.py DATASET STEPS OUTPUT.pt
"""

from __future__ import annotations

import sys

import torch

from autoseg import distributed
from autoseg.api.train import TrainingOptions
from autoseg.data.dataset import find_dataset
from autoseg.paths import preprocessed_folder, run_folder
from autoseg.plans import Plans
from autoseg.train.loading import make_loader
from trainers import get_trainer


def main(dataset: str, steps: int, output: str) -> None:
    raw = find_dataset(dataset)
    preprocessed = preprocessed_folder(raw.name)
    plans = Plans.from_json(preprocessed / "plans.json")
    configuration = plans.configuration()
    trainer_class = get_trainer(configuration.schedule.trainer)
    options = TrainingOptions(device="cpu", precision="fp32", num_processes=0, echo=False, validation=False)
    trainer = trainer_class(
        plans,
        configuration.name,
        0,
        preprocessed_folder=preprocessed,
        output_folder=run_folder(raw.name, configuration.name, trainer_class.__name__, 0),
        options=options,
        raw_dataset=raw,
    )
    trainer.setup()
    context = trainer.context
    share = [
        distributed.split_batch(trainer.stage.batch_size, distributed.DistributedContext(r, context.world_size))
        for r in range(context.world_size)
    ]
    start = sum(share[: context.rank])
    initial = {key: value.clone() for key, value in trainer.network.state_dict().items()}
    losses = []
    with make_loader(trainer.data_folder, trainer.train_cases, configuration, trainer.stage, 0, seed=7) as batches:
        for _ in range(steps):
            batch = next(batches)  # the same global batch on every rank
            mine = {key: batch[key][start : start + share[context.rank]] for key in ("data", "seg")}
            losses.append(trainer.train_step(mine))
    if context.is_main:
        torch.save(
            {"initial": initial, "network": trainer.network.state_dict(), "losses": torch.tensor(losses)}, output
        )
    distributed.leave()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
