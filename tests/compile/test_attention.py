"""SDPABackends: which kernels scaled_dot_product_attention may use while the Trainer runs (CPU: flash or math)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup import SDPABackends
from lightning_speedup.bench.models import GPT, GPTConfig


def _switches() -> tuple[bool, bool, bool, bool]:
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()


class _LM(L.LightningModule):
    """A 2-layer GPT; each training step records the kernel SDPA picks for the model's attention shape."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
        self.fail_at = fail_at
        self.kernels: list[int] = []
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        q = torch.randn(4, 2, 8, 8)
        self.kernels.append(int(torch._fused_sdp_choice(q, q, q, is_causal=True)))
        x, y = batch
        loss = F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callbacks: list[L.Callback], tmp_path: Any, fail_at: int | None = None) -> _LM:
    torch.manual_seed(0)
    data = torch.randint(0, 16, (16, 9))
    model = _LM(fail_at)
    L.Trainer(
        accelerator="cpu", max_steps=4, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    ).fit(model, DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4))  # fmt: skip
    return model


def test_training_uses_only_the_named_kernels_and_the_switches_come_back(tmp_path: Any) -> None:
    before = _switches()
    default = _fit([], tmp_path)
    assert set(default.kernels) == {int(SDPBackend.FLASH_ATTENTION)}  # CPU's default for this shape
    math_only = _fit([SDPABackends(["math"])], tmp_path)
    assert set(math_only.kernels) == {int(SDPBackend.MATH)} and len(math_only.kernels) == 4
    assert _switches() == before
    # The math kernel computes the same attention: the same training, to float rounding.
    torch.testing.assert_close(
        torch.tensor(math_only.losses), torch.tensor(default.losses), atol=1e-5, rtol=1e-5
    )


def test_switches_come_back_when_the_run_raises(tmp_path: Any) -> None:
    before = _switches()
    with pytest.raises(RuntimeError, match="boom"):
        _fit([SDPABackends(["math"])], tmp_path, fail_at=2)
    assert _switches() == before


def test_unusable_choice_off_cuda_fails_before_training(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="only the 'flash' and 'math' kernels"):
        _fit([SDPABackends(["cudnn", "efficient"])], tmp_path)
    assert all(_switches())


def test_a_choice_that_changes_nothing_warns(tmp_path: Any) -> None:
    # The default leaves out cuDNN, which a CPU never runs.
    with pytest.warns(UserWarning, match="changes nothing on cpu"):
        model = _fit([SDPABackends()], tmp_path)
    assert set(model.kernels) == {int(SDPBackend.FLASH_ATTENTION)}


@pytest.mark.parametrize(
    ("backends", "match"),
    [
        (["flash", "fast"], r"unknown: \['fast'\]"),
        ([], "name one or more"),
        (["math", "math"], "each once"),
        ("flash", r"takes a list of names, e.g. \['flash'\]"),
    ],
)
def test_bad_backends_are_refused(backends: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SDPABackends(backends)
