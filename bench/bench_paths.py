"""Inference cost of growth paths: forward tokens/s and MFLOPs per token of the default model shape
as paths are added — the mixture of every path (``grow.inference: mixture``, :func:`hst.paths.mix_paths`)
against the flat-cost selection (``select``, :mod:`hst.paths`), the selection mixed with path 0
(``select_base``) and the pretrained model (no path) —
and generation tokens/s with the key/value-cached :class:`hst.generate.Decoder` against re-running
the whole context for every byte.

Each path has ``grow.experts`` (untrained) experts per layer, an output head of its own (``grow.head:
path``, :mod:`hst.heads`) and a sketch fitted on 200 training
records of one of the prepared domains (path p on domain p mod 6, a different sample of it each
time), so many paths share a domain as a long history of drops would; the batch is validation
windows of every domain. The selection's FLOPs are one path's times the model passes its chosen
segments cost (``ModelOutput.passes``, measured on the batch). Variants run round-robin so
drifts in machine load hit all of them alike; medians of the rounds are reported. Needs the prepared
corpus (``dvc repro prepare``). Untrained paths never let path 0 stop beside the selection (its
weight does not fall), so ``--champion`` also times a trained model with paths (the default
pipeline's last champion) against the pretrained champion on the same batch: the comparison issue 32
sets its targets on — and, beside them, the baselines' networks of the default shape (dense FFN,
standard MoE with a learned router), whose cost does not depend on their weights: the results tables'
"forward tokens/s ÷ dense" column (``hst.runs.forward_speed``) reads them from ``vs_dense``. Writes a
JSON (``--out``) and prints Markdown tables.

    python bench/bench_paths.py [--paths 5 13 33] [--rounds 3] [--champion models/c4_gcide.champion.pt]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from hst import checkpoint, data, paths, sketches
from hst.config import ModelConfig
from hst.evaluation import eval_windows
from hst.generate import Decoder
from hst.model import ALL_PATHS, GPT, INFERENCE, SELECTED_AND_BASE, SELECTED_PATHS
from hst.params import load_section

PREPARED = "data/prepared"


def model_with_paths(cfg: ModelConfig, n_paths: int, experts: int, domains: list[str]) -> GPT:
    """The default model with ``n_paths - 1`` growth paths of ``experts`` (untrained) experts per layer and a head,
    each sketched on a sample of one domain's training records (path 0 on each domain's)."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    records = {d: data.load_records(PREPARED, d, "train") for d in domains}
    if n_paths > 1:
        for r in records.values():
            model.add_path_sketch(sketches.fit_sketch(data.encode(data.sample_records(r, 50, "base"))))
    for path in range(1, n_paths):
        for layer in range(cfg.n_layer):
            router = model.moe(layer).router
            for e in range(experts):
                model.add_expert(layer, router.keys[e % cfg.n_experts] + 0.01 * torch.randn(cfg.d_model), path=path)
        model.path_heads.add(path, model.lm_head.weight)
        domain = domains[path % len(domains)]
        model.add_path_sketch(sketches.fit_sketch(data.encode(data.sample_records(records[domain], 200, str(path)))))
    return model


@torch.no_grad()
def tokens_per_s(model: GPT, idx: torch.Tensor, mode: int, repeats: int) -> float:
    """Forward tokens/s of ``model`` under ``GPT.forward(..., path=mode)``, after one warm-up pass."""
    model(idx, path=mode)
    start = time.perf_counter()
    for _ in range(repeats):
        model(idx, path=mode)
    return repeats * idx.numel() / (time.perf_counter() - start)


@torch.no_grad()
def generation_tokens_per_s(model: GPT, prompt: torch.Tensor, n_bytes: int, cached: bool, path: int) -> float:
    """Greedy bytes per second for a batch on ``path`` (``GPT.forward``): the Decoder's caches, or the whole
    context re-run per byte."""
    start = time.perf_counter()
    if cached:
        decoder = Decoder(model, path)
        logits = decoder.start(prompt)
        for _ in range(n_bytes):
            logits = decoder.step(logits.argmax(-1))
    else:
        seq = prompt
        for _ in range(n_bytes):
            seq = torch.cat([seq, model(seq[:, -model.cfg.seq_len:], path=path).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return n_bytes * len(prompt) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--paths", type=int, nargs="+", default=[5, 13, 33])
    ap.add_argument("--mixture-up-to", type=int, default=13, help="skip the mixture above this many paths (slow)")
    ap.add_argument("--batch", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-bytes", type=int, default=192)
    ap.add_argument("--champion", default="", help="also a trained model with paths "
                    "(e.g. models/c4_gcide.champion.pt), beside --pretrained, on the same batch")
    ap.add_argument("--pretrained", default="models/pretrain.champion.pt")
    ap.add_argument("--champion-eval", default="metrics/eval/c4_gcide.json",
                    help="the champion's last evaluation: a results table row whose run has it gets the champion's speed")
    ap.add_argument("--out", default="docs/bench/paths.json")
    args = ap.parse_args()
    cfg = load_section(args.params, "model", ModelConfig)
    grow_sec = load_section(args.params, "grow")
    domains = data.prepared_domains(PREPARED)
    per = -(-args.batch // len(domains))
    idx = torch.cat([eval_windows(data.load_tokens(PREPARED, d, "val"), cfg.seq_len, per)[:, :-1]
                     for d in domains])[:args.batch]
    models = {p: model_with_paths(cfg, p, grow_sec.get("experts", 4), domains) for p in [1, *args.paths]}
    variants = [("pretrained", 1, 0)] + [(f"{kind}@{p}", p, mode) for p in args.paths
                                         for kind, mode in (("select", SELECTED_PATHS), ("select_base", SELECTED_AND_BASE),
                                                            ("mixture", ALL_PATHS))
                                         if kind != "mixture" or p <= args.mixture_up_to]
    if args.champion:  # trained paths prune path 0 as untrained copies of it cannot
        models["pretrained champion"] = checkpoint.load(args.pretrained)[0].eval()
        models["champion"] = checkpoint.load(args.champion)[0].eval()
        # The baselines' networks: their cost does not depend on their weights (a fixed top-k).
        for name, ffn in (("dense", "dense"), ("standard MoE", "learned")):
            torch.manual_seed(0)
            models[name] = GPT(dataclasses.replace(cfg, ffn=ffn)).eval()
        variants += [(name, name, 0) for name in ("dense", "standard MoE", "pretrained champion")] + [
            (f"champion {kind}", "champion", mode) for kind, mode in (("select", SELECTED_PATHS),
                                                                       ("select_base", SELECTED_AND_BASE),
                                                                       ("mixture", ALL_PATHS))]
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, p, mode in variants:
            runs.setdefault(name, []).append(tokens_per_s(models[p], idx, mode, args.repeats))
    median = {k: statistics.median(v) for k, v in runs.items()}
    passes = {}
    for name, p, mode in variants:
        with torch.no_grad():
            passes[name] = models[p](idx, path=mode).passes
    prompt = idx[:8, :64]
    gen = {}
    for name, p, mode in [("pretrained", 1, 0), (f"select@{args.paths[0]}", args.paths[0], SELECTED_PATHS),
                          (f"select_base@{args.paths[0]}", args.paths[0], SELECTED_AND_BASE)]:
        gen[name] = {"kv_cache": generation_tokens_per_s(models[p], prompt, args.gen_bytes, True, mode),
                     "rerun_context": generation_tokens_per_s(models[p], prompt, args.gen_bytes, False, mode)}
    # The trained champion against the pretrained champion (issue 32's comparison), the rest against
    # the pretrained shape.
    ref = {name: "pretrained champion" if isinstance(p, str) else "pretrained" for name, p, _ in variants}
    ref |= {"dense": "dense", "standard MoE": "dense"}
    unit = {name: models[p if isinstance(p, str) else 1].flops_per_token() for name, p, _ in variants}
    result = {"setup": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "batch": f"{len(idx)}x{cfg.seq_len}",
                        "experts_per_path": grow_sec.get("experts", 4), "rounds": args.rounds,
                        "decisions": list(paths.DECISIONS), "path_0_checks_every": paths.PRUNE_EVERY,
                        "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "generation": f"8 prompts of 64 bytes, {args.gen_bytes} greedy bytes"},
              "forward_tokens_per_s": median,
              "vs_pretrained": {k: v / median[ref[k]] for k, v in median.items()},
              "mflops_per_token": {k: unit[k] * passes[k] / 1e6 for k in median},
              "model_passes_per_token": passes,
              "parameters": {k: sum(t.numel() for t in models[p].parameters()) for k, p, _ in variants},
              "generation_tokens_per_s": gen}
    if args.champion:  # what the results tables read (hst.runs.forward_speed): the run whose last evaluation this is
        result["vs_dense"] = {k: median[k] / median["dense"] for k in ("dense", "standard MoE", "pretrained champion",
                                                                     *(f"champion {m}" for m in INFERENCE))}
        result["champion_eval_md5"] = hashlib.md5(Path(args.champion_eval).read_bytes()).hexdigest()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| model | forward tokens/s | ÷ pretrained | MFLOPs/token | ÷ pretrained | parameters |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for name in median:
        print(f"| {name} | {median[name]:,.0f} | {result['vs_pretrained'][name]:.2f} | "
              f"{result['mflops_per_token'][name]:.2f} | "
              f"{result['mflops_per_token'][name] / result['mflops_per_token'][ref[name]]:.2f} | "
              f"{result['parameters'][name] / 1e6:.1f} M |")
    print("\n| model | generation tokens/s, KV cache | re-run context | speed-up |\n| --- | --- | --- | --- |")
    for name, g in gen.items():
        print(f"| {name} | {g['kv_cache']:,.0f} | {g['rerun_context']:,.0f} | {g['kv_cache'] / g['rerun_context']:.1f}× |")


if __name__ == "__main__":
    main()
