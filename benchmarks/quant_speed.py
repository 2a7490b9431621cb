"""Quantized inference speed (issue 5): a GPT with RANDOM weights, every format/backend vs bf16.

The model is the project's GPT (``lightning_speedup.bench.models``). ``--model gpt`` (the default): 24 layers,
16 heads, width 2048, vocabulary 50304 (1.31B parameters). ``--model char-lm``: the bench's char-LM exactly
(``GPTConfig()``: 6 layers, 6 heads, width 384, context 256, vocabulary 65, 10.7M parameters), whose trained
accuracy after quantization quant_accuracy.py measures. Initialised randomly and cast to bfloat16: speed does
not depend on the weights' values, so no checkpoint is needed; quality numbers come from quant_accuracy.py.
PTQ (``quantize``) quantizes all 96 Linear layers of the blocks; the tied embedding / lm_head stays
bf16 in every configuration.

Measured per configuration, all in one process, interleaved (A B C ... A B C ...), median of
``--repeats``:

* decode: batch 1, greedy, KV cache of ``--context`` positions (static shapes), one token per step;
  the step is captured in a CUDA graph (``--no-graphs`` to time eager) so that the number reflects
  the kernels and not Python/launch overhead. Tokens/s over ``--decode-tokens`` steps.
* prefill: ``model(idx)`` on a 16 x 512 batch (``--prefill-batch``, ``--prefill-len``); tokens/s.
* weight memory: bytes of the quantized Linear layers vs their bf16 size, and of the whole model; the KV
  cache's bytes; and the peak memory each configuration allocates on top of what it holds while it prefills and
  while it decodes (``prefill_peak_extra_bytes``, ``decode_peak_extra_bytes``; CUDA only).
* latency: milliseconds per decoded token and per prefill batch (from the medians).
* correctness: max |logits - reference| / max |reference| on a small batch (``rel_err_vs_fake_quant``)
  and on one token (``rel_err_1tok_vs_fake_quant``: every Linear sees one row, the decode path of the
  GEMV backends), where the reference is the fake-quantized model of the same format (what QAT
  trains), so a broken kernel shows.

Configurations: bf16; int8 weight-only (torch dequant); int8 weights + int8 dynamic activations via
``torch._int_mm``, via bitsandbytes ``Linear8bitLt`` and via the Triton int8 GEMM with a fused rescale
(``lightning_speedup.quantization.triton_int8``); int4 g=32 via torch dequant, tinygemm and the
Triton GEMV (``lightning_speedup.quantization.triton_gemv``); nf4 and fp4 via bitsandbytes
``Linear4bit``; nf4 via torch dequant and the Triton GEMV. A configuration whose backend cannot run
here (a CUDA-only backend under ``--accelerator cpu``, a missing package) is skipped with its reason.
The Triton configurations autotune their tile on the first decode step, before the CUDA graph capture.

Expected runtime on one H100: about 1.5 minutes (model build and quantization ~40 s, timing ~30 s).
Goals of the issue: 4-bit decode >= 1.5x bf16; int8 prefill >= 1.3x bf16 through torch._int_mm.

Run on the device (bitsandbytes is not installed there: carry its wheel in .whl/):
    source benchmarks/device_env.sh && python benchmarks/quant_speed.py --out $OUT/quant_speed.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_speedup.bench.env import device_label, environment
from lightning_speedup.bench.models import GPT, GPTConfig, count_parameters
from lightning_speedup.quantization import BACKENDS, prepare, quantize, quantized_layers, weight_bytes
from lightning_speedup.quantization.triton_gemv import triton_unavailable

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quant_speed.json"
DEVICE = "cuda"  # "cpu" only for a plumbing check (--accelerator cpu with a small --layers/--width)


@dataclass(frozen=True)
class Config:
    name: str
    weights: str | None  # None: the bf16 baseline
    activations: str | None = None
    backend: str = "torch"
    group_size: int | None = None


CONFIGS = [
    Config("bf16", None),
    Config("int8_torch", "int8"),
    Config("w8a8_torch_int_mm", "int8", "int8", "torch"),
    Config("w8a8_bnb", "int8", "int8", "bnb"),
    Config("w8a8_triton", "int8", "int8", "triton"),
    Config("int4_g32_torch", "int4", None, "torch", 32),
    Config("int4_g32_tinygemm", "int4", None, "tinygemm", 32),
    Config("int4_g32_triton", "int4", None, "triton", 32),
    Config("nf4_bnb", "nf4", None, "bnb"),
    Config("nf4_torch", "nf4", None, "torch"),
    Config("nf4_triton", "nf4", None, "triton"),
    Config("fp4_bnb", "fp4", None, "bnb"),
]


# --------------------------------------------------------------------------------------------------
# KV-cache decoding with the model's own (possibly quantized) layers
# --------------------------------------------------------------------------------------------------


class Decoder:
    """Greedy batch-1 decoding with a static KV cache; ``step()`` has static shapes (CUDA-graph safe).

    ``pos`` and ``tok`` live on the GPU and are advanced inside the step, so replaying a captured
    graph N times decodes N tokens.
    """

    def __init__(self, model: GPT, context: int, start: int) -> None:
        cfg = model.cfg
        self.model = model
        self.n_head, self.head = cfg.n_head, cfg.n_embd // cfg.n_head
        dev, dtype = model.tok_emb.weight.device, model.tok_emb.weight.dtype
        shape = (1, self.n_head, context, self.head)
        gen = torch.Generator(device=dev).manual_seed(0)
        # A filled cache: random keys/values stand in for a prompt of `start` tokens. One tensor per layer
        # (as gpt-fast keeps them), not views of one: compiled, a write into a view of a shared cache is
        # functionalized into a copy of the whole cache per layer (it halved compiled decode), while a
        # write into a tensor of its own is done in place.
        self.k = [torch.randn(shape, device=dev, dtype=dtype, generator=gen) for _ in range(cfg.n_layer)]
        self.v = [torch.randn(shape, device=dev, dtype=dtype, generator=gen) for _ in range(cfg.n_layer)]
        self.positions = torch.arange(context, device=dev)
        self.pos = torch.tensor([start], device=dev)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)

    @torch.no_grad()
    def step(self) -> None:
        m = self.model
        x = m.tok_emb(self.tok) + m.pos_emb(self.pos)  # (1, 1, C)
        mask = (self.positions <= self.pos).view(1, 1, 1, -1)
        for i, block in enumerate(m.blocks):
            q, k, v = block.attn.qkv(block.ln1(x)).split(x.shape[-1], dim=2)
            q, k, v = (
                t.view(1, 1, self.n_head, self.head).transpose(1, 2) for t in (q, k, v)
            )  # (1, nh, 1, hs)
            self.k[i][:, :, self.pos] = k  # index_put_: in place, also when compiled
            self.v[i][:, :, self.pos] = v
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask)
            x = x + block.attn.proj(y.transpose(1, 2).reshape(1, 1, -1))
            x = x + block.mlp(block.ln2(x))
        logits = m.lm_head(m.ln_f(x))  # (1, 1, vocab)
        self.tok.copy_(logits.argmax(dim=-1))
        self.pos.add_(1)


def make_decode_runner(model: GPT, args: argparse.Namespace) -> tuple[Any, bool, str | None]:
    """A callable that decodes ``args.decode_tokens`` tokens, graphed if possible."""
    dec = Decoder(model, args.context, start=args.context // 2)
    if args.compile:
        # Inductor fuses each layer's dequantization (and W8A8's activation quantization and rescale) into
        # the kernels around the matmul, as torchao does; the compiled step is then captured as before.
        dec.step = torch.compile(dec.step, dynamic=False)  # type: ignore[method-assign]
    n = args.decode_tokens

    def reset() -> None:
        dec.pos.fill_(args.context // 2)

    for _ in range(3):  # warm-up: lazy initialisation inside layers (bitsandbytes) happens here
        dec.step()
    reset()
    _sync()
    if args.no_graphs or DEVICE != "cuda":
        return (lambda: (reset(), [dec.step() for _ in range(n)])), False, None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dec.step()
        torch.cuda.current_stream().wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dec.step()
        reset()

        def run() -> None:
            reset()
            for _ in range(n):
                graph.replay()

        return run, True, None
    except Exception as err:  # a kernel that cannot be captured: time it eagerly and say so
        torch.cuda.synchronize()
        reset()
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        return (lambda: (reset(), [dec.step() for _ in range(n)])), False, reason


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_extra_bytes(fn: Any) -> int | None:
    """Bytes ``fn`` allocates at its peak on top of what was allocated before it (CUDA only, else None)."""
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def timed(fn: Any) -> float:
    if DEVICE != "cuda":
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


# --------------------------------------------------------------------------------------------------


# The model presets: layers, heads, width, context (the KV cache's length) and vocabulary.
PRESETS: dict[str, dict[str, int]] = {
    "gpt": {"layers": 24, "heads": 16, "width": 2048, "context": 1024, "vocab": 50304},
    "char-lm": {
        "layers": GPTConfig.n_layer, "heads": GPTConfig.n_head, "width": GPTConfig.n_embd,
        "context": GPTConfig.block_size, "vocab": GPTConfig.vocab_size,
    },
}  # fmt: skip


def resolve_shape(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the shape arguments left unset from ``--model``'s preset; refuse a prefill longer than the context."""
    for key, value in PRESETS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.prefill_len is None:
        args.prefill_len = min(512, args.context)
    if args.prefill_len > args.context:
        parser.error(
            f"--prefill-len {args.prefill_len} exceeds the context ({args.context}); lower it or raise --context"
        )


def build_model(args: argparse.Namespace) -> GPT:
    cfg = GPTConfig(
        vocab_size=args.vocab, block_size=args.context, n_layer=args.layers, n_head=args.heads, n_embd=args.width,
        dropout=0.0, bias=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT(cfg)
    return model.to(torch.bfloat16).eval()


def skip_reason(c: Config) -> str | None:
    """Why a configuration cannot run on this machine (backend device, missing package), or None."""
    if c.weights is None:
        return None
    devices = BACKENDS[c.backend].devices
    if DEVICE not in devices:
        return f"backend {c.backend!r} runs on {'/'.join(devices)}, not {DEVICE}"
    if c.backend == "triton":
        return triton_unavailable()
    return None


def quantize_config(model: GPT, c: Config) -> nn.Module:
    if c.weights is None:
        return model
    return quantize(
        model, c.weights, c.activations, group_size=c.group_size, backend=c.backend, exclude=["lm_head"],
        exclude_first_last=False,
    )  # fmt: skip


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the block Linear layers (quantized or bf16)."""
    total = 0
    for name, module in model.named_modules():
        if not name.startswith("blocks.") or name.count(".") > 3:
            continue
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    total += sum(m.nbytes() for n, m in quantized_layers(model) if n.startswith("blocks."))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--model", choices=sorted(PRESETS), default="gpt",
        help="shape preset: 'gpt' (1.31B) or 'char-lm' (the bench's char-LM); the flags below override it",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--context", type=int, default=None, help="KV-cache length (decode) and block size")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument(
        "--prefill-len", type=int, default=None, help="default: 512, or the context if shorter"
    )
    parser.add_argument("--no-graphs", action="store_true", help="time decoding eagerly (no CUDA graphs)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every configuration (prefill: the model; decode: the step, then graphed); the "
        "Triton kernels are custom ops, so each is one graph",
    )
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (bf16 is always run)")
    parser.add_argument(
        "--accelerator", default="gpu", choices=["gpu", "cpu"], help="'cpu': plumbing check only"
    )
    args = parser.parse_args()
    resolve_shape(args, parser)
    global DEVICE
    DEVICE = "cuda" if args.accelerator == "gpu" else "cpu"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("quant_speed.py measures CUDA kernels; run it on the device machine.")
    if args.compile:  # one compiled step and model per configuration: do not fall back to eager after 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    started = time.time()
    log = lambda msg: print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)  # noqa: E731

    base = build_model(args)
    n_params = count_parameters(base)
    log(f"GPT ({args.model}) with random weights: {n_params / 1e6:,.1f}M parameters, bf16")
    chosen = [c for c in CONFIGS if args.only is None or c.weights is None or c.name in args.only]

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    prefill_idx = torch.randint(
        0, args.vocab, (args.prefill_batch, args.prefill_len), device=DEVICE, generator=gen
    )
    check_idx = prefill_idx[:2, :64]
    check_tok = prefill_idx[:1, :1]  # one row per Linear: the decode path

    models: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    references: dict[tuple[str, str | None, int | None], tuple[Tensor, Tensor]] = {}
    for c in chosen:
        entry: dict[str, Any] = {"weights": c.weights, "activations": c.activations, "backend": c.backend}
        reason = skip_reason(c)
        if reason is not None:
            entry["skipped"] = reason
            info[c.name] = entry
            log(f"{c.name}: skipped ({reason})")
            continue
        try:
            t0 = time.time()
            model = quantize_config(base, c)
            entry["quantize_s"] = time.time() - t0
            entry["weight_bytes_total"] = weight_bytes(model)
            entry["weight_bytes_block_linears"] = linear_bytes(model)
            with torch.no_grad():
                out = model(check_idx).float()
                out_tok = model(check_tok).float()  # the first one-row call also autotunes Triton kernels
                key = (c.weights or "bf16", c.activations, c.group_size)
                if key not in references:
                    if c.weights is None:
                        references[key] = (out, out_tok)
                    else:  # the fake-quantized model: what QAT trains and convert() must reproduce
                        fq = prepare(
                            copy.deepcopy(base), c.weights, c.activations, group_size=c.group_size,
                            exclude=["lm_head"], exclude_first_last=False,
                        )  # fmt: skip
                        references[key] = (fq(check_idx).float(), fq(check_tok).float())
                        del fq
                ref, ref_tok = references[key]
                entry["rel_err_vs_fake_quant"] = float((out - ref).abs().max() / ref.abs().max())
                entry["rel_err_1tok_vs_fake_quant"] = float(
                    (out_tok - ref_tok).abs().max() / ref_tok.abs().max()
                )
                bf16 = references[("bf16", None, None)][0]
                entry["rel_err_vs_bf16"] = float((out - bf16).abs().max() / bf16.abs().max())
            entry["decode_run"], entry["cuda_graph"], entry["graph_error"] = make_decode_runner(model, args)
            models[c.name] = torch.compile(model, dynamic=False) if args.compile else model
            log(f"{c.name}: ready ({entry['quantize_s']:.1f}s, graph={entry['cuda_graph']})")
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            traceback.print_exc()
            log(f"{c.name}: FAILED {entry['error']}")
        info[c.name] = entry
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    runs: dict[str, dict[str, list[float]]] = {n: {"decode_tok_s": [], "prefill_tok_s": []} for n in models}
    with torch.no_grad():
        for model in models.values():  # warm-up of prefill (cuBLAS heuristics, lazy state)
            model(prefill_idx)
        _sync()
        for repeat in range(args.repeats):
            for name, model in models.items():  # interleaved: A B C ... A B C ...
                seconds = timed(info[name]["decode_run"])
                runs[name]["decode_tok_s"].append(args.decode_tokens / seconds)
                seconds = timed(lambda m=model: m(prefill_idx))
                runs[name]["prefill_tok_s"].append(prefill_idx.numel() / seconds)
            log(f"repeat {repeat} done")
        for name, model in models.items():  # after the timing, so that it cannot disturb it
            info[name]["prefill_peak_extra_bytes"] = peak_extra_bytes(lambda m=model: m(prefill_idx))
            info[name]["decode_peak_extra_bytes"] = peak_extra_bytes(info[name]["decode_run"])

    medians = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in runs.items()}
    base_m = medians.get("bf16", {})
    for m in medians.values():
        m["decode_ms_per_token"] = 1e3 / m["decode_tok_s"]
        m["prefill_ms_per_batch"] = 1e3 * args.prefill_batch * args.prefill_len / m["prefill_tok_s"]
        m["decode_vs_bf16"] = m["decode_tok_s"] / base_m["decode_tok_s"] if base_m else float("nan")
        m["prefill_vs_bf16"] = m["prefill_tok_s"] / base_m["prefill_tok_s"] if base_m else float("nan")
    four_bit = [n for n in medians if info[n]["weights"] in ("int4", "nf4", "fp4")]
    best_4bit = max(four_bit, key=lambda n: medians[n]["decode_vs_bf16"], default=None)
    goals = {
        "best_4bit_decode_at_least_1.5x": None
        if best_4bit is None
        else medians[best_4bit]["decode_vs_bf16"] >= 1.5,
        "int8_int_mm_prefill_at_least_1.3x": medians.get("w8a8_torch_int_mm", {}).get("prefill_vs_bf16", 0)
        >= 1.3,
        "int8_triton_prefill_at_least_1.3x": medians.get("w8a8_triton", {}).get("prefill_vs_bf16", 0) >= 1.3,
    }
    env = environment()
    for entry in info.values():
        entry.pop("decode_run", None)
    record = {
        "benchmark": "quant_speed",
        "issue": 5,
        "note": "GPT with RANDOM weights (speed only); block Linear layers quantized, lm_head/embedding bf16",
        "env": env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seeds": {"model_init": 0, "inputs": 1},
        "parameters": n_params,
        # keys and values of every layer, bf16, batch 1, the whole context (Decoder's static cache)
        "kv_cache_bytes": 2 * args.layers * args.context * args.width * torch.finfo(torch.bfloat16).bits // 8,
        "configs": info,
        "runs": runs,
        "medians": medians,
        "best_4bit_decode": best_4bit,
        "goals": goals,
        "wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str))

    print(f"\n{device_label(env)} | torch {env['torch']} | {n_params / 1e6:,.1f}M-parameter random-weight GPT "
          f"| median of {args.repeats} | {record['wall_s']:.0f}s | {args.out}")  # fmt: skip
    print(
        f"{'config':20s} {'decode tok/s':>12s} {'ms/token':>8s} {'vs bf16':>8s} {'prefill tok/s':>14s} "
        f"{'vs bf16':>8s} {'linears GiB':>11s} {'prefill peak MiB':>16s} {'err vs fq':>9s} {'1tok err':>9s} "
        f"{'graph':>5s}"
    )
    for c in chosen:
        e = info[c.name]
        if c.name not in medians:
            print(
                f"{c.name:20s} "
                + (f"skipped: {e['skipped']}" if "skipped" in e else f"FAILED: {e.get('error')}")
            )
            continue
        m = medians[c.name]
        print(
            f"{c.name:20s} {m['decode_tok_s']:12,.1f} {m['decode_ms_per_token']:8.3f} {m['decode_vs_bf16']:7.2f}x "
            f"{m['prefill_tok_s']:14,.0f} {m['prefill_vs_bf16']:7.2f}x {e['weight_bytes_block_linears'] / 2**30:11.3f} "
            f"{_mib(e.get('prefill_peak_extra_bytes')):>16s} "
            f"{e['rel_err_vs_fake_quant']:9.1e} {e['rel_err_1tok_vs_fake_quant']:9.1e} "
            f"{'yes' if e['cuda_graph'] else 'no':>5s}"
        )
    print(
        "goals: "
        + ", ".join(f"{k}={'yes' if v else 'NO' if v is not None else 'n/a'}" for k, v in goals.items())
    )


if __name__ == "__main__":
    main()
