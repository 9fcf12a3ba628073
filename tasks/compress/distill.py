"""The distill recipe: a smaller architecture trained from scratch on the parent's train split against the parent's
soft predictions; the child is that architecture, with the parent's classes and preprocessing."""

from __future__ import annotations

from typing import Any

import torch

from tasks.compress.apply import Candidate, CompressContext, recipe_handler
from tasks.compress.measure import count_flops, count_parameters
from tasks.compress.prune import fine_tune
from tasks.compress.recipes import DistillConfig
from tasks.models.entry import WeightsFormat, build_model


@recipe_handler(DistillConfig)
def distill(candidate: Candidate, cfg: DistillConfig, ctx: CompressContext) -> dict[str, Any]:
    pre = ctx.entry.preprocessing
    teacher = candidate.module.float().eval()
    torch.manual_seed(0)  # the student's initialisation, so a rerun gives the same child
    student = build_model(cfg.arch, ctx.entry.num_classes, pre)
    before = {"parameters": count_parameters(teacher), "flops": count_flops(teacher, pre.input_shape)}
    after = {"parameters": count_parameters(student), "flops": count_flops(student, pre.input_shape)}
    history = fine_tune(student, teacher, ctx, cfg.epochs, cfg.learning_rate, cfg.temperature, cfg.alpha)
    candidate.module = student.cpu().eval()
    candidate.architecture = cfg.arch
    candidate.storage = WeightsFormat.STATE_DICT
    return {"student": cfg.arch, "teacher": ctx.entry.architecture,
            "parameters_before": before["parameters"], "parameters_after": after["parameters"],
            "flops_before": before["flops"], "flops_after": after["flops"],
            "flop_reduction": 1 - after["flops"] / before["flops"], "fine_tune": history}
