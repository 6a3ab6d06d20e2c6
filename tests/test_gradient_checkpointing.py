"""`gradient_checkpointing=true`: the networks recompute their activations in the backward pass, and the step's
loss and gradients stay those of a normal step. (A real train.py run with it: tests/test_compile.py.)"""

from __future__ import annotations

import pytest
import torch

from dalle_lightning.errors import UserError
from test_compile import clip_step, upsampler_step
from test_prior import make_prior

# A module inside a checkpointed block, which the backward pass calls a second time. (A pre-hook: torch stops
# the recomputation as soon as it has every saved tensor, before the last module's forward returns.)
INNER_BLOCK = {"clip": "model.vision_model.encoder.layers.0.mlp", "upsampler": "unet.down_blocks.0.resnets.0.conv1"}


def _step_with_forward_count(module, step, block):
    calls = []
    hook = module.get_submodule(block).register_forward_pre_hook(lambda *_: calls.append(1))
    module.zero_grad()
    torch.manual_seed(0)
    loss = step()
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("build", [clip_step, upsampler_step], ids=["clip", "upsampler"])
def test_checkpointed_step_recomputes_and_keeps_loss_and_gradients(build, tmp_path, tiny_clip_export, shapes_root):
    module, step = build(tmp_path, tiny_clip_export, shapes_root)
    block = INNER_BLOCK["clip" if build is clip_step else "upsampler"]
    loss, grads, plain_calls = _step_with_forward_count(module, step, block)

    module.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed_grads, calls = _step_with_forward_count(module, step, block)

    assert calls == 2 * plain_calls > 0  # the block ran again during backward
    assert torch.allclose(checkpointed_loss, loss, rtol=1e-5, atol=1e-6)
    assert checkpointed_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_prior_says_it_cannot_checkpoint(tmp_path, tiny_clip_export):
    with pytest.raises(UserError, match=r"gradient_checkpointing=true: PriorModule's networks do not support it"):
        make_prior(tmp_path, tiny_clip_export).enable_gradient_checkpointing()
