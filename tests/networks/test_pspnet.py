"""PSPNet and its trainer: shapes and output stride, torchvision-layout weights (loaded exactly, mismatches and
pickles refused), the two fine-tuning phases, plateau and early stopping, and a tiny CTP-like run end to end.

Backbones are resnet18 on 64x64 slices on one CPU thread, so the file runs in well under a minute.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.api.plan import plan_and_preprocess
from autoseg.api.train import TrainingOptions, train
from autoseg.errors import AutosegError, InvalidFileError
from autoseg.infer.sliding_window import predict_slices
from autoseg.io.checkpoints import load_checkpoint
from autoseg.networks import CUDA_OVERHEAD_BYTES, PSPNet, on_meta
from autoseg.networks.pspnet import ResNetBackbone, backbone_of
from autoseg.plans import Plans, Stage
from trainers import get_trainer

CTP = "CTPTiny"
#: torchvision's ResNets' parameters without the classifier (``fc``).
TORCHVISION_PARAMETERS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}
QUIET = TrainingOptions(num_processes=0, echo=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(**kwargs) -> PSPNet:
    torch.manual_seed(0)
    return PSPNet(**{"in_channels": 5, "num_classes": 1, "backbone": "resnet18", **kwargs})


def _perturbed_backbone_file(path: Path, **changes: torch.Tensor) -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet18 state dict with random values (and torchvision's ``fc``), saved to ``path``."""
    torch.manual_seed(1)
    state = {
        name: (torch.randn_like(t) if t.is_floating_point() else t + 7)
        for name, t in ResNetBackbone("resnet18").state_dict().items()
    }
    state.update({"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}, **changes)
    torch.save(state, path)
    return state


# ---------------------------------------------------------------------------- network
def test_output_has_the_input_size_and_features_are_at_stride_8() -> None:
    net = _net(aux_head=True)
    x = torch.randn(2, 5, 64, 64)
    middle, features = net.backbone(net.initializer(x))
    assert middle.shape == (2, 256, 8, 8) and features.shape == (2, 512, 8, 8)
    main, aux = net(x)  # training mode with the auxiliary head
    assert main.shape == aux.shape == (2, 1, 64, 64)
    net.eval()
    assert net(torch.randn(1, 5, 50, 70)).shape == (1, 1, 50, 70)  # not a multiple of 8: still the input size
    assert net(x).shape == (2, 1, 64, 64)  # eval: the main logits alone


def test_initializer_maps_the_channels_to_three() -> None:
    net = _net(in_channels=4)
    assert isinstance(net.initializer[0], nn.BatchNorm2d) and net.initializer[0].num_features == 4
    assert net.initializer[1].weight.shape == (3, 4, 1, 1)
    assert net.initializer(torch.randn(2, 4, 16, 16)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_backbone_has_torchvision_names_and_sizes(name: str) -> None:
    backbone = ResNetBackbone(name)
    keys = set(backbone.state_dict())
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.bn1.running_mean",
        "layer2.0.downsample.0.weight",
        "layer4.1.conv2.weight",
        "layer3.1.bn2.num_batches_tracked",
    } <= keys
    assert ("layer1.0.conv3.weight" in keys) == (name == "resnet50")
    assert sum(p.numel() for p in backbone.parameters()) == TORCHVISION_PARAMETERS[name]
    net = on_meta(PSPNet, in_channels=5, num_classes=1, backbone=name)
    total = sum(p.numel() for p in net.parameters())
    assert net.counted_parameters() == pytest.approx(total, rel=1e-3)  # leaves out BatchNorm and bias of new layers
    one = net.training_memory_bytes(patch_size=(64, 64), batch_size=1)
    two = net.training_memory_bytes(patch_size=(64, 64), batch_size=2)
    assert 2 * one - two - CUDA_OVERHEAD_BYTES == 16 * net.counted_parameters()  # 16 bytes per parameter


@pytest.mark.parametrize("name, memory", [("resnet18", 834_619_264), ("resnet50", 1_441_167_360)])
def test_memory_estimate_is_the_one_plans_were_made_with(name: str, memory: int) -> None:
    """Bytes the planner estimated before the network counted itself (``networks/memory.py``), so plans do not
    change: 100x76 slices (the output stride does not divide them), batch 3, 4 bytes per activation."""
    net = on_meta(PSPNet, in_channels=5, num_classes=2, backbone=name)
    assert net.training_memory_bytes(patch_size=(100, 76), batch_size=3, bytes_per_activation=4) == memory


# ---------------------------------------------------------------------------- pre-trained weights
def test_torchvision_state_dict_loads_exactly_into_the_backbone(tmp_path: Path) -> None:
    saved = _perturbed_backbone_file(tmp_path / "resnet18.pth")
    net = _net()
    new_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("backbone.")}
    report = net.load_pretrained(tmp_path / "resnet18.pth")
    assert report.layout == "torchvision" and report.ignored == ["fc.bias", "fc.weight"]
    assert report.missing == [] and report.unexpected == []
    backbone = net.backbone.state_dict()
    assert set(report.loaded) == set(backbone)
    assert all(torch.equal(backbone[k], saved[k]) for k in backbone)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in new_before.items())  # new layers untouched
    assert "tensors loaded into the backbone" in str(report)


def test_missing_and_unexpected_tensors_are_reported(tmp_path: Path) -> None:
    saved = _perturbed_backbone_file(tmp_path / "w.pth")
    del saved["layer4.1.bn2.running_var"]
    saved["layer9.weight"] = torch.zeros(1)
    torch.save(saved, tmp_path / "w.pth")
    report = _net().load_pretrained(tmp_path / "w.pth")
    assert report.missing == ["layer4.1.bn2.running_var"] and report.unexpected == ["layer9.weight"]
    assert "1 missing" in str(report) and "layer9.weight" in str(report)


def test_autoseg_pspnet_state_dict_loads_into_the_whole_network(tmp_path: Path) -> None:
    trained = _net()
    torch.nn.init.normal_(trained.head[-1].weight)
    torch.save(trained.state_dict(), tmp_path / "pspnet.pth")
    net = PSPNet(in_channels=5, num_classes=1, backbone="resnet18")
    report = net.load_pretrained(tmp_path / "pspnet.pth")
    assert report.layout == "autoseg" and report.missing == [] and report.unexpected == []
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), trained.state_dict().values()))


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    _perturbed_backbone_file(tmp_path / "bad.pth", **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)})
    with pytest.raises(ValueError, match=r"'layer2\.0\.conv1\.weight' has shape \[128, 64, 1, 1\].*\[128, 64, 3, 3\]"):
        _net().load_pretrained(tmp_path / "bad.pth")


@pytest.mark.parametrize(
    ("plan", "file"), [("resnet50", "resnet18"), ("resnet18", "resnet50"), ("resnet18", "resnet34")]
)
def test_a_file_of_another_backbone_says_what_it_holds_and_how_to_plan_for_it(
    plan: str, file: str, tmp_path: Path
) -> None:
    """A ResNet-18 file for a plan with a ResNet-50 backbone (and the other way round): one line naming both, with
    how to plan for the file's backbone, as an error autoseg's commands print as such (not a traceback)."""
    state = ResNetBackbone(file).state_dict()
    torch.save({**state, "fc.weight": torch.zeros(1000, 512 * (4 if file == "resnet50" else 1))}, tmp_path / "t.pth")
    torch.save({f"backbone.{k}": v for k, v in state.items()}, tmp_path / "autoseg.pth")
    for name, layout in (("t.pth", "torchvision"), ("autoseg.pth", "autoseg")):
        with pytest.raises(InvalidFileError) as error:
            _net(backbone=plan).load_pretrained(tmp_path / name)
        assert str(error.value) == (
            f"{tmp_path / name}: holds a {file} backbone ({layout} layout), this PSPNet's is {plan}: set "
            f"network.backbone of the configuration in plans.json to '{file}' (the CPUPlanner, autoseg_plan -pl "
            "CPUPlanner, plans resnet18; the DefaultPlanner the largest that fits the memory budget), or make a "
            f"{plan} file: autoseg_pretrain --backbone {plan}"
        )
    assert backbone_of(state) == file and backbone_of({"conv1.weight": state["conv1.weight"]}) is None


def test_pickled_files_and_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a whole pickled module, not a state dict
    with pytest.raises(ValueError, match="refused: the file holds pickled Python objects"):
        _net().load_pretrained(tmp_path / "module.pth")
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="no tensor matches"):
        _net().load_pretrained(tmp_path / "foreign.pth")


# ---------------------------------------------------------------------------- fine-tuning
def test_frozen_backbone_keeps_weights_and_statistics_and_a_few_steps_lower_the_loss() -> None:
    net = _net()
    net.freeze_backbone()
    net.train()
    assert not net.backbone.training and net.head.training
    backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    head = net.head[-1].weight.detach().clone()
    optimizer = torch.optim.RMSprop(list(net.new_layer_parameters()), lr=1e-3)
    x = torch.randn(2, 5, 64, 64)
    target = torch.zeros(2, 1, 64, 64)
    target[:, :, 20:40, 20:44] = 1
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.equal(v, backbone[k]) for k, v in net.backbone.state_dict().items())  # incl. running stats
    assert not torch.equal(net.head[-1].weight, head)
    assert losses[-1] < losses[0]
    net.freeze_backbone(False)
    net.train()
    assert net.backbone.training and all(p.requires_grad for p in net.backbone_parameters())


@pytest.fixture
def ctp_home(tiny_ctp: Path, data_roots: Path) -> Path:
    """The tiny CTP-like dataset planned, its 2d_pspnet made small: resnet18, 3 epochs of 2 iterations, the
    backbone frozen in epoch 1 only, plateau after 2 epochs without gain, early stop after 5."""
    plans = plan_and_preprocess(CTP, progress=False).plans
    path = data_roots / "preprocessed" / tiny_ctp.name / "plans.json"
    configuration = plans.configuration("2d_pspnet")
    schedule = dataclasses.replace(
        configuration.schedule,
        epochs=3,
        iterations_per_epoch=2,
        plateau_patience_epochs=2,
        early_stopping_patience_epochs=5,
        stages=(
            Stage(
                name="new_layers",
                start_epoch=0,
                patch_size=(64, 64),
                batch_size=2,
                learning_rate=1e-2,
                trainable="new_layers",
            ),
            Stage(
                name="all_layers", start_epoch=1, patch_size=(64, 64), batch_size=2, learning_rate=1e-4, trainable="all"
            ),
        ),
    )
    configuration = dataclasses.replace(
        configuration,
        batch_size=2,
        schedule=schedule,
        network=dataclasses.replace(configuration.network, backbone="resnet18"),
    )
    dataclasses.replace(plans, configurations={**plans.configurations, "2d_pspnet": configuration}).to_json(path)
    Plans.from_json(path)
    return data_roots


def _trainer(home: Path, output_folder: Path | None = None, **options):
    folder = next((home / "preprocessed").iterdir())
    return get_trainer("PSPNetTrainer")(
        Plans.from_json(folder / "plans.json"),
        "2d_pspnet",
        "full",
        preprocessed_folder=folder,
        output_folder=output_folder or home / "run",
        options=dataclasses.replace(QUIET, **options),
    )


def test_phase_one_trains_only_new_layers_and_phase_two_everything(ctp_home: Path) -> None:
    trainer = _trainer(ctp_home, val_iterations=1).setup()
    network = trainer.network
    assert trainer.stage.trainable == "new_layers" and network.backbone_frozen
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in network.new_layer_parameters()
    }
    assert isinstance(trainer.optimizer, torch.optim.RMSprop)
    backbone = {k: v.clone() for k, v in network.backbone.state_dict().items()}
    head = network.head[-1].weight.detach().clone()
    trainer.enter_stage(0)
    trainer.train_epoch(0)
    assert all(torch.equal(v, backbone[k]) for k, v in network.backbone.state_dict().items())
    assert not torch.equal(network.head[-1].weight, head)
    trainer.enter_stage(1)
    assert not network.backbone_frozen and trainer.learning_rate(1, 0) == pytest.approx(1e-4)
    trainer.train_epoch(1)
    changed = [k for k, v in network.backbone.state_dict().items() if not torch.equal(v, backbone[k])]
    assert "conv1.weight" in changed and "bn1.running_mean" in changed
    assert "training from scratch" in (trainer.output_folder / "log.txt").read_text()
    trainer.plateau.counters["stopped"] = (
        True  # early stopping: fit() trains no further epoch and writes the final checkpoint
    )
    trainer.fit()
    assert trainer.epoch == 0 and (trainer.output_folder / "checkpoint_final.pth").is_file()


def test_plateau_divides_the_rate_and_early_stopping_ends_the_run(ctp_home: Path) -> None:
    def patiences(trainer) -> tuple[int | None, int | None]:
        names = ("plateau_patience_epochs", "early_stopping_patience_epochs")
        return tuple(trainer.plateau.patience(name, trainer.run_length.epochs) for name in names)

    longer = _trainer(ctp_home, epochs=7)  # patiences scale with the run like the stage starts: 2·7/3, 5·7/3
    assert patiences(longer) == (5, 12)
    trainer = _trainer(ctp_home)
    assert patiences(trainer) == (2, 5)
    rates = []
    for epoch, dice in enumerate([0.5, 0.6, 0.6, 0.55, 0.6, math.nan, 0.6, 0.59]):
        trainer.plateau.epoch_completed(trainer, epoch, dice)
        rates.append(trainer.learning_rate(0, 0) / 1e-2)  # epoch 0: the new_layers stage at 1e-2
        assert trainer.plateau.stop_requested() == (epoch == 7)
    assert rates == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])  # NaN (no validation) is not counted

    waiting = _trainer(ctp_home)
    for epoch in range(12):  # no lesion found yet: not a plateau, whatever the patience
        waiting.plateau.epoch_completed(waiting, epoch, 0.0)
    assert waiting.learning_rate(0, 0) == pytest.approx(1e-2) and not waiting.plateau.stop_requested()
    for epoch, dice in enumerate([0.1, 0.1, 0.1], start=12):
        waiting.plateau.epoch_completed(waiting, epoch, dice)
    assert waiting.learning_rate(0, 0) == pytest.approx(1e-3)  # counted from the first lesion found


def test_tiny_ctp_run_end_to_end_resumes_and_predicts_slabs(ctp_home: Path) -> None:
    options = dataclasses.replace(QUIET, val_iterations=1, validation=False)
    result = train(CTP, configuration="2d_pspnet", fold="full", options=options)
    assert result.epochs == 3
    latest = load_checkpoint(result.output_folder / "checkpoint_latest.pth")
    assert latest["trainer"] == "PSPNetTrainer" and latest["stage"] == 1
    assert set(latest["plateau"]) == {"best", "epochs_without_gain", "reductions", "stopped"}
    assert all(isinstance(v, (int, float, bool)) for v in latest["plateau"].values())
    log = (result.output_folder / "log.txt").read_text()
    assert "stage all_layers starts at epoch 2" in log and "training from scratch" in log
    resumed = _trainer(ctp_home, result.output_folder, continue_training=True, val_iterations=1).setup()
    assert resumed.plateau.counters == latest["plateau"] and not resumed.network.backbone_frozen

    network = resumed.network.eval()
    for slices in (2, 20):
        volume = np.random.default_rng(0).standard_normal((5, 64, 64, slices)).astype(np.float32)
        probabilities = predict_slices(network, volume, (64, 64), slice_axis=2, batch_size=4)
        assert probabilities.shape == (1, 64, 64, slices)
        assert torch.all((probabilities >= 0) & (probabilities <= 1))


def test_trainer_loads_pretrained_backbone_at_the_start_of_a_new_run(ctp_home: Path, tmp_path: Path) -> None:
    saved = _perturbed_backbone_file(tmp_path / "resnet18.pth")
    folder = next((ctp_home / "preprocessed").iterdir())
    options = TrainingOptions(num_processes=0, echo=False, val_iterations=1, pretrained=str(tmp_path / "resnet18.pth"))
    trainer = get_trainer("PSPNetTrainer")(
        Plans.from_json(folder / "plans.json"),
        "2d_pspnet",
        "full",
        preprocessed_folder=folder,
        output_folder=ctp_home / "run",
        options=options,
    ).setup()
    backbone = trainer.network.backbone.state_dict()
    assert all(torch.equal(backbone[k], saved[k]) for k in backbone)
    log = (ctp_home / "run" / "log.txt").read_text()
    assert (
        "resnet18.pth (torchvision layout): 120 tensors loaded into the backbone, 2 classifier tensors ignored" in log
    )
    assert "training from scratch" not in log


def test_a_training_run_given_a_file_of_another_backbone_stops_with_an_error_the_commands_print(
    ctp_home: Path, tmp_path: Path
) -> None:
    """``autoseg_train --pretrained``: the trainer's setup raises the one-line error (an AutosegError, which every
    command prints as ``error: ...``), before anything is trained."""
    torch.save(ResNetBackbone("resnet34").state_dict(), tmp_path / "resnet34.pth")
    folder = next((ctp_home / "preprocessed").iterdir())
    options = TrainingOptions(num_processes=0, echo=False, pretrained=str(tmp_path / "resnet34.pth"))
    trainer = get_trainer("PSPNetTrainer")(
        Plans.from_json(folder / "plans.json"),
        "2d_pspnet",
        "full",
        preprocessed_folder=folder,
        output_folder=ctp_home / "run",
        options=options,
    )
    with pytest.raises(AutosegError, match=r"resnet34.pth: holds a resnet34 backbone \(torchvision layout\), this "):
        trainer.setup()
    assert not list((ctp_home / "run").glob("checkpoint_*"))


def test_pretrained_weights_for_a_network_without_a_backbone_or_missing_are_refused_before_training(
    ctp_home: Path, tmp_path: Path
) -> None:
    """``--pretrained`` with the 3d_aniso U-Net was silently ignored; a missing file was found only by the trainer.
    Both are one line from the library before any run folder exists."""
    from autoseg.api.train import prepare_run

    torch.save(ResNetBackbone("resnet18").state_dict(), tmp_path / "resnet18.pth")
    options = TrainingOptions(num_processes=0, echo=False, pretrained=str(tmp_path / "resnet18.pth"))
    with pytest.raises(AutosegError, match=r"configuration '3d_aniso' trains a ResidualUNet, and --pretrained starts"):
        prepare_run(CTP, "3d_aniso", 0, None, options)
    missing = dataclasses.replace(options, pretrained=str(tmp_path / "none.pth"))
    with pytest.raises(AutosegError, match=r"none.pth: no such file"):
        prepare_run(CTP, "2d_pspnet", 0, None, missing)
    assert not (ctp_home / "results").exists()


def test_ce_trainer_weights_lesions_by_the_lesion_fraction_of_its_training_cases(ctp_home: Path) -> None:
    from autoseg.train.loading import case_identifiers
    from autoseg.train.splits import load_or_create_splits, read_subjects

    folder = next((ctp_home / "preprocessed").iterdir())
    plans = Plans.from_json(folder / "plans.json")
    data = folder / plans.configuration("2d_pspnet").data_identifier
    cases = case_identifiers(data)
    load_or_create_splits(folder, cases, read_subjects(data, cases), num_folds=2)  # 4 subjects: 2 folds
    trainer = get_trainer("PSPNetCETrainer")(
        plans, "2d_pspnet", 0, preprocessed_folder=folder, output_folder=ctp_home / "ce", options=QUIET
    ).setup()
    segs = [np.load(data / f"{case}_seg.npy") for case in trainer.train_cases]
    fraction = sum(int((s > 0).sum()) for s in segs) / sum(s.size for s in segs)
    assert trainer.loss_settings.name == "weighted_ce"
    assert trainer.loss_settings.positive_weight == pytest.approx((1 - fraction) / fraction)
    assert set(trainer.train_cases).isdisjoint(trainer.val_cases)  # the weight comes from fold 0's training cases
    log = (ctp_home / "ce" / "log.txt").read_text()
    assert (
        "class-weighted cross entropy instead of the plans' focal" in log and "loss: weighted_ce (lesion weight" in log
    )

    # the auxiliary head trains alongside (weight 0.4); evaluation gives the main logits alone
    network = trainer.network.train()
    data = torch.randn(2, 5, 64, 64)
    target = (torch.rand(2, 1, 64, 64) < 0.1).to(torch.int16)
    with torch.no_grad():
        main, auxiliary = network(data)
    expected = trainer.loss.loss(main, target) + 0.4 * trainer.loss.loss(auxiliary, target)
    assert float(trainer.loss((main, auxiliary), target)) == pytest.approx(float(expected))
    assert isinstance(network.eval()(data), torch.Tensor)


def test_focal_and_cross_entropy_pspnets_ensemble_from_the_command_line(ctp_home: Path, tiny_ctp: Path) -> None:
    from autoseg.commands.predict import main as predict_main
    from autoseg.io.images import read_image

    options = dataclasses.replace(QUIET, validation=False, val_iterations=0)
    for trainer in ("PSPNetTrainer", "PSPNetCETrainer"):
        train(CTP, configuration="2d_pspnet", fold="full", trainer=trainer, options=options)
    output = ctp_home / "ensemble"
    assert (
        predict_main(
            [
                "-i",
                str(tiny_ctp / "imagesTr"),
                "-o",
                str(output),
                "-d",
                CTP,
                "-c",
                "2d_pspnet",
                "-tr",
                "PSPNetTrainer",
                "PSPNetCETrainer",
                "--no-tta",
                "--save-probabilities",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    image = sorted((tiny_ctp / "imagesTr").glob("*_0000.nii.gz"))[0]
    case = image.name.removesuffix("_0000.nii.gz")
    labels, geometry = read_image(output / f"{case}.nii.gz")
    _, source_geometry = read_image(image)
    assert geometry.differences(source_geometry) == [] and labels.shape[2] == read_image(image)[0].shape[2]
    single = ctp_home / "focal_only"
    assert (
        predict_main(
            [
                "-i",
                str(image),
                "-o",
                str(single),
                "-d",
                CTP,
                "-c",
                "2d_pspnet",
                "-tr",
                "PSPNetTrainer",
                "--no-tta",
                "--save-probabilities",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    both = read_image(output / f"{case}_probabilities.nii.gz")[0]
    focal = read_image(single / f"{case}_probabilities.nii.gz")[0]
    assert not np.allclose(both, focal)  # the cross-entropy model took part


def test_plans_field_names_the_pretrained_weights_and_the_flag_overrides_it(ctp_home: Path, tmp_path: Path) -> None:
    folder = next((ctp_home / "preprocessed").iterdir())
    (folder / "weights").mkdir()
    saved = _perturbed_backbone_file(folder / "weights" / "resnet18.pth")
    plans = Plans.from_json(folder / "plans.json")
    configuration = plans.configuration("2d_pspnet")
    assert configuration.network.pretrained is None and "never downloaded" in configuration.reasons["pretrained"]
    edited = dataclasses.replace(
        configuration, network=dataclasses.replace(configuration.network, pretrained="weights/resnet18.pth")
    )
    dataclasses.replace(plans, configurations={**plans.configurations, "2d_pspnet": edited}).to_json(
        folder / "plans.json"
    )
    plans = Plans.from_json(folder / "plans.json")  # the field survives the JSON round trip
    assert plans.configuration("2d_pspnet").network.pretrained == "weights/resnet18.pth"

    def backbone_after_setup(**options) -> dict[str, torch.Tensor]:
        trainer = get_trainer("PSPNetTrainer")(
            plans,
            "2d_pspnet",
            "full",
            preprocessed_folder=folder,
            output_folder=tmp_path / str(len(list(tmp_path.iterdir()))),
            options=dataclasses.replace(QUIET, **options),
        ).setup()
        return trainer.network.backbone.state_dict()

    from_plans = backbone_after_setup()
    assert all(torch.equal(from_plans[k], saved[k]) for k in from_plans)
    other = _perturbed_backbone_file(tmp_path / "other.pth", **{"conv1.weight": torch.ones(64, 3, 7, 7)})
    from_flag = backbone_after_setup(pretrained=str(tmp_path / "other.pth"))
    assert torch.equal(from_flag["conv1.weight"], other["conv1.weight"])

    (folder / "weights" / "resnet18.pth").unlink()
    with pytest.raises(FileNotFoundError, match="network.pretrained names weights/resnet18.pth"):
        backbone_after_setup()
