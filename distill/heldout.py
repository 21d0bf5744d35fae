"""Score any models on a recipe's held-out split against its root parent: perplexity, KL(parent || model) and
top-1 agreement per token, with the trainer's own evaluator. For the long recipe that split is general text no
step trains on (teacher answers, code and prose, whole documents), so it answers "did the student keep what the
teacher does, beyond its training text?" for students of any recipe.

`python -m distill.heldout --recipe distill/recipes/smollm2-general.yaml --models smollm2-135m-instruct
smollm2-cascade-100m ...` -> a markdown table on stdout and `--json` if asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.cascade import load_recipe, train_config
from distill.corpus import prepare_sources
from distill.train import Trainer
from models.prepare import prepare
from models.registry import cascade_home, get_model


def score(recipe_path: Path, models: list[str]) -> list[dict]:
    recipe = load_recipe(recipe_path)
    prepare_sources(recipe.data)
    parent = prepare(get_model(recipe.parent))
    rows = []
    for name in models:
        path = prepare(get_model(name))
        config = train_config(recipe.train, student=path, eval_teacher=parent, out_dir=cascade_home() / "heldout",
                              data=recipe.data, tokens=1, seed=recipe.seed)
        result = Trainer(config, progress=False).evaluate()
        rows.append({"model": name, **result})
        print(f"{name}: ppl {result['val_ppl']:.2f}, KL {result['val_kl']:.3f}, top-1 {result['val_top1_agree']:.3f}",
              file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], recipe: str) -> str:
    teacher = rows[0]["val_ppl"]
    lines = [f"Held-out split of `{recipe}` (whole documents no step trains on); KL to the recipe's parent.", "",
             "| model | perplexity | vs first row | KL(parent ‖ model) | top-1 agreement |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['val_ppl']:.2f} | {r['val_ppl'] / teacher:.2f}x | {r['val_kl']:.3f} | "
              f"{r['val_top1_agree']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.heldout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True, help="registry names or checkpoint directories; the "
                        "first row is the reference for the perplexity ratio (put the teacher first)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        rows = score(args.recipe, args.models)
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(rows, args.recipe.stem))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
