"""`dadpo run`, `dadpo prune-recover` and `dadpo demo`: recipe-driven runs of the whole pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from dadpo.distributed import is_main
from dadpo.errors import DadpoError

DEMO_RECIPE = "smollm2-135m-prune20-dadpo.yaml"


def recipes_dir() -> Path:
    """`recipes/` at the repository root (dadpo is installed editable from its checkout)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def register(sub) -> None:
    r = sub.add_parser("run", help="run a recipe YAML end to end (prune → recover → evaluate)",
                       description="Run every stage of a recipe. Each stage writes to OUT/<stage>/ with a "
                       "manifest; a rerun skips stages whose config and inputs are unchanged, reruns changed "
                       "ones and everything downstream, and resumes a killed stage.")
    r.add_argument("recipe", help="recipe YAML file (see recipes/)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe value, e.g. --set recover.beta2=0.1 (repeatable)")
    r.add_argument("--out", help="override output_dir")
    r.add_argument("--dry-run", action="store_true",
                   help="validate everything that needs no model (recipe, paths, data sets), print the plan, "
                   "run nothing")
    r.set_defaults(func=cmd_run)

    p = sub.add_parser("prune-recover", help="one-liner: prune a model, then recover it from the original",
                       description="Prune --model to --ratio of its parameters removed, then recover the "
                       "pruned student by distillation from the unpruned model with --method.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="teacher model spec (default: %(default)s)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters removed (default 0.2)")
    p.add_argument("--method", default="dadpo", help="dsft, kd, dpo or dadpo (default dadpo)")
    p.add_argument("--prompts", default="dolly", help="training prompt set (default dolly)")
    p.add_argument("--data-dir", help="local data folder for dataset aliases")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="any other recipe value, e.g. --set recover.epochs=2")
    p.set_defaults(func=cmd_prune_recover)

    b = sub.add_parser("bench", help="compare recovery methods on one recipe (shared work done once)",
                       description="Prune once, generate teacher answers and the dSFT reference once, train "
                       "and evaluate each method, and write one table + plot to OUT/bench/.")
    b.add_argument("recipe", help="recipe YAML file")
    b.add_argument("--methods", default="none,dsft,dpo,dadpo",
                   help="comma-separated of none (no recovery), dsft, kd, dpo, dadpo, each optionally with "
                   "recover settings after @ (a variant: dadpo@beta2=0.003, dadpo@margin=mean@beta2=0.01); "
                   "variants share the teacher answers, dSFT and scores (default %(default)s)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    b.add_argument("--out", help="override output_dir")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="run the default CPU recipe on the embedded SmolLM2 (≈30 min on 2 cores)",
                       description=f"Run recipes/{DEMO_RECIPE}: prune SmolLM2-135M-Instruct by 20%, recover "
                       "it with daDPO, evaluate it against the teacher, and print the summary.")
    d.add_argument("--out", default="runs/demo", help="output directory (default %(default)s)")
    d.add_argument("--data-dir", help="local data folder for dataset aliases (default: $DADPO_DATA_DIR)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    d.set_defaults(func=cmd_demo)


def _execute(recipe, dry_run: bool = False) -> int:
    from dadpo.pipeline import plan, preflight, run_recipe

    stages = plan(recipe)
    if is_main():
        print(f"recipe {recipe.name}: {' → '.join(s.name for s in stages)} into {recipe.output_dir}")
    if dry_run:
        preflight(recipe, stages)
        return 0
    results = run_recipe(recipe, stages=stages)
    if is_main():
        print(summary_text(results))
    return 0


def summary_text(results: dict) -> str:
    """The final summary: each stage's headline numbers, and the comparison table when evaluated."""
    from dadpo.bench import bench_rows, markdown_table

    lines = ["summary:"]
    for stage, summary in results.items():
        if stage.endswith("evaluate"):
            lines.append(markdown_table(bench_rows(summary)))
            continue
        lines.append(f"  {stage}: " + json.dumps(_headline(summary), default=str)[:400])
    return "\n".join(lines)


def _headline(summary: dict) -> dict:
    """A stage summary's scalars, nested ones one level deep as "outer.inner" (e.g. final.reward_acc)."""
    flat = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, int | float) and kk != "tokens"})
        elif isinstance(v, int | float | str) and k != "model":
            flat[k] = v
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in flat.items()}


def cmd_run(args) -> int:
    from dadpo.recipe import load_recipe

    overrides = list(args.overrides) + ([f"output_dir={args.out}"] if args.out else [])
    return _execute(load_recipe(args.recipe, overrides), args.dry_run)


def cmd_prune_recover(args) -> int:
    from dadpo.recipe import apply_overrides, validate_recipe

    data = {"name": f"prune-recover-{args.method}", "output_dir": args.out, "teacher": args.model,
            "student": "prune", "prompts": args.prompts, "data_dir": args.data_dir,
            "prune": {"ratio": args.ratio}, "recover": {"method": args.method}}
    return _execute(validate_recipe(apply_overrides(data, args.overrides), "prune-recover"))


def cmd_bench(args) -> int:
    import shlex
    import sys

    from dadpo.bench import check_bench_dir, write_bench
    from dadpo.pipeline import BENCH_METHODS, bench_plan, run_recipe, split_methods
    from dadpo.recipe import load_recipe

    methods = split_methods(args.methods)
    if not methods:
        raise DadpoError(f"--methods: none given; choose from {', '.join(BENCH_METHODS)}")
    overrides = list(args.overrides) + ([f"output_dir={args.out}"] if args.out else [])
    recipe = load_recipe(args.recipe, overrides)
    if recipe.evaluate is None:
        raise DadpoError(f"{args.recipe}: evaluate: bench needs an evaluate section")
    stages = bench_plan(recipe, methods)
    if is_main():
        print(f"bench {recipe.name}: {', '.join(methods)} ({len(stages)} stages) into {recipe.output_dir}")
    check_bench_dir(Path(recipe.output_dir) / "bench")
    command = "dadpo " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def tables(results: dict) -> None:
        if is_main():
            print(write_bench(Path(recipe.output_dir) / "bench", results["bench/evaluate"], command))

    run_recipe(recipe, stages=stages, finish=tables)
    return 0


def cmd_demo(args) -> int:
    from dadpo.recipe import load_recipe

    path = recipes_dir() / DEMO_RECIPE
    if not path.is_file():
        raise DadpoError(f"demo recipe not found at {path}; run `dadpo run <recipe>` instead")
    overrides = [f"output_dir={args.out}", *args.overrides]
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    return _execute(load_recipe(path, overrides))


