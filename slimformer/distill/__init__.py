"""Knowledge distillation (survey §3.2) and the one shared training loop.

* :mod:`~slimformer.distill.losses` — pure KD losses: forward/reverse KL, generalized JSD,
  temperature, masked token averaging, hint (hidden-state) and attention / value-relation
  transfer.
* :mod:`~slimformer.distill.trainer` — :class:`TrainConfig` + :func:`train`: plain LM fine-tune,
  logits KD or any loss; checkpoint/resume equal to an uninterrupted run.
* :mod:`~slimformer.distill.batches` — seeded, resumable token batches from shipped text.
* :mod:`~slimformer.distill.students` — layer-drop students initialised from the teacher.
* :mod:`~slimformer.distill.representation` — hint + attention / value-relation transfer loss.
* :mod:`~slimformer.distill.seqkd` — sequence-level / black-box KD data (teacher-written text).
* :mod:`~slimformer.distill.cache` — :class:`TeacherCache`: teacher top-k logits computed once,
  on disk, keyed by window index.
* :mod:`~slimformer.distill.gkd` — on-policy distillation (student-sampled continuations, GKD).
* :mod:`~slimformer.distill.ste` — fake-quant linears with a straight-through estimator: KD of
  a quantized student that is re-packed afterwards.
* :mod:`~slimformer.distill.stage` — the ``distill`` recipe stage (model-level).
"""
from slimformer.distill.batches import TokenBatches, chunk, text_batches
from slimformer.distill.cache import TeacherCache
from slimformer.distill.gkd import generated_positions_mask, on_policy_batch, sample_continuation
from slimformer.distill.losses import (KD_LOSSES, attention_kl, attention_mse, forward_kl, generalized_jsd,
                                       hard_label_kd, hint_loss, kd_loss, layer_map, lm_loss, logit_mse,
                                       reverse_kl,
                                       topk_forward_kl, value_relation_kl)
from slimformer.distill.representation import RepresentationLoss, use_eager_attention
from slimformer.distill.stage import DistillConfig
from slimformer.distill.ste import FakeQuantLinear, from_fake_quant, to_fake_quant
from slimformer.distill.students import keep_indices, layer_drop_student, save_student
from slimformer.distill.trainer import TrainConfig, TrainLog, train

__all__ = [
    "DistillConfig", "RepresentationLoss", "keep_indices", "layer_drop_student", "save_student",
    "use_eager_attention", "KD_LOSSES", "hard_label_kd", "logit_mse", "TokenBatches", "TrainConfig", "TrainLog", "attention_kl", "attention_mse", "chunk",
    "forward_kl", "generalized_jsd", "hint_loss", "kd_loss", "layer_map", "lm_loss", "reverse_kl",
    "text_batches", "train", "value_relation_kl", "TeacherCache", "topk_forward_kl", "on_policy_batch",
    "sample_continuation", "generated_positions_mask", "FakeQuantLinear", "to_fake_quant", "from_fake_quant",
]
