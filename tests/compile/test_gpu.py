"""GPU tests (skipped on CPU): EagerCUDAGraphs trains like eager; Compile's regional compile and artifact cache;
SDPABackends' choice of attention kernel."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup.bench.models import GPT, GPTConfig, ResNet9
from lightning_speedup.compile import Compile, EagerCUDAGraphs, SDPABackends


class _Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = ResNet9(width=8)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


class _LM(L.LightningModule):
    """A 2-layer GPT with tied embeddings and SDPA attention, as the char-LM's `speedup` graphs it."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.net = GPT(
            GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        return F.cross_entropy(self.net(x).float().flatten(0, 1), y.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(
    precision: str, callbacks: list[L.Callback], drop_last: bool = True, lm_dropout: float | None = None
) -> list[float]:
    torch.manual_seed(0)
    if lm_dropout is None:
        x, y = torch.randn(16 * 32, 1, 28, 28), torch.randint(0, 10, (16 * 32,))
    else:
        x, y = torch.randint(0, 32, (16 * 32, 16)), torch.randint(0, 32, (16 * 32, 16))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, drop_last=drop_last)
    losses = _Losses()
    model = _Classifier() if lm_dropout is None else _LM(lm_dropout)
    L.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_epochs=2, callbacks=[*callbacks, losses],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, loader)  # fmt: skip
    return losses.losses


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tol"), [("32-true", 1e-3), ("bf16-mixed", 3e-2)])
def test_eager_cuda_graphs_train_like_eager(precision: str, tol: float) -> None:
    torch.backends.cudnn.deterministic = True
    eager = _fit(precision, [])
    graphs = EagerCUDAGraphs()
    graphed = _fit(precision, [graphs])
    assert graphs.graphed and len(graphed) == len(eager) == 32
    assert graphs.capture_s is not None and graphs.capture_s > 0
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), atol=tol, rtol=tol)


@pytest.mark.gpu
def test_eager_cuda_graphs_train_a_gpt_like_eager() -> None:
    """Token inputs, tied weights, SDPA: the graphed GPT's losses match eager ones; with dropout (whose RNG the
    graphs replay with fresh offsets) it still trains."""
    eager = _fit("bf16-mixed", [], lm_dropout=0.0)
    graphs = EagerCUDAGraphs()
    graphed = _fit("bf16-mixed", [graphs], lm_dropout=0.0)
    assert graphs.graphed and len(graphed) == len(eager) == 32
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), atol=3e-2, rtol=3e-2)
    with_dropout = _fit("bf16-mixed", [EagerCUDAGraphs()], lm_dropout=0.2)
    assert all(torch.isfinite(torch.tensor(with_dropout))) and len(set(with_dropout)) > 1


@pytest.mark.gpu
def test_eager_cuda_graphs_end_with_the_fit_and_a_second_fit_captures_again() -> None:
    """make_graphed_callables makes the module's forward an instance attribute bound to its tensors: kept after
    the fit, a deep copy of the model (quantize, an EMA copy) ran the original's weights, and a second fit with
    the same callback never captured. The fit now ends with the class's forward back."""
    import copy

    torch.manual_seed(0)
    x, y = torch.randn(8 * 32, 1, 28, 28), torch.randint(0, 10, (8 * 32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, drop_last=True)
    model, graphs = _Classifier(), EagerCUDAGraphs()

    def fit() -> None:
        L.Trainer(
            accelerator="gpu", devices=1, max_epochs=1, callbacks=[graphs], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        ).fit(model, loader)  # fmt: skip

    fit()
    assert graphs.graphed and graphs.capture_s is not None and "forward" not in model.net.__dict__
    copied = copy.deepcopy(model).train()
    with torch.no_grad():
        for p in copied.parameters():
            p.zero_()
        sample = x[:32]  # the fit ends with the model back on the CPU (Lightning's strategy teardown)
        assert not torch.equal(copied.net(sample), model.train().net(sample))
    graphs.capture_s = None
    fit()
    assert graphs.graphed and graphs.capture_s is not None and "forward" not in model.net.__dict__


@pytest.mark.gpu
def test_eager_cuda_graphs_need_drop_last() -> None:
    with pytest.raises(ValueError, match="drop_last=True"):
        _fit("32-true", [EagerCUDAGraphs()], drop_last=False)


@pytest.mark.gpu
def test_regional_compile_saves_and_reloads_artifacts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    first = Compile(cache_dir=str(tmp_path), measure_steps=2)
    eager = _fit("bf16-mixed", [])
    compiled = _fit("bf16-mixed", [first])
    assert first.compiled and not first._artifacts_hit and any(tmp_path.glob("*.bin"))
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=5e-2, rtol=5e-2)
    torch._dynamo.reset()
    second = Compile(cache_dir=str(tmp_path), measure_steps=2)
    _fit("bf16-mixed", [second])
    assert second._artifacts_hit


class _AttentionKernel(L.Callback):
    """The kernel scaled_dot_product_attention picks at each training step for the bench GPT's attention."""

    def __init__(self) -> None:
        self.kernels: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        q = torch.randn(8, 6, 256, 64, device="cuda", dtype=torch.bfloat16)
        self.kernels.append(int(torch._fused_sdp_choice(q, q, q, is_causal=True)))


@pytest.mark.gpu
def test_sdpa_backends_train_with_flash_like_the_default_kernel() -> None:
    q = torch.randn(8, 6, 256, 64, device="cuda", dtype=torch.bfloat16)
    default = int(torch._fused_sdp_choice(q, q, q, is_causal=True))
    print(f"default attention kernel on {torch.cuda.get_device_name()}: {SDPBackend(default).name}")
    probe = _AttentionKernel()
    flash = _fit("bf16-mixed", [SDPABackends(), probe], lm_dropout=0.0)
    assert set(probe.kernels) == {int(SDPBackend.FLASH_ATTENTION)}
    assert int(torch._fused_sdp_choice(q, q, q, is_causal=True)) == default  # switches restored
    reference = _fit("bf16-mixed", [], lm_dropout=0.0)
    torch.testing.assert_close(torch.tensor(flash), torch.tensor(reference), atol=3e-2, rtol=3e-2)
    # As `speedup-lm-flash` trains: graphed, with dropout (flash's RNG replayed by the graphs).
    graphed = _fit("bf16-mixed", [SDPABackends(), EagerCUDAGraphs()], lm_dropout=0.2)
    assert all(torch.isfinite(torch.tensor(graphed))) and len(set(graphed)) > 1


@pytest.mark.gpu
def test_sdpa_backends_warn_on_cuda_when_the_choice_cannot_help() -> None:
    with pytest.warns(UserWarning, match="changes nothing"):
        _fit("bf16-mixed", [SDPABackends(["cudnn", "flash", "efficient", "math"])], lm_dropout=0.0)
    # fp32 attention has no flash kernel: warned before training, then PyTorch's own error at the first step.
    with (
        pytest.warns(UserWarning, match="take only fp16/bf16"),
        pytest.raises(RuntimeError, match="No available kernel"),
    ):
        _fit("32-true", [SDPABackends(["flash"])], lm_dropout=0.0)
    b = torch.backends.cuda
    assert b.math_sdp_enabled() and b.mem_efficient_sdp_enabled()  # restored after the failed run
