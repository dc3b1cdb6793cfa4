"""Rank plans judged on images: PSNR vs the 16-bit budget for every plan policy, at equal cost.

For each ranked method and each budget (the 16-bit parameters of a uniform rank R, by the method's
own cost function), plans from every policy of the explorer's Rank plan tab (analysis/plans.py),
each spending at most that budget, are evaluated with the image protocol of dirotq/eval (PSNR
against the 16-bit image of the same prompt and seed, paired bootstrap CI against the fixed plan).
The evaluation prompts and seeds are disjoint from everything the plans were fitted on: the
statistics use the first ``--calib-limit`` calibration prompts, the layer sensitivities the next
four, and the evaluation items get seeds from ``--seed`` (default 5000) on.

The reference policies (energy, 16-bit budget, error budget) read the activation spectrum and the
layer error curves of the PCA methods; they run for ``--policy-methods`` (DiRotQ-LR and DiRotQ by
default). SVDQuant is compared with its fixed rank and the output-error allocator on its own curves.
Every method also gets the output-error allocator with one rank per shared-input group of a block
("output error, tied", the default of ``quantize`` and the explorer: the plans under which q/k/v and
the other shared-input layers can run fused). Under the PCA methods (DiRotQ, DiRotQ-LR) the
output-error allocations also give the weight-only layers (PixArt's ff.net.2) a 16-bit branch where it
pays more than a W4A4 layer's rank, from the same budget, as the tool does;
``--w4a4-only-rows`` adds the same allocations over the W4A4 layers alone ("…, W4A4 layers only"),
to show what the branches add.

Extra rows at R = 32 quantify what the fast kernel format and asymmetric activation codes change:
format C ("int_ratio") against format A ("exact"), and asymmetric activation codes (a zero point
per group) in both formats, fake quantization on the reference path.

    python -m benchmarks.bench_rank_plans --out benchmarks/results/rank_plans_tiny_pixart

Writes OUT.json after every row, then OUT.md; ``--html`` also draws OUT.html (analysis.figures).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from analysis import plans
from analysis.stats import spectrum
from benchmarks._bench_common import add_image_study_args
from dirotq.allocate import (view_note, allocate_like_uniform, layer_error_curves, layer_params16, layer_sensitivity,
                             record_transformer_calls, sensitivity_curves, shared_input_units)
from dirotq.methods import BRANCH_METHODS
from dirotq.eval.metrics import paired_bootstrap_diff
from dirotq.eval.protocol import DEFAULT_CALIB_PROMPTS, Evaluator, make_config, read_prompts
from dirotq.eval.report import device_description, versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_image_study_args(ap)
    ap.add_argument("--methods", default="dirotq-lr,dirotq,svdquant")
    ap.add_argument("--policy-methods", default="dirotq-lr,dirotq",
                    help="methods that also get the energy / 16-bit budget / error budget rows")
    ap.add_argument("--budgets", default="16,32", help="uniform ranks whose 16-bit cost each plan may spend")
    ap.add_argument("--out", default="benchmarks/results/rank_plans_tiny_pixart")
    ap.add_argument("--no-extras", action="store_true", help="skip the format / asymmetric rows")
    ap.add_argument("--html", action="store_true", help="also draw OUT.html")
    ap.add_argument("--tied-only", action="store_true",
                    help="of the output-error allocations, only the default (tied): e.g. to confirm it on other seeds")
    ap.add_argument("--w4a4-only-rows", action="store_true",
                    help="also the output-error allocations (tied and per layer) of dirotq / dirotq-lr over the W4A4 "
                         "layers alone, without the weight-only layers' 16-bit branches")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    methods = [m for m in a.methods.split(",") if m]
    budgets = [int(b) for b in a.budgets.split(",") if b]
    ev = Evaluator(a.model, limit=a.limit, seeds_per_prompt=a.seeds, seed=a.seed, num_inference_steps=a.steps,
                   calib_limit=a.calib_limit, out_dir=a.work, judge=False, n_boot=2000)
    stats = ev.stats
    sens_prompts = read_prompts(DEFAULT_CALIB_PROMPTS)[a.calib_limit:a.calib_limit + 4]
    calls = record_transformer_calls(ev.pipe, sens_prompts, num_inference_steps=10, steps=range(0, 10, 2), seed=1,
                                     pipe_kwargs=ev.pipe_kwargs)
    targets = {n: s for n, s in ev.targets.items() if s.kind == "w4a4"}
    weight_only = {n: s for n, s in ev.targets.items() if s.kind != "w4a4"}
    spectra = {}
    out = Path(a.out)
    result = {"meta": {"model": ev.model_name, "n_images": len(ev.items), "eval_seed_base": a.seed,
                       "num_inference_steps": a.steps, "calibration_prompts": a.calib_limit,
                       "sensitivity_prompts": len(sens_prompts), "sensitivity_steps": "0, 2, 4, 6, 8 of 10",
                       "sensitivity_on": view_note(calls.view),
                       "budgets": budgets, "methods": methods, "weights": "rtn",
                       "device": device_description(), "versions": versions(),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "command": " ".join(["python -m benchmarks.bench_rank_plans",
                                            *(sys.argv[1:] if argv is None else argv)])},
              "rows": []}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(result, indent=1))

    def evaluate(label: str, method: str, budget: int, policy: str, config, plan=None, cost=None, fixed=None,
                 predicted=None):
        imgs, report = ev.method_images(label, config)
        fid = ev.fidelity(imgs)
        row = {"method": method, "budget_rank": budget, "policy": policy, "tag": config.tag(),
               "psnr": fid["psnr"], "ssim": fid["ssim"], "per_image_psnr": fid["per_image"]["psnr"]}
        if predicted is not None:  # the allocator's own model: its plan's output error against the fixed plan's
            row["predicted_gain_db"] = predicted
        if plan is not None:
            row["params16"] = plans.plan_params16(plan, cost)
            row["plan"] = plan
        if fixed is not None:
            row["vs_fixed"] = paired_bootstrap_diff(fid["per_image"]["psnr"], fixed["per_image_psnr"], 2000)
        result["rows"].append(row)
        save()
        Path(f"{out}.md").write_text(markdown(result))
        d = row.get("vs_fixed")
        print(f"{method:10s} R={budget:3d} {policy:14s} PSNR {fid['psnr']['mean']:.2f}"
              + (f"  Δ {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d else ""), flush=True)
        return row

    ev.reference_images()
    prepared: dict[str, dict] = {}

    def prepare(method: str) -> dict:
        """Sensitivities, curves and the cost function of ``method`` (once)."""
        if method not in prepared:
            t0 = time.time()
            model = ev.pipe.transformer
            sens = layer_sensitivity(model, calls, stats, make_config(method, rank=0), targets=targets)
            layer_curves = layer_error_curves(model, stats, lambda r: make_config(method, rank=r), targets=targets)
            cfg0 = make_config(method, rank=0)
            result.setdefault("curves_seconds", {})[method] = round(time.time() - t0, 1)
            result.setdefault("sensitivity", {})[method] = sens
            prepared[method] = {"out": sensitivity_curves(layer_curves, sens), "layer": layer_curves, "cfg0": cfg0,
                                "cost": lambda name, r, cfg0=cfg0: layer_params16(ev.targets[name], cfg0, int(r)),
                                "fixed": {}}
            if method in BRANCH_METHODS and weight_only:
                wo_sens = layer_sensitivity(model, calls, stats, cfg0, targets=weight_only, weight_only=True)
                wo_curves = layer_error_curves(model, stats, lambda r: make_config(method, rank=r), targets=weight_only,
                                               weight_only=True)
                result["sensitivity"][method].update(wo_sens)
                prepared[method]["out_weight_only"] = {**prepared[method]["out"],
                                                       **sensitivity_curves(wo_curves, wo_sens)}
        return prepared[method]

    def fixed_row(method: str, budget: int) -> dict:
        p = prepare(method)
        if budget not in p["fixed"]:
            p["fixed"][budget] = evaluate(f"{method}-fixed{budget}", method, budget, "fixed",
                                          make_config(method, rank=budget), plans.fixed_plan(targets, budget), p["cost"])
        return p["fixed"][budget]

    def output_plan(method: str, budget: int, policy: str) -> tuple[dict, dict]:
        """(output curves, plan) of an output-error ``policy`` row: the tool's allocation, in which under
        the PCA methods the weight-only layers' branches compete for the same budget, unless the row is
        the W4A4-only reference; "…, tied…" gives each shared-input group one rank."""
        p = prepare(method)
        curves = p["out"] if policy.endswith(W4A4_ONLY) else p.get("out_weight_only", p["out"])
        tie = shared_input_units(ev.targets) if policy.startswith("output error, tied") else None
        return curves, allocate_like_uniform(curves, ev.targets, p["cfg0"], budget, tie=tie)

    def policy_row(method: str, budget: int, policy: str) -> None:
        p = prepare(method)
        fixed, cost = fixed_row(method, budget), p["cost"]
        limit = plans.plan_params16(plans.fixed_plan(targets, budget), cost)
        predicted = None
        if policy.startswith("output error"):
            curves, plan = output_plan(method, budget, policy)
            predicted = predicted_gain_db(curves, {**plans.fixed_plan(targets, budget),
                                                   **{n: 0 for n in curves if n not in targets}}, plan)
        elif policy == "16-bit budget":
            plan = plans.fill_plan(policy, limit / 1e3, targets, cost=cost, layer_curve=p["layer"].get)
        elif policy == "energy":
            if not spectra:
                spectra.update({n: spectrum(stats.for_layer(n))["eigenvalues"] for n in targets})
            plan = plans.match_budget(lambda f: plans.fill_plan("energy", f, targets, eigenvalues=spectra.get),
                                      cost, limit, 0.0, 1.0, increasing=True)
        else:  # error budget: a larger threshold is cheaper
            plan = plans.match_budget(lambda e: plans.fill_plan("error budget", e, targets, layer_curve=p["layer"].get),
                                      cost, limit, 1e-6, 1.0, increasing=False)
        cfg = make_config(method, rank={"_default": 0, **plan})
        row = evaluate(f"{method}-{policy}{budget}", method, budget, policy, cfg, plan, cost, fixed, predicted)
        if policy.endswith(W4A4_ONLY):  # what the branches add: the tool's plan against this one, paired
            tool = next(r for r in result["rows"] if (r["method"], r["budget_rank"], r["policy"])
                        == (method, budget, policy.removesuffix(f", {W4A4_ONLY}")))
            row["branches_gain"] = paired_bootstrap_diff(tool["per_image_psnr"], row["per_image_psnr"], 2000)
            save()

    # most important first, so an interrupted run still answers the main question: the default
    # allocator against a fixed rank, then the other policies, then the format rows
    for method in methods:  # the default: one rank per shared-input group, so every group can run fused
        for budget in budgets:
            policy_row(method, budget, "output error, tied")
    for method in methods if not a.tied_only else ():
        for budget in budgets:
            policy_row(method, budget, "output error")
    if a.w4a4_only_rows:
        for method in [m for m in methods if m in BRANCH_METHODS and weight_only]:
            for budget in budgets:
                for policy in ("output error, tied",) + (() if a.tied_only else ("output error",)):
                    policy_row(method, budget, f"{policy}, {W4A4_ONLY}")
    if not a.no_extras and 32 in budgets:
        for method in [m for m in methods if m in ("dirotq-lr", "dirotq")]:
            fixed = fixed_row(method, 32)
            cost = prepare(method)["cost"]
            # the noise control: another seed of the random rotation (Hadamard signs, Haar tail) changes
            # every code a little and the expected quality not at all, so its Δ is the protocol's resolution
            seed = make_config(method, rank=32).seed
            variants = [(f"seed {seed + 1} (noise control)", dict(seed=seed + 1)),
                        ("format C", dict(scale_format="int_ratio"))]
            if method == "dirotq-lr":
                variants += [("asymmetric activations", dict(act_symmetric=False)),
                             ("format C, asymmetric activations", dict(scale_format="int_ratio", act_symmetric=False))]
            for what, overrides in variants:
                evaluate(f"{method}-{what}32", method, 32, f"fixed, {what}", make_config(method, rank=32, **overrides),
                         plans.fixed_plan(targets, 32), cost, fixed)
            if method == "dirotq-lr":  # what a GPU deployment would run: the default plan in the kernel format
                _, plan = output_plan(method, 32, "output error, tied")
                for what, overrides in (("format C", dict(scale_format="int_ratio")),
                                        ("format C, asymmetric activations",
                                         dict(scale_format="int_ratio", act_symmetric=False))):
                    evaluate(f"{method}-oe-tied-{what}32", method, 32, f"output error, tied, {what}",
                             make_config(method, rank={"_default": 0, **plan}, **overrides), plan, cost, fixed)
    policy_methods = [m for m in a.policy_methods.split(",") if m in methods]
    for budget in sorted(budgets, reverse=True):
        for method in policy_methods:
            for policy in ("energy", "16-bit budget", "error budget"):
                policy_row(method, budget, policy)
    result["meta"]["seconds"] = round(time.time() - t_start)
    save()
    Path(f"{out}.md").write_text(markdown(result))
    if a.html:
        from analysis.figures import rank_plans_figure, write_html

        write_html(rank_plans_figure(result), f"{out}.html")
    print(f"wrote {out}.json, {out}.md")
    return 0


W4A4_ONLY = "W4A4 layers only"  # the output-error rows without the weight-only layers' branches


def predicted_gain_db(curves: dict, fixed: dict, plan: dict) -> float:
    """10·log10 of the predicted model-output error (the sum of every layer's sensitivity-weighted
    error at its rank, the allocator's objective) under ``fixed`` over that under ``plan``."""
    def total(ranks):
        return sum(curves[n][ranks[n]] for n in curves)

    return 10.0 * math.log10(total(fixed) / total(plan))


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Rank plans judged on images: {meta['model']}", "",
             f"{meta['n_images']} images (evaluation prompts, seeds from {meta['eval_seed_base']}), "
             f"{meta['num_inference_steps']} steps, RTN weights. PSNR (dB) against the 16-bit image of the same "
             f"prompt and seed, mean [95 % bootstrap CI]; Δ = paired difference against the fixed plan of the same "
             f"method and budget. Each plan spends at most the extra 16-bit parameters of a uniform rank R (the "
             f"method's own cost). Statistics: {meta['calibration_prompts']} calibration prompts; layer "
             f"sensitivities: {meta['sensitivity_prompts']} other calibration prompts, steps {meta['sensitivity_steps']}, "
             f"error of {meta.get('sensitivity_on', 'the transformer output')}.",
             f"Device: {meta['device']}. Date: {meta['date']}. Command: `{meta['command']}`.", "",
             "Predicted: the allocator's own estimate of its gain, the sensitivity-weighted sum of layer errors "
             "(the error where the sensitivities were measured) under the fixed plan over that under its plan, in dB.", "",
             "| method | R | policy | extra 16-bit params | PSNR (dB) | Δ vs fixed (dB) | predicted (dB) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        d = r.get("vs_fixed")
        delta = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d else "–"
        p = r["psnr"]
        params = f"{r['params16'] / 1e3:,.1f} k" if "params16" in r else "–"
        pred = f"{r['predicted_gain_db']:+.2f}" if "predicted_gain_db" in r else "–"
        lines.append(f"| {r['method']} | {r['budget_rank']} | {r['policy']} | {params} | "
                     f"{p['mean']:.2f} [{p['lo']:.2f}, {p['hi']:.2f}] | {delta} | {pred} |")
    gains = [r for r in result["rows"] if "branches_gain" in r]
    if gains:
        lines += ["", "What the weight-only layers' 16-bit branches add: the tool's plan (DiRotQ, DiRotQ-LR: the "
                  "branches compete for the budget) minus the same allocation over the W4A4 layers only, paired (dB):",
                  "", "| method | R | policy | Δ (dB) |", "|---|---|---|---|"]
        for r in gains:
            d = r["branches_gain"]
            lines.append(f"| {r['method']} | {r['budget_rank']} | {r['policy'].removesuffix(f', {W4A4_ONLY}')} | "
                         f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
