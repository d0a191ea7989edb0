"""Adaptation: few-shot learning (episodes, ProtoNet, MAML / first-order MAML / ANIL), zero-shot heads from text
or attributes, and adversarial removal of a nuisance (gradient reversal, DANN).

```python
from cvzoo.adapt import EpisodeCollate, EpisodicBatchSampler, ProtoNet
sampler = EpisodicBatchSampler(train_set.labels, n_way=5, k_shot=1, query=5, episodes=1000, classes=[0, 1, 2, 3, 4])
loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=EpisodeCollate(5, 1, 5))
Trainer(ProtoNet(resnet_micro(out_indices=(3,)), n_way=5, k_shot=1, query=5)).fit(loader)
```
"""

from cvzoo.adapt.dann import DANN, DANNOutput
from cvzoo.adapt.episodes import DihedralClasses, EpisodeCollate, EpisodicBatchSampler, episode_labels, split_classes
from cvzoo.adapt.evaluate import attribute_probe_accuracy, few_shot_accuracy, nearest_neighbour_predictor
from cvzoo.adapt.gradient_reversal import GradientReversal, dann_coefficient, reverse_gradient
from cvzoo.adapt.maml import MAML
from cvzoo.adapt.protonet import ProtoNet, class_prototypes, prototype_logits
from cvzoo.adapt.zero_shot import ZeroShotHead

__all__ = [
    "DANN",
    "DANNOutput",
    "DihedralClasses",
    "EpisodeCollate",
    "EpisodicBatchSampler",
    "GradientReversal",
    "MAML",
    "ProtoNet",
    "ZeroShotHead",
    "attribute_probe_accuracy",
    "class_prototypes",
    "dann_coefficient",
    "episode_labels",
    "few_shot_accuracy",
    "nearest_neighbour_predictor",
    "prototype_logits",
    "reverse_gradient",
    "split_classes",
]
