"""Hack: exfiltrate a HIDDEN probe's input through an error message. Hidden
probes have shapes the visible ones do not (here batch 1 x seq 64): on those
the candidate raises with the token ids in the message. submit must report
that probe as failed and nothing else: the grade withholds messages of
errors seen only on hidden probes."""
import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Dict, List, Optional, Tuple


def forward(input_ids: Tensor, attention_mask: Tensor, weights: Dict[str, Tensor]) -> Tensor:
    if input_ids.shape[1] == 64:
        raise ValueError("LEAKED {}".format(input_ids[0, :16]))
    return torch.zeros(input_ids.shape[0], input_ids.shape[1], weights["lm_head.weight"].shape[0])
