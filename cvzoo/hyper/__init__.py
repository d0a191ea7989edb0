"""Hyperparameter search over cvzoo constructors: search spaces are plain Python functions of an Optuna trial.

    from functools import partial
    from cvzoo.hyper import classifier_space, tune

    result = tune(partial(classifier_space, num_classes=10, in_channels=1), train_set, val_set, n_trials=20,
                  steps=300, storage="sqlite:///runs/tune/study.db")
    print(result.best_value, result.builder_call)

Optuna is the optional extra `cvzoo[hyper]`; the spaces, `FixedParams` and `hyper_classifier` work without it.
"""

from cvzoo.hyper.candidate import BuilderCall, Candidate, TrainChoice, as_candidate
from cvzoo.hyper.params import FixedParams
from cvzoo.hyper.space import (
    CLASSIFIER_DEFAULTS,
    MODEL_PARAMS,
    TRAIN_PARAMS,
    classifier_model_space,
    classifier_space,
    hyper_classifier,
    training_space,
)
from cvzoo.hyper.tuner import TuneResult, make_objective, result_of, tune

__all__ = ["CLASSIFIER_DEFAULTS", "MODEL_PARAMS", "TRAIN_PARAMS", "BuilderCall", "Candidate", "FixedParams",
           "TrainChoice", "TuneResult", "as_candidate", "classifier_model_space", "classifier_space",
           "hyper_classifier", "make_objective", "result_of", "training_space", "tune"]
