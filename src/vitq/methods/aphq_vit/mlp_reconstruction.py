"""APHQ-ViT's MLP reconstruction (MR): the GELU of every MLP becomes a ReLU, and each MLP is refitted in float so
that the ReLU MLP reproduces the GELU one.

Why: the post-GELU activations (``fc2``'s input) are a long positive tail over a small negative lobe, a poor fit
for one uniform grid at 3-4 bits. After a ReLU they are non-negative, so ``fc2``'s input quantizer can be unsigned
with its zero point at 0, and the refit also learns to live with a clipped range.

Per MLP, in forward order, on the calibration images (our reading of the paper and its released code):

- the *teacher* is the original float model (GELU): it gives the MLP's input ``x`` (``fc1``'s), its output
  ``y`` and the upper bound ``u``: the ``percentile`` quantile of the positive values of ``fc2``'s input;
- the weight ``w`` of each output element is the average perturbation Hessian of the prediction KL at
  temperature T w.r.t. the MLP's output (:func:`~vitq.calib.losses.perturbation_hessian_diagonal`, the estimate
  the ``aphq`` reconstruction loss uses; the rest of the teacher after the MLP is the float tail), scaled to mean 1;
- the *student* MLP (the same weights, ReLU) is fitted by Adam with a cosine learning-rate decay to::

      L = Σ w ⊙ (fc2(relu(fc1 x)) − y)²  +  2 · Σ w ⊙ (fc2(clamp(relu(fc1 x), 0, u)) − y)²

  (sums over channels, means over tokens and images, ``x`` of a random mini-batch of images): the second term
  fits the MLP as its quantized ``fc2`` input will clip it. Only ``fc1`` and ``fc2`` are learned.

Every MLP is fitted on the teacher's inputs (not on the outputs of the already refitted MLPs before it), as the
released code does, so the MLPs are independent. The network changes: its float accuracy is its own row.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from vitq.calib.losses import perturbation_hessian_diagonal, squared_error, unit_mean
from vitq.calib.runner import run_batched
from vitq.errors import VitqError

#: the weight of the clipped term (APHQ-ViT's code)
CLIPPED_WEIGHT = 2.0


def gelu_mlps(model: nn.Module) -> list[str]:
    """The paths of the MLPs whose activation is a GELU (timm's ``Mlp``: ``fc1``, ``act``, ``fc2``)."""
    return [name for name, module in model.named_modules()
            if isinstance(getattr(module, "act", None), nn.GELU) and hasattr(module, "fc1") and hasattr(module, "fc2")]


def swap_gelu_for_relu(model: nn.Module) -> list[str]:
    """Make every GELU MLP's activation a ReLU (in place); returns their paths, a one-line error if there are none."""
    paths = gelu_mlps(model)
    if not paths:
        raise VitqError(f"MLP reconstruction needs MLPs with a GELU (fc1, act, fc2); {type(model).__name__} has none")
    for path in paths:
        model.get_submodule(path).act = nn.ReLU()
    return paths


def positive_quantile(values: torch.Tensor, q: float, *, limit: int = 1 << 22,
                      generator: torch.Generator | None = None) -> float:
    """The ``q`` quantile of the positive entries of ``values`` (of a random subset of ``limit`` of them when there
    are more: ``torch.quantile`` takes at most 2^24 elements); 0 when none is positive."""
    positive = values[values > 0]
    if positive.numel() == 0:
        return 0.0
    if positive.numel() > limit:
        positive = positive[torch.randperm(positive.numel(), generator=generator)[:limit].to(positive.device)]
    return float(torch.quantile(positive.float(), q))


def fit_mlp(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bound: float, *,
            iterations: int, batch_size: int, lr: float, generator: torch.Generator) -> tuple[float, float]:
    """Fit ``mlp.fc1`` and ``mlp.fc2`` (ReLU between them) to ``y = teacher(x)`` by the loss of the module notes;
    returns the loss on all images before and after."""
    params = [p for layer in (mlp.fc1, mlp.fc2) for p in (layer.weight, layer.bias) if p is not None]

    def loss(index) -> torch.Tensor:
        hidden = torch.relu(mlp.fc1(x[index]))
        return (squared_error(mlp.fc2(hidden), y[index], weight)
                + CLIPPED_WEIGHT * squared_error(mlp.fc2(hidden.clamp(max=bound)), y[index], weight))

    def total() -> float:
        with torch.no_grad():
            return sum(float(loss(slice(i, i + batch_size))) * len(x[i:i + batch_size])
                       for i in range(0, len(x), batch_size)) / len(x)

    before = total()
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
    try:
        with torch.enable_grad():
            for _ in range(iterations):
                index = torch.randperm(len(x), generator=generator)[:batch_size].to(x.device)
                optimizer.zero_grad()
                loss(index).backward()
                optimizer.step()
                schedule.step()
    finally:
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    return before, total()


def reconstruct_mlps(qmodel, teacher, images: torch.Tensor, *, iterations: int, batch_size: int, lr: float,
                     percentile: float, temperature: float, eps: float, seed: int,
                     progress: bool = True) -> list[tuple[str, float, float, float]]:
    """Refit every ReLU MLP of ``qmodel`` (quantizers off) to its GELU counterpart in ``teacher`` (a float
    :class:`~vitq.quantized_model.QuantizedModel` of the original model, same adapter, so the same stages and module
    names); returns ``(mlp path, upper bound, loss before, loss after)`` per MLP."""
    generator = torch.Generator().manual_seed(seed)
    stages = teacher.stages()
    with torch.no_grad():
        float_logits = run_batched(teacher.model, images, batch_size)
    records = []
    x = images
    with qmodel.quantization_disabled():
        for index, stage in enumerate(tqdm(stages, desc="MLP reconstruction", disable=not progress)):
            for path in [p for p in gelu_mlps(teacher.model) if stage.contains(p + ".fc1")]:
                records.append(_reconstruct_one(qmodel, teacher, stages, index, path, x, float_logits,
                                                iterations=iterations, batch_size=batch_size, lr=lr,
                                                percentile=percentile, temperature=temperature, eps=eps,
                                                generator=generator))
            with torch.no_grad():
                x = run_batched(stage.run, x, batch_size)
    return records


def _reconstruct_one(qmodel, teacher, stages, index: int, path: str, stage_input: torch.Tensor,
                     float_logits: torch.Tensor, *, iterations: int, batch_size: int, lr: float, percentile: float,
                     temperature: float, eps: float, generator: torch.Generator) -> tuple[str, float, float, float]:
    """Capture the teacher MLP's input, output and ``fc2`` input on the stage's input, weight its output by the
    perturbation Hessian, and fit the student's MLP at ``path``."""
    mlp = teacher.model.get_submodule(path)
    inputs, outputs, hidden = [], [], []

    def capture(module, args, out) -> None:
        inputs.append(args[0])
        outputs.append(out)

    hooks = [mlp.register_forward_hook(capture),
             mlp.fc2.register_forward_hook(lambda m, a, out: hidden.append(a[0]))]
    try:
        with torch.no_grad():
            run_batched(stages[index].run, stage_input, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    x, y = torch.cat(inputs), torch.cat(outputs)
    bound = positive_quantile(torch.cat(hidden), percentile, generator=generator)
    hidden.clear()  # the largest capture: free it before the Hessian passes
    weight = unit_mean(_mlp_output_hessian(teacher, stages, index, mlp, stage_input, y, float_logits,
                                           temperature=temperature, eps=eps, batch_size=batch_size,
                                           generator=generator))
    before, after = fit_mlp(qmodel.model.get_submodule(path), x, y, weight, bound, iterations=iterations,
                            batch_size=batch_size, lr=lr, generator=generator)
    return path, bound, before, after


def _mlp_output_hessian(teacher, stages, index: int, mlp: nn.Module, stage_input: torch.Tensor, y: torch.Tensor,
                        float_logits: torch.Tensor, *, temperature: float, eps: float, batch_size: int,
                        generator: torch.Generator) -> torch.Tensor:
    """The averaged Hessian diagonal of the prediction KL w.r.t. the MLP's output ``y`` (shape ``[1, ...]``): the
    tail puts its argument in place of the MLP's output and runs the rest of the stage and the later stages."""
    total, count = torch.zeros_like(y[:1]), 0
    for start in range(0, len(y), batch_size):
        batch = slice(start, start + batch_size)

        def tail(u: torch.Tensor, batch=batch) -> torch.Tensor:
            hook = mlp.register_forward_hook(lambda m, a, out: u)
            try:
                out = stages[index].run(stage_input[batch])
            finally:
                hook.remove()
            for stage in stages[index + 1:]:
                out = stage.run(out)
            return out

        n = len(y[batch])
        total += n * perturbation_hessian_diagonal(y[batch], tail, float_logits[batch], eps=eps,
                                                   temperature=temperature, probes=1, batch_size=n,
                                                   generator=generator)
        count += n
    return (total / count).abs()
