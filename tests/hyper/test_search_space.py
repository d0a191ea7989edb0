"""The classifier search space: every sampled configuration builds a working model whose printed builder
call rebuilds it exactly; `hyper_classifier` and `FixedParams` without Optuna; BuilderCall's source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvzoo.hyper import (
    CLASSIFIER_DEFAULTS,
    BuilderCall,
    Candidate,
    FixedParams,
    TrainChoice,
    classifier_space,
    hyper_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _exec_code(code: str):
    namespace: dict = {}
    exec(code, namespace)  # the snippet a user pastes
    return namespace["model"]


def test_default_builds_resnet_micro_classifier_layout():
    from cvzoo.zoo import resnet_micro_classifier

    assert _shapes(hyper_classifier()) == _shapes(resnet_micro_classifier())  # the reference zoo entry
    model = hyper_classifier(num_classes=4, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).logits.shape == (2, 4)


def test_every_sampled_trial_builds_a_valid_model_and_replays_from_its_params():
    optuna = pytest.importorskip("optuna")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, set] = {"backbone": set(), "neck": set(), "num_stages": set(), "optimizer": set()}
    for i in range(16):
        trial = study.ask()
        in_channels = 1 if i % 2 else 3
        torch.manual_seed(i)
        candidate = classifier_space(trial, num_classes=5, in_channels=in_channels)
        for key in seen:
            seen[key].add(trial.params[key])
        model = candidate.model.train()
        out = model(torch.randn(2, in_channels, 32, 32)).logits
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        model.loss(torch.randn(2, in_channels, 32, 32), torch.tensor([0, 4]))["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (trial.params, missing)
        candidate.training.make_optimizer(model).step()

        # the same parameters replayed (FixedTrial) give the same code; the code rebuilds the same weights
        torch.manual_seed(i)
        replay = classifier_space(optuna.trial.FixedTrial(trial.params), num_classes=5, in_channels=in_channels)
        assert (replay.builder_call, replay.zoo_call, replay.training) == (candidate.builder_call,
                                                                           candidate.zoo_call, candidate.training)
        torch.manual_seed(123)
        reference = classifier_space(optuna.trial.FixedTrial(trial.params), 5, in_channels).model.state_dict()
        torch.manual_seed(123)
        pasted = _exec_code(candidate.code).state_dict()
        assert reference.keys() == pasted.keys()
        assert all(torch.equal(reference[k], pasted[k]) for k in reference)
        # and the zoo builder with the trial's architecture parameters builds the same layout
        zoo_model = eval(candidate.zoo_call, {"hyper_classifier": hyper_classifier})
        assert _shapes(zoo_model) == _shapes(candidate.model)
        study.tell(trial, 0.0)
    assert seen == {"backbone": {"resnet", "convnext"}, "neck": {"none", "fpn", "pan"}, "num_stages": {3, 4},
                    "optimizer": {"adamw", "sgd"}}


def test_conditional_parameters_are_only_asked_on_their_branch():
    trial = FixedParams({"backbone": "convnext", "neck": "none"}, CLASSIFIER_DEFAULTS)
    candidate = classifier_space(trial, 3, 1)
    assert "drop_path_rate" in trial.params and "zero_init_residual" not in trial.params
    assert "neck_channels" not in trial.params
    assert candidate.builder_call.startswith("ImageClassifier(ConvNeXt(")
    assert candidate.training == TrainChoice()


def test_narrowed_choices_and_bad_choices():
    trial = FixedParams({}, CLASSIFIER_DEFAULTS)
    classifier_space(trial, 3, 1, backbones=("convnext",), necks=("fpn",), augments=("none",))
    assert (trial.params["backbone"], trial.params["neck"], trial.params["augment"]) == ("convnext", "fpn", "none")
    with pytest.raises(ValueError, match="backbones must be a non-empty sequence"):
        classifier_space(FixedParams({}, CLASSIFIER_DEFAULTS), 3, backbones=("vit",))
    with pytest.raises(ValueError, match="augments"):
        classifier_space(FixedParams({}, CLASSIFIER_DEFAULTS), 3, augments="flip")


def test_hyper_classifier_rejects_bad_parameters():
    with pytest.raises(ValueError, match="parameter 'width' must be an int in \\[8, 32\\] on steps of 8 from 8, got 7"):
        hyper_classifier(width=7)
    with pytest.raises(ValueError, match="parameter 'neck' must be one of .* got 'bifpn'"):
        hyper_classifier(neck="bifpn")
    with pytest.raises(ValueError, match="unknown hyper_classifier parameter.*'widht'"):
        hyper_classifier(widht=16)
    with pytest.raises(ValueError, match="'lr'.* are training settings"):
        hyper_classifier(lr=1e-3)
    with pytest.raises(ValueError, match="'drop_path_rate'.* do not apply .*backbone='resnet'"):
        hyper_classifier(backbone="resnet", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="num_classes must be positive, got 0"):
        hyper_classifier(num_classes=0)


def test_fixed_params_answers_like_a_trial():
    trial = FixedParams({"a": 3, "x": 0.5}, {"b": "q", "c": 100, "y": 9.0})
    assert trial.suggest_int("a", 1, 5) == 3
    assert trial.suggest_categorical("b", ["p", "q"]) == "q"
    assert trial.suggest_int("c", 1, 10, step=3) == 10  # a default out of range: the nearest bound on the step
    assert trial.suggest_float("x", 0.0, 1.0) == 0.5
    assert trial.suggest_float("y", 0.0, 1.0) == 1.0
    assert trial.params == {"a": 3, "b": "q", "c": 10, "x": 0.5, "y": 1.0}
    with pytest.raises(ValueError, match="no value for parameter 'z'"):
        trial.suggest_float("z", 0, 1)
    with pytest.raises(ValueError, match="parameter 'x' must be a float in \\[0.0, 0.25\\], got 0.5"):
        FixedParams({"x": 0.5}).suggest_float("x", 0.0, 0.25)
    with pytest.raises(ValueError, match="parameter 'flag' must be one of \\(False, True\\), got 1"):
        FixedParams({"flag": 1}).suggest_categorical("flag", (False, True))
    assert FixedParams({"a": 1, "typo": 2}).unused() == ["a", "typo"]
    with pytest.raises(ValueError, match="params must be a mapping"):
        FixedParams([("a", 1)])


def test_builder_call_source_imports_and_build_order():
    from cvzoo.backbones import ResNet
    from cvzoo.heads import ClassificationHead
    from cvzoo.types import FeatureInfo

    call = BuilderCall(ResNet, layers=(1,), widths=(8,), stem_width=8, out_indices=(0,))
    assert call.source() == "ResNet(layers=(1,), widths=(8,), stem_width=8, out_indices=(0,))"
    assert call.imports() == ("from cvzoo.backbones import ResNet",)
    nested = BuilderCall(list, [FeatureInfo(8, 4), BuilderCall(ClassificationHead, 8, 2)])
    assert nested.source() == "list([FeatureInfo(channels=8, stride=4), ClassificationHead(8, 2)])"
    assert "from cvzoo.types import FeatureInfo" in nested.imports()
    assert isinstance(call.build(), ResNet)
    with pytest.raises(ValueError, match="fn must be a named, importable callable"):
        BuilderCall(lambda: 0)
    with pytest.raises(ValueError, match="must print as Python.*Tensor"):
        BuilderCall(ResNet, widths=torch.ones(2)).source()


def test_train_choice_and_candidate_validate():
    model = hyper_classifier(num_classes=2)
    sgd = TrainChoice(optimizer="sgd", lr=0.1, weight_decay=1e-4).make_optimizer(model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert {g["weight_decay"] for g in sgd.param_groups} == {1e-4, 0.0}
    with pytest.raises(ValueError, match="optimizer must be one of .* got 'adam'"):
        TrainChoice(optimizer="adam")
    with pytest.raises(ValueError, match="lr must be a positive number, got 0"):
        TrainChoice(lr=0)
    with pytest.raises(ValueError, match="augment must be"):
        TrainChoice(augment="strong")
    with pytest.raises(ValueError, match="model must be an nn.Module, got str"):
        Candidate("resnet")


def test_import_does_not_load_optuna_and_missing_optuna_names_the_extra():
    code = ("import sys\n"
            "import cvzoo.hyper, cvzoo.hyper.tuner, cvzoo.hyper.cli\n"
            "print('optuna' in sys.modules)\n"
            "sys.modules['optuna'] = None\n"
            "cvzoo.hyper.hyper_classifier(width=8)\n"
            "try:\n    cvzoo.hyper.tuner.tune(cvzoo.hyper.classifier_space, [0], [0])\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "False"
    assert "pip install 'cvzoo[hyper]'" in lines[1]
