"""Self-supervised pre-training, similarity learning and search: contrastive methods (SimCLR, MoCo v2/v3),
self-distillation (BYOL, SimSiam, DINO), redundancy reduction (Barlow Twins, VICReg), metric-learning losses
and miners, a nearest-neighbour index over faiss, Annoy, Milvus or torch, and CLIP (an open_clip wrapper,
zero-shot heads, a tiny CLIP trained from scratch). Every method wraps any cvzoo backbone and trains through
the common trainer (`loss(images)` builds its own views on the device).

Importing this package imports torch only; kornia (views), faiss, annoy, pymilvus and open_clip are imported
where used.
"""

from cvzoo.ssl.clip import (
    OpenCLIP,
    TinyCLIP,
    TinyTextEncoder,
    WordTokenizer,
    ZeroShotClassifier,
    clip_loss,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from cvzoo.ssl.contrastive import MoCo, SimCLR, info_nce_loss, nt_xent_loss
from cvzoo.ssl.evaluate import extract_features, knn_accuracy, linear_probe_accuracy
from cvzoo.ssl.gather import gather_with_grad, rank_and_world
from cvzoo.ssl.heads import MLPHead
from cvzoo.ssl.index import NearestNeighborIndex, SearchResult, mine_hard_negatives, recall_at_k
from cvzoo.ssl.metric_losses import MarginSoftmaxLoss, contrastive_loss, multi_similarity_loss, triplet_margin_loss
from cvzoo.ssl.miners import (
    MemoryBankMiner,
    Pairs,
    Triplets,
    all_pairs_miner,
    batch_hard_miner,
    distance_weighted_miner,
    semi_hard_miner,
)
from cvzoo.ssl.momentum import cosine_momentum, momentum_copy, update_momentum
from cvzoo.ssl.redundancy import BarlowTwins, VICReg, barlow_twins_loss, vicreg_loss
from cvzoo.ssl.self_distillation import BYOL, DINO, DINOHead, SimSiam, byol_loss, dino_loss, simsiam_loss
from cvzoo.ssl.views import MultiCrop, TwoViews, denormalize, ssl_augmentation

__all__ = [
    "OpenCLIP", "TinyCLIP", "TinyTextEncoder", "WordTokenizer", "ZeroShotClassifier",
    "clip_loss", "zero_shot_accuracy", "zero_shot_classifier", "extract_features", "knn_accuracy",
    "linear_probe_accuracy",
    "BYOL", "DINO", "BarlowTwins", "DINOHead", "MLPHead", "MarginSoftmaxLoss", "MemoryBankMiner", "MoCo",
    "MultiCrop", "NearestNeighborIndex", "Pairs", "SearchResult", "SimCLR", "SimSiam", "Triplets", "TwoViews",
    "VICReg", "all_pairs_miner", "barlow_twins_loss", "batch_hard_miner", "byol_loss", "contrastive_loss",
    "cosine_momentum", "denormalize", "dino_loss", "distance_weighted_miner", "gather_with_grad", "info_nce_loss",
    "mine_hard_negatives", "momentum_copy", "multi_similarity_loss", "nt_xent_loss", "rank_and_world",
    "recall_at_k", "semi_hard_miner", "simsiam_loss", "ssl_augmentation", "triplet_margin_loss",
    "update_momentum", "vicreg_loss",
]
